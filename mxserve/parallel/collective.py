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

import torch
import torch.distributed as dist

from mxserve.errors import MxServeError
from mxserve.parallel.ranks import ep_range
from mxserve.parallel.sharding import check_tp, tp_shard
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
    n = _group_size(group)
    if n == 1:
        return digest
    seen: list[str | None] = [None] * n
    dist.all_gather_object(seen, digest, group=group)
    if len(set(seen)) > 1:
        first = seen[0]
        odd = [r for r, d in enumerate(seen) if d != first]
        raise MxServeError(f"plans differ across ranks (ranks {odd} differ from rank 0: "
                           f"{seen[odd[0]][:12]} vs {first[:12]}); nothing applied")  # fmt: skip
    return digest


def ep_local(experts: list[QuantizedExpert], n_routed: int, rank: int, ep_size: int) -> MixedExperts:
    """What rank ``rank`` holds: its routed experts (renumbered from 0), and on rank 0 the shared
    ones, whose output must be added once."""
    mine = ep_range(n_routed, ep_size, rank)
    local = experts[mine.start : mine.stop] + (experts[n_routed:] if rank == 0 else [])
    return MixedExperts(0, len(mine), local)


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
    check_tp(experts, tp_size, layer)
    return MixedExperts(layer, n_routed, [tp_shard(e, tp_size, rank) for e in experts])


def tp_moe_forward(local: MixedExperts, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                   shared_scale: torch.Tensor | None = None, group=None) -> torch.Tensor:  # fmt: skip
    """The layer's output on every rank of a tensor-parallel group: the sum of the ranks' slices."""
    return all_reduce_sum(local.forward(x, topk_ids, topk_weights, shared_scale), group)
