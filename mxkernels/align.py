"""Routing alignment for the grouped GEMMs: (token, slot) rows sorted by expert, in one launch.

Each expert's rows are padded to a multiple of BM (the GEMM's row tile), so a
program of the GEMM serves exactly one expert. Shared experts are extra slots
appended to every token's top-k (ids n_routed.., weight 1); the same launch
writes the per-row routing weights. At decode the torch version of this took
about 25 small kernels (some 50 us per layer on an H100, as much as the two
GEMMs at 1 token); this is one single-program kernel: a histogram pass, a prefix
sum, and a placement pass where an atomic cursor per expert hands out slots
(so rows keep no order within an expert, which no row's result depends on).
Above KERNEL_MAX_ROWS rows (prefill) the same three steps run as three launches
of many programs each.

At decode the shared experts' rows can be laid out apart (:func:`shared_rows`, no
routing needed), so that their GEMMs run on a second stream beside the alignment and
the routed experts' GEMMs (moe.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mxkernels.pdl import launch, pdl, wait_then_release

KERNEL_MAX_ROWS = 4096  # above this, one program per LARGE_CHUNK rows (three launches)
LARGE_CHUNK = 512


@triton.jit
def _slot(ids_ptr, w_ptr, r, n, n_routed, K: tl.constexpr, SLOTS: tl.constexpr, EP: tl.constexpr,
          SHARED: tl.constexpr):  # fmt: skip
    """Expert and routing weight of rows ``r`` (row = token * SLOTS + slot); EP - 1 past the end,
    and for the shared slots unless SHARED. A routed slot of id -1 (SGLang's padded token) goes to
    expert 0 with weight 0."""
    t = r // SLOTS
    j = r % SLOTS
    valid = r < n
    routed = valid & (j < K)
    e = tl.load(ids_ptr + t * K + j, mask=routed, other=0).to(tl.int32)
    w = tl.load(w_ptr + t * K + j, mask=routed, other=1.0).to(tl.float32)
    w = tl.where(e < 0, 0.0, w)
    e = tl.maximum(e, 0)
    e = tl.where(routed, e, n_routed + j - K)
    keep = valid
    if not SHARED:
        keep = valid & routed
    return tl.where(keep, e, EP - 1), w


@triton.jit
def _lay_out_blocks(counts, bins, cursor_ptr, npp_ptr, block_expert_ptr, cap, E: tl.constexpr, BM: tl.constexpr,
                    BCHUNK: tl.constexpr):  # fmt: skip
    """From the experts' row counts: each expert's first slot (its cursor), the padded row count and
    the expert of every block of BM slots (past the padded rows: the last expert's, blocks no row is in)."""
    counts = tl.where(bins < E, counts, 0)  # the last bin also counted the rows past the end
    padded = (counts + BM - 1) // BM * BM
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    total = tl.sum(padded, 0)
    tl.store(cursor_ptr + bins, starts)
    tl.store(npp_ptr, total)
    # each expert writes its own blocks, one a step: as many steps as the most blocks of one expert (a
    # block-by-expert comparison, [BCHUNK, EP] a step, was 256 compares a lane in one warp: the fused router's)
    blocks = padded // BM
    for j in range(0, tl.max(blocks, 0)):
        tl.store(block_expert_ptr + starts // BM + j, bins, mask=j < blocks)
    for b0 in range(total // BM, cap // BM, BCHUNK):
        b = b0 + tl.arange(0, BCHUNK)
        tl.store(block_expert_ptr + b, tl.full((BCHUNK,), E - 1, tl.int32), mask=b < cap // BM)


@triton.jit
def _place(ids_ptr, w_ptr, sorted_ptr, cursor_ptr, r, n, n_routed, K: tl.constexpr, SLOTS: tl.constexpr,
           E: tl.constexpr, EP: tl.constexpr, SHARED: tl.constexpr):  # fmt: skip
    """Rows ``r`` into their experts' slots, one atomic cursor per expert."""
    e, _ = _slot(ids_ptr, w_ptr, r, n, n_routed, K, SLOTS, EP, SHARED)
    mine = (r < n) & (e < E)
    pos = tl.atomic_add(cursor_ptr + e, 1, mask=mine)
    tl.store(sorted_ptr + pos, r, mask=mine)


@triton.jit
def _count(ids_ptr, w_ptr, w_out_ptr, r, n, n_routed, K: tl.constexpr, SLOTS: tl.constexpr, EP: tl.constexpr,
           SHARED: tl.constexpr):  # fmt: skip
    """Rows ``r``' experts counted ([EP]: rows past the end and the shared slots left out land in the
    last bin), their routing weights written."""
    e, w = _slot(ids_ptr, w_ptr, r, n, n_routed, K, SLOTS, EP, SHARED)
    mine = r < n
    if not SHARED:
        mine = mine & (r % SLOTS < K)
    tl.store(w_out_ptr + r, w, mask=mine)
    return tl.histogram(e, EP)


@triton.jit
def align_in_one_program(ids_ptr, w_ptr, sorted_ptr, block_expert_ptr, npp_ptr, w_out_ptr, cursor_ptr, n, n_routed,
                         cap, K: tl.constexpr, SLOTS: tl.constexpr, E: tl.constexpr, EP: tl.constexpr,
                         BM: tl.constexpr, CHUNK: tl.constexpr, BCHUNK: tl.constexpr,
                         SHARED: tl.constexpr):  # fmt: skip
    """The whole alignment of ``n`` rows by one program (moe_align_kernel's)."""
    bins = tl.arange(0, EP)
    counts = tl.zeros((EP,), dtype=tl.int32)
    for c0 in range(0, n, CHUNK):
        counts += _count(ids_ptr, w_ptr, w_out_ptr, c0 + tl.arange(0, CHUNK), n, n_routed, K, SLOTS, EP, SHARED)
    _lay_out_blocks(counts, bins, cursor_ptr, npp_ptr, block_expert_ptr, cap, E, BM, BCHUNK)
    for c0 in range(0, cap, CHUNK):
        p = c0 + tl.arange(0, CHUNK)
        tl.store(sorted_ptr + p, n, mask=p < cap)  # padding rows read as n (past the end)
    tl.debug_barrier()  # cursors and the padding fill are in place before any row is
    for c0 in range(0, n, CHUNK):
        _place(ids_ptr, w_ptr, sorted_ptr, cursor_ptr, c0 + tl.arange(0, CHUNK), n, n_routed, K, SLOTS, E, EP,
               SHARED)  # fmt: skip


@triton.jit(do_not_specialize=["n", "cap"])  # batch-dependent counts: one compile for all batches
def moe_align_kernel(ids_ptr, w_ptr, sorted_ptr, block_expert_ptr, npp_ptr, w_out_ptr, cursor_ptr, n, n_routed,
                     cap, K: tl.constexpr, SLOTS: tl.constexpr, E: tl.constexpr, EP: tl.constexpr,
                     BM: tl.constexpr, CHUNK: tl.constexpr, BCHUNK: tl.constexpr, SHARED: tl.constexpr,
                     PDL: tl.constexpr = False):  # fmt: skip
    # without SHARED, E is the routed experts only and the shared slots' rows and weights are left
    # to shared_rows (another stream may be writing them)
    if PDL:  # the top-k is the launch before's (pdl.py)
        wait_then_release()
    align_in_one_program(ids_ptr, w_ptr, sorted_ptr, block_expert_ptr, npp_ptr, w_out_ptr, cursor_ptr, n, n_routed,
                         cap, K, SLOTS, E, EP, BM, CHUNK, BCHUNK, SHARED)  # fmt: skip


# Large batches: the same three steps as three launches of many programs (the one program above walks
# every row: at 4096 tokens of Qwen1.5, 32768 rows, torch's sort took about 80 us of the layer on the H200,
# benchmarks/results/profile_fp8_prefill_h200_s12.txt)
@triton.jit(do_not_specialize=["n", "cap"])
def align_count_kernel(ids_ptr, w_ptr, sorted_ptr, counts_ptr, w_out_ptr, n, n_routed, cap, K: tl.constexpr,
                       SLOTS: tl.constexpr, E: tl.constexpr, EP: tl.constexpr, CHUNK: tl.constexpr,
                       SHARED: tl.constexpr):  # fmt: skip
    c = tl.program_id(0)
    bins = tl.arange(0, EP)
    hist = _count(ids_ptr, w_ptr, w_out_ptr, c * CHUNK + tl.arange(0, CHUNK), n, n_routed, K, SLOTS, EP, SHARED)
    tl.atomic_add(counts_ptr + bins, hist, mask=bins < E)
    # this program's share of the padding fill (before the placement launch writes rows)
    share = tl.cdiv(cap, tl.num_programs(0))
    for p0 in range(c * share, (c + 1) * share, CHUNK):
        p = p0 + tl.arange(0, CHUNK)
        tl.store(sorted_ptr + p, n, mask=(p < cap) & (p < (c + 1) * share))


@triton.jit(do_not_specialize=["cap"])
def align_blocks_kernel(counts_ptr, cursor_ptr, npp_ptr, block_expert_ptr, cap, E: tl.constexpr, EP: tl.constexpr,
                        BM: tl.constexpr, BCHUNK: tl.constexpr):  # fmt: skip
    bins = tl.arange(0, EP)
    counts = tl.load(counts_ptr + bins, mask=bins < E, other=0)
    _lay_out_blocks(counts, bins, cursor_ptr, npp_ptr, block_expert_ptr, cap, E, BM, BCHUNK)


@triton.jit(do_not_specialize=["n"])
def align_place_kernel(ids_ptr, w_ptr, sorted_ptr, cursor_ptr, n, n_routed, K: tl.constexpr, SLOTS: tl.constexpr,
                       E: tl.constexpr, EP: tl.constexpr, CHUNK: tl.constexpr, SHARED: tl.constexpr):  # fmt: skip
    r = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    _place(ids_ptr, w_ptr, sorted_ptr, cursor_ptr, r, n, n_routed, K, SLOTS, E, EP, SHARED)


def capacity(rows: int, n_experts: int, bm: int) -> int:
    """Length of sorted_ids: every expert's rows padded to bm, rounded up to bm. At most ``rows``
    experts get rows, so only that many pad: at decode (2 tokens of Qwen1.5's top-4 over 60 experts,
    blocks of 8) that is 8 blocks, not 54, and the GEMM launches a program per block and N tile (the
    empty blocks' programs return at once, but each takes a slot on a multiprocessor)."""
    return (rows + min(n_experts, rows) * (bm - 1) + bm - 1) // bm * bm


@dataclass
class Alignment:
    """One forward's alignment: its outputs, and what the one-program alignment is launched with (by
    :func:`route`)."""

    sorted_ids: torch.Tensor  # [cap] int64: row index, or ``rows`` for padding
    block_expert: torch.Tensor  # [cap / bm] int64
    npp: torch.Tensor  # [1] int64: the rows after padding
    w: torch.Tensor  # [rows] fp32: each row's routing weight
    cursor: torch.Tensor  # [EP] int32: scratch, each expert's next slot
    rows: int
    n_routed: int
    cap: int
    consts: dict  # the constexprs but K (the top-k)

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.sorted_ids, self.block_expert, self.npp, self.w

    def args(self) -> tuple:
        """align_in_one_program's arguments after the top-k's ids and weights, constexprs but K left out."""
        return self.sorted_ids, self.block_expert, self.npp, self.w, self.cursor, self.rows, self.n_routed, self.cap


def alignment(t: int, k: int, n_experts: int, n_routed: int, bm: int, shared: bool = True,
              w: torch.Tensor | None = None, device: torch.device | str = "cpu") -> Alignment:  # fmt: skip
    """The buffers and constants of aligning ``t`` tokens' top-``k`` (:func:`route`'s arguments)."""
    slots = k + n_experts - n_routed
    rows = t * slots
    if w is None:
        w = torch.empty(rows, dtype=torch.float32, device=device)
    placed = n_experts if shared else n_routed
    cap = capacity(rows if shared else t * k, placed, bm)
    ep = triton.next_power_of_2(n_experts + 1)  # one bin more: rows past the end land there
    # CHUNK at least 256: 8 warps hold 256 lanes whatever the tensor, so smaller chunks cost the
    # same time and only add compiled variants
    consts = dict(SLOTS=slots, E=placed, EP=ep, BM=bm, CHUNK=min(1024, triton.next_power_of_2(max(rows, 256))),
                  BCHUNK=64, SHARED=shared)  # fmt: skip
    return Alignment(torch.empty(cap, dtype=torch.int64, device=device),
                     torch.empty(cap // bm, dtype=torch.int64, device=device),
                     torch.empty(1, dtype=torch.int64, device=device), w,
                     torch.empty(ep, dtype=torch.int32, device=device), rows, n_routed, cap, consts)  # fmt: skip


def route(topk_ids: torch.Tensor, topk_weights: torch.Tensor, n_experts: int, n_routed: int, bm: int,
          shared: bool = True, w: torch.Tensor | None = None):  # fmt: skip
    """(sorted_ids [cap] int64 (row index, or rows for padding), block_expert [cap / bm] int64,
    num_post_pad [1], weights [rows] fp32) for top-k routing [T, k] with shared experts
    ``n_routed..n_experts`` appended to every token; row = token * slots + slot. An id of -1 routes
    to expert 0 with weight 0 (in the same launch: no masking ops before it). No host sync.
    ``shared=False`` places the routed rows only and leaves the shared rows' weights in ``w``
    (written here when given) untouched: :func:`shared_rows` lays those out."""
    t, k = topk_ids.shape
    dev = topk_ids.device
    al = alignment(t, k, n_experts, n_routed, bm, shared, w, dev)
    ids, tw = topk_ids.contiguous(), topk_weights.contiguous()
    c = al.consts
    if al.rows > KERNEL_MAX_ROWS:
        counts = torch.zeros(c["EP"], dtype=torch.int32, device=dev)
        grid = (triton.cdiv(al.rows, LARGE_CHUNK),)
        align_count_kernel[grid](ids, tw, al.sorted_ids, counts, al.w, al.rows, n_routed, al.cap, K=k,
                                 SLOTS=c["SLOTS"], E=c["E"], EP=c["EP"], CHUNK=LARGE_CHUNK, SHARED=shared,
                                 num_warps=4)  # fmt: skip
        align_blocks_kernel[(1,)](counts, al.cursor, al.npp, al.block_expert, al.cap, E=c["E"], EP=c["EP"], BM=bm,
                                  BCHUNK=c["BCHUNK"], num_warps=8)  # fmt: skip
        align_place_kernel[grid](ids, tw, al.sorted_ids, al.cursor, al.rows, n_routed, K=k, SLOTS=c["SLOTS"],
                                 E=c["E"], EP=c["EP"], CHUNK=LARGE_CHUNK, SHARED=shared, num_warps=4)  # fmt: skip
        return al.outputs()
    moe_align_kernel[(1,)](ids, tw, *al.args(), K=k, **c, PDL=pdl(dev), num_warps=8, **launch(dev))
    return al.outputs()


@triton.jit(do_not_specialize=["t"])  # batch-dependent: one compile for all batches
def shared_rows_kernel(sorted_ptr, block_expert_ptr, npp_ptr, w_out_ptr, t, n_routed, K: tl.constexpr,
                       SLOTS: tl.constexpr, BM: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
    """Shared expert s (program s) gets every token in order, in blocks of BM: row token * SLOTS + K + s,
    padding reads row t * SLOTS (past the end); its routing weight is 1."""
    s = tl.program_id(0)
    per = tl.cdiv(t, BM) * BM
    if s == 0:
        tl.store(npp_ptr, per * (SLOTS - K))
    for c0 in range(0, per, CHUNK):
        i = c0 + tl.arange(0, CHUNK)
        tl.store(sorted_ptr + s * per + i, tl.where(i < t, i * SLOTS + K + s, t * SLOTS), mask=i < per)
        tl.store(w_out_ptr + i * SLOTS + K + s, tl.full((CHUNK,), 1.0, tl.float32), mask=i < t)
        b = c0 // BM + tl.arange(0, CHUNK // BM)
        tl.store(block_expert_ptr + s * (per // BM) + b, tl.full((CHUNK // BM,), 0, tl.int64) + n_routed + s,
                 mask=b < per // BM)  # fmt: skip


def shared_rows(t: int, k: int, n_experts: int, n_routed: int, bm: int, w: torch.Tensor):
    """(sorted_ids, block_expert, num_post_pad) of the shared experts' rows (those of :func:`route`'s
    row numbering: row = token * slots + slot), which need no routing; writes their weight 1 into ``w``."""
    n_shared = n_experts - n_routed
    per = -(-t // bm) * bm
    dev = w.device
    sorted_ids = torch.empty(n_shared * per, dtype=torch.int64, device=dev)
    block_expert = torch.empty(n_shared * per // bm, dtype=torch.int64, device=dev)
    npp = torch.empty(1, dtype=torch.int64, device=dev)
    chunk = max(bm, min(1024, triton.next_power_of_2(per)))
    shared_rows_kernel[(n_shared,)](sorted_ids, block_expert, npp, w, t, n_routed, K=k, SLOTS=k + n_shared, BM=bm,
                                    CHUNK=chunk, num_warps=4)  # fmt: skip
    return sorted_ids, block_expert, npp


def extend_routing(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, n_experts: int, n_routed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the shared experts to every token's top-k, weight 1: ids [T, slots] int64, weights fp32
    (an id of -1 becomes expert 0 with weight 0, as in moe_align_kernel)."""
    t = topk_ids.shape[0]
    ids = topk_ids.to(torch.int64).clamp(min=0)
    w = torch.where(topk_ids >= 0, topk_weights.to(torch.float32), 0.0)
    n_shared = n_experts - n_routed
    if n_shared:
        dev = ids.device
        ids = torch.cat([ids, torch.arange(n_routed, n_experts, device=dev).expand(t, n_shared)], dim=1)
        w = torch.cat([w, torch.ones(t, n_shared, device=dev)], dim=1)
    return ids, w
