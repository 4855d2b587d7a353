"""What the ranks of a parallel group agree on: routing counts, the plan, and the layer's sum.

Runs over any ``torch.distributed`` process group (NCCL on GPUs, gloo on CPUs);
without one (a single process) every function is the identity.

- Routing counts: a rank counts the tokens its router sends to each expert. When
  ranks see different tokens (data-parallel attention, or separate batches), the
  counts the re-planner reads are the sum over ranks.
- The plan: a swap must apply the same plan on every rank, or ranks would run
  different precisions of one model. Before applying, the ranks compare digests of
  the plan; on a mismatch every rank refuses and names the ranks that differ.
- Expert parallel: each rank runs its own routed experts (and rank 0 the shared
  ones) over all tokens; the partial outputs add up to the layer's output.
- Tensor parallel: each rank runs its slice of every expert (sharding.tp_shard);
  the partial outputs add up. Every rank sees all tokens and all routing, so the
  counts of any one rank are the layer's: nothing to reduce.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import torch
import torch.distributed as dist

from mxserve.errors import MxServeError
from mxserve.parallel.ranks import ep_range
from mxserve.parallel.sharding import rank_experts
from mxserve.plan import Plan
from mxserve.runtime.moe_layer import MixedExperts, QuantizedExpert


def _group_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def reduce_counts(counts: torch.Tensor, group=None) -> torch.Tensor:
    """Per-expert token counts summed over ranks that saw different tokens (a new int64 tensor)."""
    total = counts.to(torch.int64).clone()
    if _group_size(group) > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def gather_ep_counts(local: torch.Tensor, n_local: int, group=None) -> torch.Tensor:
    """The whole layer's routed counts from expert-parallel ranks, each of which counted only
    its own ``n_local`` routed experts (the same tokens reach every rank, so no sum)."""
    mine = local[:n_local].to(torch.int64).contiguous()
    n = _group_size(group)
    if n == 1:
        return mine.clone()
    parts = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(parts, mine, group=group)
    return torch.cat(parts)


def plan_digest(plan: Plan) -> str:
    """Digest of what a plan makes each block run: schemes, method, rotation seed."""
    body = {"method": plan.method, "hadamard_seed": plan.hadamard_seed, "layers": plan.to_json()["layers"]}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def check_same_plan(plan: Plan, group=None) -> str:
    """The plan's digest when every rank holds the same plan; MxServeError on every rank otherwise."""
    digest = plan_digest(plan)
    _same_digest(digest, group)
    return digest


def ep_local(experts: list[QuantizedExpert], n_routed: int, rank: int, ep_size: int) -> MixedExperts:
    """What rank ``rank`` holds: its routed experts (renumbered from 0), and on rank 0 the shared
    ones, whose output must be added once."""
    local, n_local = rank_experts(experts, n_routed, ep_rank=rank, ep_size=ep_size)
    return MixedExperts(0, n_local, local)


def ep_local_ids(topk_ids: torch.Tensor, n_routed: int, rank: int, ep_size: int) -> torch.Tensor:
    """Routing ids as rank ``rank`` sees them: its experts renumbered from 0, others -1 (no expert here)."""
    mine = ep_range(n_routed, ep_size, rank)
    own = (topk_ids >= mine.start) & (topk_ids < mine.stop)
    return torch.where(own, topk_ids - mine.start, -1)


def all_reduce_sum(partial: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of the ranks' partial outputs (in place; fp32 accumulation for low-precision inputs)."""
    if _group_size(group) == 1:
        return partial
    acc = partial.float() if partial.dtype in (torch.bfloat16, torch.float16) else partial
    dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=group)
    return acc.to(partial.dtype) if acc is not partial else partial


def ep_moe_forward(local: MixedExperts, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                   n_routed: int, shared_scale: torch.Tensor | None = None, group=None) -> torch.Tensor:  # fmt: skip
    """The layer's output, on every rank of an expert-parallel group: each rank runs the tokens
    routed to its own experts (``local``, from :func:`ep_local`) and the ranks' outputs are summed."""
    size = _group_size(group)
    rank = dist.get_rank(group) if size > 1 else 0
    ids = ep_local_ids(topk_ids, n_routed, rank, size)
    return all_reduce_sum(local.forward(x, ids, topk_weights, shared_scale if rank == 0 else None), group)


def tp_local(experts: list[QuantizedExpert], n_routed: int, rank: int, tp_size: int, layer: int = 0) -> MixedExperts:
    """What rank ``rank`` of a tensor-parallel group holds: its slice of every expert (refused,
    naming the block, where a scheme cannot be split ``tp_size`` ways)."""
    local, _ = rank_experts(experts, n_routed, layer, tp_rank=rank, tp_size=tp_size)
    return MixedExperts(layer, n_routed, local)


def tp_moe_forward(local: MixedExperts, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                   shared_scale: torch.Tensor | None = None, group=None) -> torch.Tensor:  # fmt: skip
    """The layer's output on every rank of a tensor-parallel group: the sum of the ranks' slices."""
    return all_reduce_sum(local.forward(x, topk_ids, topk_weights, shared_scale), group)


def all_ranks(ok: bool, group=None) -> bool:
    """True when ``ok`` holds on every rank (each rank must call it)."""
    if _group_size(group) == 1:
        return ok
    seen: list[bool | None] = [None] * _group_size(group)
    dist.all_gather_object(seen, bool(ok), group=group)
    return all(seen)


def swap_on_every_rank(read: Callable[[], Plan], apply: Callable[[Plan], object], undo: Callable[[Plan], None],
                       group=None) -> tuple[Plan, object]:  # fmt: skip
    """Swap in a plan on every rank of ``group``, all or none; each rank calls it at the same point.

    1. Each rank reads and checks its copy (``read``). Every rank then reaches the digest exchange,
       whatever failed, since a rank that returned early would leave the others waiting forever.
       A rank that could not read the plan, or a plan that differs, makes every rank refuse
       before anything changes.
    2. Each rank applies it (``apply``, which leaves the rank as it was when it raises).
    3. The ranks compare outcomes: if any rank failed, the ranks that succeeded put their previous
       plan back (``undo`` with the plan they applied), so the ranks never serve different plans.

    Returns (plan, what ``apply`` returned); raises MxServeError on every rank when nothing changed.
    """
    plan, error = None, None
    try:
        plan = read()
        digest = plan_digest(plan)
    except Exception as e:  # noqa: BLE001 - reported to every rank below
        error, digest = e, f"unreadable on this rank: {e}"
    _same_digest(digest, group)  # a rank that failed differs from those that did not
    if error is not None:  # every rank failed alike
        raise MxServeError(f"the plan could not be read: {error}") from error
    try:
        result, failure = apply(plan), None
    except Exception as e:  # noqa: BLE001 - the other ranks must learn of it
        result, failure = None, e
    if not all_ranks(failure is None, group):
        if failure is None:
            undo(plan)
        raise MxServeError(f"the swap failed on {'this rank' if failure else 'another rank'}"
                           + (f": {failure}" if failure else "") + "; the previous plan serves on every rank")
    return plan, result


def _same_digest(digest: str, group=None) -> None:
    n = _group_size(group)
    if n == 1:
        return
    seen: list[str | None] = [None] * n
    dist.all_gather_object(seen, digest, group=group)
    if len(set(seen)) > 1:
        odd = [r for r, d in enumerate(seen) if d != seen[0]]
        raise MxServeError(f"plans differ across ranks (ranks {odd} differ from rank 0: {str(seen[odd[0]])[:60]} vs "
                           f"{str(seen[0])[:60]}); nothing applied")  # fmt: skip
