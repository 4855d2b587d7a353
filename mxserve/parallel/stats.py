"""Routing statistics of a layer served over several GPUs (SGLang's tensor and expert parallel).

A rank's own runtime layer cannot speak for the layer: under expert parallel SGLang's dispatcher
hands the method the router's ids already mapped to the rank's experts (-1 for the others), and
under tensor parallel the rank holds a slice of every block. So one rank of the layer's MoE group
(its rank 0) exports for the whole layer: :class:`CountingDispatcher` counts the router's global
ids as they enter SGLang's dispatcher, and :class:`WholeLayer` holds the whole layer's blocks
(scheme and shape; no weights). Every rank sees the same tokens and the same router output, so
these counts are the layer's, as on one GPU, and there is nothing to reduce across ranks.
"""

from __future__ import annotations

import dataclasses

import torch

from mxserve.runtime.moe_layer import QuantizedExpert
from router_stats import ExpertCounter


class WholeLayer:
    """What router_stats reads of one layer (as of a MixedExperts): its index, a counter of the
    router's picks over all routed experts, the blocks of all experts, a version."""

    def __init__(self, layer_index: int, n_routed: int, experts: list[QuantizedExpert]):
        self.layer_index = layer_index
        self.n_routed = n_routed
        self.experts_q = [QuantizedExpert(*(_shape_only(ql) for ql in e.linears()), e.shared) for e in experts]
        self.counter = ExpertCounter(n_routed)
        self.version = 0

    def set_plan(self, layer_plan) -> None:
        """The layer's blocks after a swap to ``layer_plan`` (same shapes, the plan's schemes)."""
        self.experts_q = [
            QuantizedExpert(dataclasses.replace(e.gate_up, scheme=ep.scheme("gate")),
                            dataclasses.replace(e.down, scheme=ep.scheme("down")), e.shared)
            for e, ep in zip(self.experts_q, layer_plan.experts)
        ]  # fmt: skip
        self.version += 1


def _shape_only(ql):
    return dataclasses.replace(ql, qweight=torch.empty(0), scales=None, zeros=None)


class CountingDispatcher:
    """A layer's SGLang dispatcher that first counts the router's global expert ids (inside the
    forward, so CUDA graphs capture the count too); everything else is the wrapped dispatcher's."""

    def __init__(self, inner, counter: ExpertCounter):
        self.inner = inner
        self.counter = counter

    def dispatch(self, hidden_states, topk_output, **kwargs):
        self.counter.record(topk_output.topk_ids)
        return self.inner.dispatch(hidden_states=hidden_states, topk_output=topk_output, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)
