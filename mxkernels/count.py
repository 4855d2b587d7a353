"""A forward pass's routing counts (router_stats.ExpertCounter's buffer) in one launch.

The counter's torch form is 17 small ops per MoE layer (casts, masks, two index_add_, bucketize,
stacks). In SGLang's decode CUDA graph each is a node of its own, replayed for every token, however
little it computes (small kernels there take 1 to 5 us each on the H200: benchmarks/README.md). This kernel
makes the same additions in one program: the tokens routed to each expert, the tokens through the
layer, whether the pass had any, and its bucket of the tokens-per-forward histogram. Given a host
mirror (pinned memory, which a GPU with unified addressing writes directly), it then stores the whole
buffer there too: the reader thread gets the counts with no copy of its own and none in the graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["t"])  # one compile per model, whatever the batch
def routing_count_kernel(
    ids_ptr,
    buf_ptr,
    bounds_ptr,
    host_ptr,
    t,
    E,
    K: tl.constexpr,
    KP: tl.constexpr,
    NB: tl.constexpr,
    NBP: tl.constexpr,
    BT: tl.constexpr,
    MIRROR: tl.constexpr = False,
    SIZE: tl.constexpr = 1,
):
    count_in_one_program(ids_ptr, buf_ptr, bounds_ptr, host_ptr, t, E, K, KP, NB, NBP, BT, MIRROR, SIZE)


@triton.jit
def count_in_one_program(ids_ptr, buf_ptr, bounds_ptr, host_ptr, t, E, K: tl.constexpr, KP: tl.constexpr,
                         NB: tl.constexpr, NBP: tl.constexpr, BT: tl.constexpr, MIRROR: tl.constexpr,
                         SIZE: tl.constexpr):  # fmt: skip
    """The counting of :func:`count_routing` by one program over ``t`` tokens' ids [t, K] in memory."""
    cols = tl.arange(0, KP)
    n = tl.zeros((), dtype=tl.int64)  # tokens with at least one routed slot
    for start in range(0, t, BT):
        rows = start + tl.arange(0, BT)
        m = (rows[:, None] < t) & (cols[None, :] < K)
        ids = tl.load(ids_ptr + rows[:, None] * K + cols[None, :], mask=m, other=-1).to(tl.int64)
        valid = ids >= 0  # -1: SGLang's padded slot
        tl.atomic_add(buf_ptr + tl.where(valid, ids, 0), tl.full((BT, KP), 1, tl.int64), mask=valid, sem="relaxed")
        n += tl.sum(tl.max(valid.to(tl.int64), axis=1), axis=0)
    ran = (n > 0).to(tl.int64)
    b = tl.arange(0, NBP)
    bounds = tl.load(bounds_ptr + b, mask=b < NB, other=0)
    bucket = tl.sum(((b < NB) & (bounds < n)).to(tl.int64), axis=0)  # the first bound >= n, as bucketize
    tl.atomic_add(buf_ptr + E, n, sem="relaxed")
    tl.atomic_add(buf_ptr + E + 1, ran, sem="relaxed")
    tl.atomic_add(buf_ptr + E + 2 + bucket, ran, sem="relaxed")
    if MIRROR:  # the buffer after this pass's additions (read past L1, where the atomics are not)
        tl.debug_barrier()
        j = tl.arange(0, SIZE)
        n_buf = E + 3 + NB
        tl.store(host_ptr + j, tl.load(buf_ptr + j, mask=j < n_buf, volatile=True), mask=j < n_buf)


def count_consts(buf: torch.Tensor, bounds: torch.Tensor, k: int, mirror: bool) -> dict:
    """The constants of :func:`count_in_one_program` for ``k`` ids a token into ``buf`` over ``bounds``."""
    nb = bounds.numel()
    return dict(K=k, KP=triton.next_power_of_2(max(k, 1)), NB=nb, NBP=triton.next_power_of_2(nb), BT=128,
                MIRROR=mirror, SIZE=triton.next_power_of_2(buf.numel()) if mirror else 1)  # fmt: skip


def count_routing(topk_ids: torch.Tensor, buf: torch.Tensor, bounds: torch.Tensor, n_experts: int,
                  host: torch.Tensor | None = None) -> None:  # fmt: skip
    """Add one forward pass's routing ``topk_ids`` [T, k] (-1: a padded slot) into ``buf`` (int64:
    per-expert counts, tokens, forwards, then the histogram over ``bounds``, +Inf last); then copy
    ``buf`` into ``host`` (pinned, written by the kernel itself) when given."""
    ids = (topk_ids if topk_ids.dim() == 2 else topk_ids.reshape(-1, 1)).contiguous()
    t, k = ids.shape
    routing_count_kernel[(1,)](ids, buf, bounds, host if host is not None else buf, t, n_experts,
                               **count_consts(buf, bounds, k, host is not None))  # fmt: skip
