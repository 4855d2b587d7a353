"""Applying a plan to a serving model: validated, layer by layer, each layer atomic.

The new experts of every changed layer are read from the ladder and prepared
(dequantized weights, or packed arenas on a GPU) outside the engine's lock;
then each layer is switched between two forward passes by holding the lock
the engine takes around every forward, so a forward sees a layer wholly old
or wholly new. A failure part-way puts back the layers already switched, in
the same way: serving continues on the previous plan, and the caller gets a
:class:`SwapError` to report.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mxserve.errors import MxServeError
from mxserve.online.ladder import Ladder
from mxserve.plan import Plan

# where tests inject a failure: called with the layer index before it is switched
FaultHook = Callable[[int], None]


class PlanRejected(MxServeError):
    """The plan does not fit the served model, the ladder or the budget (the caller's error)."""


class SwapError(MxServeError):
    """Applying a valid plan failed part-way; the previous plan is serving again."""


@dataclass
class SwapReport:
    layers_changed: int = 0
    seconds: float = 0.0
    layer_hold_seconds: list[float] = field(default_factory=list)  # time each layer was held


def layer_bits(layer_plan, layer) -> tuple[float, int]:
    """(bits, params) of a layer's expert weights under ``layer_plan`` (shapes from the served layer)."""
    from mxserve.schemes import get_scheme

    bits = params = 0
    for ep, qe in zip(layer_plan.experts, layer.experts_q):
        for name, ql in (("gate", qe.gate_up), ("down", qe.down)):
            bits += get_scheme(getattr(ep, name)).bits_per_weight(ql.k) * ql.n * ql.k
            params += ql.n * ql.k
    return bits, params


def validate_plan(plan: Plan, layers: list, ladder: Ladder, budget: float, granularity: str = "layer") -> None:
    """Raise :class:`PlanRejected` unless ``plan`` fits the served layers, the ladder and ``budget``."""
    by_index = {m.layer_index: m for m in layers}
    if plan.model_type != ladder.meta.model_type:
        raise PlanRejected(f"the plan is for a {plan.model_type} model; this server serves {ladder.meta.model_type}")
    if plan.method != ladder.meta.method or plan.hadamard_seed != ladder.meta.hadamard_seed:
        raise PlanRejected(f"the plan's method {plan.method} (seed {plan.hadamard_seed}) differs from the served "
                           f"{ladder.meta.method} (seed {ladder.meta.hadamard_seed})")
    if sorted(lay.layer for lay in plan.layers) != sorted(by_index):
        raise PlanRejected(f"the plan covers MoE layers {sorted(lay.layer for lay in plan.layers)}; the model has "
                           f"{sorted(by_index)}")
    unknown = sorted(plan.scheme_names() - set(ladder.schemes))
    if unknown:
        raise PlanRejected(f"schemes {unknown} are not among the served candidates {ladder.schemes}")
    total_bits = total_params = 0
    for lay in plan.layers:
        layer = by_index[lay.layer]
        if len(lay.experts) != len(layer.experts_q) or [e.expert for e in lay.experts] != list(range(len(
                layer.experts_q))):
            raise PlanRejected(f"layer {lay.layer}: the plan has {len(lay.experts)} experts, the model "
                               f"{len(layer.experts_q)}")
        if [e.shared for e in lay.experts] != [q.shared for q in layer.experts_q]:
            raise PlanRejected(f"layer {lay.layer}: shared experts differ from the model's")
        bits, params = layer_bits(lay, layer)
        if granularity == "layer" and bits > budget * params * (1 + 1e-9):
            raise PlanRejected(f"layer {lay.layer} averages {bits / params:.4f} bits, over the budget {budget:g}")
        total_bits += bits
        total_params += params
    if total_bits > budget * total_params * (1 + 1e-9):
        raise PlanRejected(f"the plan averages {total_bits / total_params:.4f} bits, over the budget {budget:g}")


class PlanSwapper:
    """Applies plans to the runtime layers of one serving process."""

    def __init__(self, layers: Callable[[], list], ladder: Ladder, lock, hidden: dict[int, int],
                 local: Callable[[int, list], list] | None = None):  # fmt: skip
        self._layers = layers  # runtime layers (MixedExperts): layer_index, experts_q, prepare/commit
        self.ladder = ladder
        self.lock = lock  # held by the engine around every forward pass
        self.hidden = hidden  # layer index -> hidden size
        # (layer index, the layer's experts) -> what this process runs of them (one GPU of several)
        self.local = local
        self.fault: FaultHook | None = None

    def layers(self) -> list:
        return self._layers()

    def apply(self, current: Plan, plan: Plan) -> SwapReport:
        """Switch every layer whose schemes differ; all or nothing (see module doc)."""
        t0 = time.perf_counter()
        report = SwapReport()
        layers = sorted(self._layers(), key=lambda m: m.layer_index)
        changed = [m for m in layers if _schemes(current, m.layer_index) != _schemes(plan, m.layer_index)]
        done: list[tuple[object, object]] = []  # (layer, its previous staged state)
        try:
            staged = []
            for m in changed:
                experts = self.ladder.experts(plan.layer(m.layer_index), self.hidden[m.layer_index])
                if self.local is not None:
                    experts = self.local(m.layer_index, experts)
                staged.append((m, m.prepare(experts)))
            for m, new in staged:
                if self.fault is not None:
                    self.fault(m.layer_index)
                old = m.staged()
                with _held(self.lock, report):
                    m.commit(new)
                done.append((m, old))
        except Exception as e:
            for m, old in reversed(done):
                with _held(self.lock, report):
                    m.commit(old)
            raise SwapError(f"swap failed at layer {len(done)} of {len(changed)} to change: {e}; the previous plan "
                            "is serving") from e
        report.layers_changed = len(changed)
        report.seconds = time.perf_counter() - t0
        return report


def plan_id(plan: Plan) -> str:
    """The id router_stats exports for a served plan (mxserve_plan_info), computed from the plan itself."""
    from router_stats.metrics import BlockPrecision, Precision

    blocks = [BlockPrecision(lay.layer, ep.expert, block, scheme, 0.0, 0)
              for lay in sorted(plan.layers, key=lambda x: x.layer) for ep in lay.experts
              for block, scheme in (("gate_up", ep.gate), ("down", ep.down))]
    return Precision(blocks, plan.budget_bits, plan.method).plan_id


def _schemes(plan: Plan, layer: int) -> list[tuple[str, str]]:
    return [(e.gate, e.down) for e in plan.layer(layer).experts]


@contextlib.contextmanager
def _held(lock, report: SwapReport):
    with lock:
        t = time.perf_counter()
        yield
        report.layer_hold_seconds.append(time.perf_counter() - t)
