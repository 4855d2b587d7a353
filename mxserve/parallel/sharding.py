"""How one layer's mixed-precision experts split over the ranks of SGLang's parallel groups.

Expert parallel (EP): each rank holds whole routed experts, a contiguous range as
SGLang assigns them, each in its own scheme; the shared experts are on every rank
and run on rank 0 only (their output is added once in the all-reduce). The plan's
budget must hold per rank too, or one GPU holds more bytes than the plan promised.

Tensor parallel (TP): each expert's gate and up are split by output rows, down by
input columns; the ranks' partial outputs add up in SGLang's all-reduce. A row split
keeps every scheme (rows are independent). A column split of down must keep whole
quantization groups and whole packed words on each rank, and cannot carry an input
transform that spans all columns: the Hadamard rotation (gptq-had) and the per-token
activation scale of w8a8fp8 / w4a4 / w8a8 (one amax over the whole row). Those are
refused with the reason, before any weight moves.
"""

from __future__ import annotations

import dataclasses

import torch

from mxserve.errors import MxServeError
from mxserve.parallel.ranks import column_split_refusal, ep_range
from mxserve.quant.packing import planes
from mxserve.quant.qlinear import QuantizedLinear
from mxserve.runtime.moe_layer import QuantizedExpert


def ep_rank_bits(experts: list[QuantizedExpert], n_routed: int, ep_size: int) -> list[float]:
    """Average bits per weight of each rank's experts (its routed range plus the shared ones)."""
    shared = experts[n_routed:]
    out = []
    for rank in range(ep_size):
        mine = [experts[i] for i in ep_range(n_routed, ep_size, rank)] + shared
        bits = params = 0.0
        for e in mine:
            for ql in e.linears():
                bits += ql.scheme.bits_per_weight(ql.k) * ql.n * ql.k
                params += ql.n * ql.k
        out.append(bits / params)
    return out


def check_ep_budget(experts: list[QuantizedExpert], n_routed: int, ep_size: int, budget: float,
                    layer: int = 0) -> None:  # fmt: skip
    """Every rank's experts within ``budget`` bits per weight (1e-6 slack for float sums)."""
    for rank, bits in enumerate(ep_rank_bits(experts, n_routed, ep_size)):
        if bits > budget + 1e-6:
            raise MxServeError(f"layer {layer}: rank {rank} of --ep {ep_size} would hold {bits:.3f} bits per weight, "
                               f"over the {budget:g}-bit budget (the plan meets it only on average)")  # fmt: skip


def tp_refusal(ql: QuantizedLinear, tp: int) -> str | None:
    """Why ``ql`` (a down block) cannot be split ``tp`` ways by input columns, or None."""
    return column_split_refusal(ql.scheme, ql.k, tp, ql.hadamard_seed is not None)


def check_tp(experts: list[QuantizedExpert], tp: int, layer: int = 0) -> None:
    """Refuse a layer whose blocks cannot be split ``tp`` ways, naming the block and the reason."""
    for e, qe in enumerate(experts):
        inter = qe.gate_up.n // 2
        for name, ql, why in (("gate_up", qe.gate_up, f"{inter} rows do not split {tp} ways" if inter % tp else None),
                              ("down", qe.down, tp_refusal(qe.down, tp))):
            if why:
                raise MxServeError(f"--tp {tp}: layer {layer} expert {e} {name} ({ql.scheme.name}) cannot be split: "
                                   f"{why}")  # fmt: skip


def _rows(ql: QuantizedLinear, parts: list[slice]) -> QuantizedLinear:
    def take(t):
        return None if t is None else torch.cat([t[p] for p in parts])

    n = sum(p.stop - p.start for p in parts)
    return dataclasses.replace(ql, n=n, qweight=take(ql.qweight), scales=take(ql.scales), zeros=take(ql.zeros))


def _cols(ql: QuantizedLinear, tp: int, rank: int) -> QuantizedLinear:
    k = ql.k // tp
    s = ql.scheme
    if s.family == "int":  # each bit plane's words of this rank's columns, planes kept in order
        words, start = [], 0
        for p in planes(s.w_bits):
            per = ql.k * p // 32
            words.append(ql.qweight[:, start + rank * per // tp : start + (rank + 1) * per // tp])
            start += per
        qweight = torch.cat(words, dim=1)
    else:
        qweight = ql.qweight[:, rank * k : (rank + 1) * k]

    def groups(t):
        if t is None or t.shape[1] == 1:  # per-channel: one scale per row holds for any columns
            return t
        g = t.shape[1] // tp
        return t[:, rank * g : (rank + 1) * g]

    return dataclasses.replace(ql, k=k, qweight=qweight.contiguous(), scales=groups(ql.scales),
                               zeros=groups(ql.zeros))  # fmt: skip


def tp_shard(expert: QuantizedExpert, tp: int, rank: int) -> QuantizedExpert:
    """Rank ``rank``'s part of an expert: its slice of the gate rows and of the up rows (the fused
    block keeps gate first), and the matching input columns of down."""
    check_tp([expert], tp)
    inter = expert.gate_up.n // 2
    per = inter // tp
    gate = slice(rank * per, (rank + 1) * per)
    up = slice(inter + rank * per, inter + (rank + 1) * per)
    return QuantizedExpert(_rows(expert.gate_up, [gate, up]), _cols(expert.down, tp, rank), expert.shared)


def rank_experts(experts: list[QuantizedExpert], n_routed: int, layer: int = 0, ep_rank: int = 0, ep_size: int = 1,
                 tp_rank: int = 0, tp_size: int = 1) -> tuple[list[QuantizedExpert], int]:  # fmt: skip
    """What one rank of SGLang's MoE groups runs, and how many of those are routed experts.

    Expert parallel picks the rank's routed experts (renumbered from 0, as SGLang's dispatcher
    maps the router's ids) and, on EP rank 0 only, the shared ones, whose output the all-reduce
    must add once; tensor parallel then takes the rank's slice of each. The ranks' outputs add
    up to the layer's. A layer with a block that cannot be split is refused on every rank alike."""
    if tp_size > 1:
        check_tp(experts, tp_size, layer)
    mine = ep_range(n_routed, ep_size, ep_rank)
    local = experts[mine.start : mine.stop] + (experts[n_routed:] if ep_rank == 0 else [])
    if tp_size > 1:
        local = [tp_shard(e, tp_size, tp_rank) for e in local]
    return local, len(mine)


def plan_experts(plan, view) -> list[QuantizedExpert]:
    """One layer of ``plan`` as blocks without weights (scheme and shape: what the checks read),
    ``view`` giving the layer's index and shapes (a MoELayerView)."""
    from mxserve.schemes import get_scheme

    seed = plan.hadamard_seed if plan.method == "gptq-had" else None

    def block(name: str, n: int, k: int) -> QuantizedLinear:
        sc = get_scheme(name)
        return QuantizedLinear(sc, n, k, torch.empty(0), hadamard_seed=None if sc.family == "none" else seed)

    h, i = view.hidden, view.intermediate
    return [QuantizedExpert(block(ep.gate, 2 * i, h), block(ep.down, h, i), ep.shared)
            for ep in plan.layer(view.index).experts]  # fmt: skip


def check_plan_layout(plan, views, split: int, ep: int) -> None:
    """Refuse, before the server starts, a plan its GPUs cannot serve: experts split ``split`` ways
    (parallel.ranks.moe_split) and ``ep`` groups of whole experts, the budget holding on each."""
    for view in views:
        experts = plan_experts(plan, view)
        if split > 1:
            check_tp(experts, split, view.index)
        if ep > 1:
            check_ep_budget(experts, view.n_routed, ep, plan.budget_bits, view.index)
