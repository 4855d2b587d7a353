"""The MoE runtime layer: one layer's experts in their planned schemes.

:class:`MixedExperts` holds the experts and runs them; :class:`MxMoELayer`
replaces a transformers sparse MoE block with it, keeping the model's own
router (and shared-expert gate) under their original attribute names, and the
SGLang engine's FusedMoE method wraps the same class. The device decides
the path: the mixed-precision Triton kernels on CUDA, the torch reference
(dequantize + matmul) elsewhere. It counts routed tokens per expert for router_stats.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from mxkernels.arena import build_arena, build_slab, copy_slab, kernel_codes, slab_capacity
from mxkernels.moe import mx_moe_forward, start_shared, start_zero_fill
from mxkernels.reference import moe_reference
from mxserve.models.adapters import MoELayerView
from mxserve.quant.qlinear import QuantizedLinear
from router_stats import ExpertCounter

log = logging.getLogger(__name__)


@dataclass
class QuantizedExpert:
    gate_up: QuantizedLinear  # [2I, H], gate rows first
    down: QuantizedLinear  # [H, I]
    shared: bool = False

    def linears(self) -> tuple[QuantizedLinear, QuantizedLinear]:
        return self.gate_up, self.down

    def scheme_names(self) -> tuple[str, str]:
        return self.gate_up.scheme.name, self.down.scheme.name


class MixedExperts:
    """One layer's experts in their planned schemes and the math on them; engines wrap it.

    The embedded engine wraps it in :class:`MxMoELayer` (a transformers MoE block),
    the SGLang engine in its FusedMoE quantization method; both call :meth:`forward`
    with the router's top-k, so the kernels, the reference and the routing counts
    live here once.
    """

    def __init__(self, layer_index: int, n_routed: int, experts: list[QuantizedExpert], model_codes: int = 0):
        self.layer_index = layer_index
        self.n_routed = n_routed
        self.experts_q = experts
        self.model_codes = model_codes  # kernel codes of the whole model (Arena.extra_codes): one variant
        self.counter = ExpertCounter(n_routed)
        self.version = 0  # bumped by every swap: readers (router_stats) see a new precision
        # off where the routing is counted elsewhere (one GPU of several: parallel/stats.py)
        self.counting = True
        self._dense: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._dense_key: tuple | None = None
        self._arenas: tuple | None = None  # (gate_up, down) packed for the kernels, per device
        self._slab: tuple | None = None  # (capacity, codes, rotation seed, min group): see fix_capacity
        self._started = None  # what the next forward launched already (start_early)
        self._missed = False  # whether a forward has not taken such a start (logged once)

    def forward(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        shared_scale: torch.Tensor | None = None,
        shared_gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MoE output [T, H] for tokens x [T, H] routed to ``topk_ids`` [T, k]; an id of -1
        (SGLang's mark for a padded token's slot) routes nowhere. The shared experts' sum is scaled
        by ``shared_scale`` [T, 1], or by sigmoid(x . ``shared_gate``) for a gate weight [H]
        (computed in fp32 inside the kernels' last launch on a GPU)."""
        started, self._started = self._started, None
        if x.is_cuda:  # the -1 ids and the gate are handled inside the launches: no small ops around them
            gate_up, down = self.arenas(x.device)
            # the count launches beside the alignment, on the second stream (none to fork when not counting)
            count = (lambda: self.record(topk_ids)) if self.counting else None
            out = mx_moe_forward(x, topk_ids, topk_weights, gate_up, down, self.n_routed, shared_scale,
                                 shared_gate, on_side=count, started=started)  # fmt: skip
            if started is not None and not started.taken and not self._missed:
                self._missed = True  # the shared experts ran twice: said once a layer
                log.warning("layer %d: the launches started early (%s) were not used (the experts' input is not the "
                            "MoE block's); the forward launched them again", self.layer_index,
                            "the zero fill" if started.zeroed else "the shared experts")  # fmt: skip
            return out.to(x.dtype)
        self.record(topk_ids)
        if shared_gate is not None:
            shared_scale = torch.sigmoid(x.float() @ shared_gate.float().reshape(-1, 1))
        valid = topk_ids >= 0
        topk_ids = torch.where(valid, topk_ids, 0)
        topk_weights = torch.where(valid, topk_weights, 0)
        return moe_reference(
            x,
            topk_ids,
            topk_weights,
            [e.linears() for e in self.experts_q],
            self.dense_weights(x.dtype, x.device),
            self.n_routed,
            shared_scale,
        )

    def start_early(self, x: torch.Tensor, top_k: int, shared: bool) -> None:
        """Launch what the coming forward of ``x`` can now, before the router's top-k exists (a GPU only): for a
        forward taking the top-k's rows straight on stream-K (one token; more unless MXSERVE_TOPK_GRID=0), stream-K's
        zero fill (mxkernels.moe.start_zero_fill); else, with
        ``shared``, its shared experts (on their own stream, at decode: mxkernels.moe.start_shared). They then run
        beside the router. The forward takes them where it gets the same input; otherwise it launches them itself."""
        self._started = None
        if not x.is_cuda:
            return
        if not shared or x.shape[0] == 1:  # one token: the top-k's rows where they apply (H100: 22 us a layer where
            # aligned took 26, the shared experts then in the one launch; benchmarks/README.md, forty-second session)
            self._started = start_zero_fill(x, top_k, *self.arenas(x.device), self.n_routed)
        if self._started is None and shared and self.n_routed < len(self.experts_q):
            self._started = start_shared(x, top_k, *self.arenas(x.device), self.n_routed)

    def record(self, topk_ids: torch.Tensor) -> None:
        """Count one forward pass's routing (the engine may run the math elsewhere)."""
        if not self.counting:
            return
        if self.counter.device != topk_ids.device:
            self.counter.to(topk_ids.device)
        self.counter.record(topk_ids)

    def dense_weights(self, dtype: torch.dtype, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Dequantized weights for the reference path, made once per dtype/device."""
        key = (dtype, device)
        if self._dense is None or self._dense_key != key:
            self._dense = [
                (e.gate_up.dequantize(dtype).to(device), e.down.dequantize(dtype).to(device)) for e in self.experts_q
            ]
            self._dense_key = key
        return self._dense

    def arenas(self, device: torch.device):
        """The layer's packed weights for the Triton kernels, on ``device``."""
        if self._arenas is None or self._arenas[0].meta.device != device:
            self._arenas = self._pack(self.experts_q, device)
        return self._arenas

    def _pack(self, experts: list[QuantizedExpert], device) -> tuple:
        if self._slab is not None:
            cap, codes, seed, group = self._slab
            return build_slab([e.gate_up for e in experts], [e.down for e in experts], cap, codes, seed, group, device)
        # built on the device: the integer codes are repacked there (packing.kernel_order)
        return tuple(build_arena([ql.to(device) for ql in blocks], self.model_codes).to(device)
                     for blocks in zip(*(e.linears() for e in experts)))

    def fix_capacity(self, budget_bits: float, schemes: list[str], rotation_seed: int | None) -> None:
        """Pack into one fixed-size slab that any plan within ``budget_bits`` over ``schemes`` fits, with a
        kernel variant for all of them: then a swap is an in-place copy and CUDA graphs captured over the
        slab stay valid (SGLang). Call before the arenas are first built."""
        from mxserve.schemes import get_scheme

        sch = [get_scheme(s) for s in schemes]
        codes = kernel_codes(sch)
        groups = [sc.group for sc in sch if sc.family == "int" and sc.group]
        linears = [ql for e in self.experts_q for ql in e.linears()]
        self._slab = (slab_capacity(budget_bits, linears), codes, rotation_seed, min(groups, default=1 << 30))
        self._arenas = None

    def set_experts(self, experts: list[QuantizedExpert]) -> None:
        """Swap in experts in other schemes (same layer, same shapes)."""
        self.commit(self.prepare(experts))

    def staged(self) -> tuple:
        """What this layer runs now, in the form :meth:`commit` takes (to put it back)."""
        if self._slab is not None and self._arenas is not None:
            return self.prepare(self.experts_q)  # a slab is overwritten in place: keep a copy
        return self.experts_q, self._dense, self._dense_key, self._arenas

    def prepare(self, experts: list[QuantizedExpert]) -> tuple:
        """Everything a forward needs for ``experts``, made now (off the serving path): the
        dequantized weights or packed arenas this layer already uses, for the same dtype/device."""
        dense = key = arenas = None
        if self._dense_key is not None:
            dtype, device = key = self._dense_key
            dense = [(e.gate_up.dequantize(dtype).to(device), e.down.dequantize(dtype).to(device)) for e in experts]
        if self._arenas is not None:
            # a slab is staged on the host: the swap copies it in, and the GPU never holds two plans
            arenas = self._pack(experts, "cpu" if self._slab is not None else self._arenas[0].meta.device)
        return experts, dense, key, arenas

    def commit(self, staged: tuple) -> None:
        """Switch to a prepared state between forward passes: reference assignments, or, for a slab,
        an in-place copy into the buffers the kernels (and captured CUDA graphs) read."""
        experts, dense, key, arenas = staged
        if self._slab is not None and self._arenas is not None and arenas is not None:
            copy_slab(self._arenas, arenas)
            arenas = self._arenas
        self.experts_q, self._dense, self._dense_key, self._arenas = experts, dense, key, arenas
        self.version += 1


class MxMoELayer(nn.Module):
    """A transformers MoE block on :class:`MixedExperts`, with the model's own router."""

    def __init__(self, view: MoELayerView, experts: list[QuantizedExpert], model_codes: int = 0):
        super().__init__()
        self.gate = view.router
        self.shared_gate_name = view.spec.shared_gate
        if self.shared_gate_name:
            setattr(self, self.shared_gate_name, view.shared_gate)
        self.mx = MixedExperts(view.index, view.n_routed, experts, model_codes)

    @property
    def layer_index(self) -> int:
        return self.mx.layer_index

    @property
    def experts_q(self) -> list[QuantizedExpert]:
        return self.mx.experts_q

    @property
    def counter(self) -> ExpertCounter:
        return self.mx.counter

    @property
    def version(self) -> int:
        return self.mx.version

    def shared_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.shared_gate_name:
            return None
        return torch.sigmoid(getattr(self, self.shared_gate_name)(x))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        _, topk_weights, topk_ids = self.gate(x)
        return self.mx.forward(x, topk_ids, topk_weights, self.shared_scale(x)).reshape(shape)

    def set_experts(self, experts: list[QuantizedExpert]) -> None:
        self.mx.set_experts(experts)


def model_kernel_codes(qlayers: list[list[QuantizedExpert]]) -> int:
    """The kernel codes of every block of a model (MixedExperts' ``model_codes``)."""
    return kernel_codes(ql.scheme for layer in qlayers for e in layer for ql in e.linears())


def plan_kernel_codes(plan, extra_schemes: list[str] | None = None) -> int:
    """The kernel codes of every scheme a plan uses (and of ``extra_schemes``: a ladder's candidates)."""
    from mxserve.schemes import get_scheme

    return kernel_codes(get_scheme(s) for s in sorted(plan.scheme_names() | set(extra_schemes or ())))
