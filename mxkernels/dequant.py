"""Prefill on dequantized weights: a layer's weight-only experts written out in bf16, then the bf16 GEMM.

With hundreds of rows per expert a GEMM is bound by its MMAs, not by its weights' bytes, and
dequantizing each weight tile inside the GEMM (once per row block that reads it) costs more than
the bytes save: on the H200 at 4096 tokens (Qwen1.5-MoE's shape) the mixed 3.31-bit layer's GEMMs
took 2376 us against 1562 for the same layer in bf16 (benchmarks/results/profile_prefill_h200_s13.txt).
Here each weight is dequantized once per forward, into a scratch buffer of the layer's largest GEMM
in bf16 (E x N x K: 738 MB for Qwen1.5's gate/up, shared experts included), and the GEMM kernel
runs the layer as bf16 experts reading it. The weights it writes are the ones the fused path
computes in its tiles, bit for bit.

fp8 and integer-activation experts keep their own branches: they read their codes as they are.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from mxkernels.arena import CODE_WONLY, Arena
from mxkernels.moe_gemm import INTERPRET, _bf16, _int_unpack, _int_words, tiled_scale_at

WONLY_MASK = sum(1 << c for c in CODE_WONLY.values())  # the kernel codes this path dequantizes
BN, WARPS = 64, 4  # a program's rows of one expert's weight and its warps
SKIP = 15  # a kernel code with no branch: the GEMM's programs for such an expert return at once


@triton.jit(do_not_specialize=["first", "keep_others"])
def dequant_kernel(meta_ptr, meta_out_ptr, wi_ptr, wb_ptr, sc_ptr, zp_ptr, out_ptr, N, K, E, first, keep_others,
                   CODES: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, K128: tl.constexpr, F32: tl.constexpr,
                   EP: tl.constexpr, SKIP_CODE: tl.constexpr):  # fmt: skip
    """Program (i, N tile, K tile): expert ``first + i``'s bf16 weights [N, K] at ``out`` + i * N * K,
    dequantized as moe_gemm._wonly_step does (KMAJOR), or copied for a bf16 expert; other codes write
    nothing. Program (0, 0, 0) writes the view's meta for all ``E`` experts (moe_gemm's six fields):
    the chunk's bf16 and weight-only experts as bf16 ones reading ``out``, the others of those skipped,
    and the remaining codes (fp8, integer activations) kept where ``keep_others``, else skipped."""
    i = tl.program_id(0)
    pid_n = tl.program_id(1)
    k0 = tl.program_id(2) * BK
    if (i == 0) & (pid_n == 0) & (k0 == 0):
        ex = tl.arange(0, EP)[:, None]
        f = tl.arange(0, 8)[None, :]
        valid = (ex < E) & (f < 6)
        rows = tl.load(meta_ptr + ex * 6 + f, mask=valid, other=0)
        codes = tl.sum(tl.where(f == 0, rows, 0), 1)[:, None]
        inside = (ex >= first) & (ex < first + tl.num_programs(0))
        new = tl.where(codes <= 5, tl.where(inside, 0, SKIP_CODE), tl.where(keep_others != 0, codes, SKIP_CODE))
        rows = tl.where(f == 0, new, rows)
        rows = tl.where((f == 1) & (codes <= 5) & inside, (ex - first).to(tl.int64) * N * K, rows)
        tl.store(meta_out_ptr + ex * 6 + f, rows, mask=valid)
    meta = meta_ptr + (first + i) * 6
    code = tl.load(meta).to(tl.int32)
    w_off = tl.multiple_of(tl.load(meta + 1), 16)
    s_off = tl.multiple_of(tl.load(meta + 2), 16)
    z_off = tl.multiple_of(tl.load(meta + 3), 16)
    group = tl.load(meta + 4).to(tl.int32)
    dst = i.to(tl.int64) * N * K
    cols = pid_n * BN + tl.arange(0, BN)
    mask_n = cols < N
    kk = k0 + tl.arange(0, BK)
    mask = mask_n[:, None] & (kk[None, :] < K)
    out = out_ptr + dst + cols[:, None] * K + kk[None, :]
    if CODES & 1:
        if code == 0:
            tl.store(out, tl.load(wb_ptr + w_off + cols[:, None] * K + kk[None, :], mask=mask), mask=mask)
    for c in tl.static_range(1, 6):  # 1, 2, 3, 4 and 8 bits (arena.CODE_WONLY)
        if CODES & (1 << c):
            if code == c:
                hi, lo = _int_words(wi_ptr, w_off, cols, k0, K, mask_n, c + 3 * (c == 5), BK, 1, K128)
                q = _int_unpack(hi, lo, c + 3 * (c == 5), BK, 1)
                g = cols * (K // group) + k0 // group  # BK is at most the smallest group: one per tile
                if K128 == 2:  # arena.tile_rows' order
                    g = tiled_scale_at(cols, K // group, k0 // group)
                s = tl.load(sc_ptr + s_off + g, mask=mask_n, other=0.0).to(tl.float32)
                z = tl.load(zp_ptr + z_off + g, mask=mask_n, other=0.0).to(tl.float32)
                tl.store(out, _bf16((q.to(tl.float32) - z[:, None]) * s[:, None], F32), mask=mask)


def view_codes(mask: int) -> int:
    """The kernel codes of a dequantized view of an arena whose codes are ``mask``."""
    return (mask & ~WONLY_MASK & ~1) | (1 if mask & (WONLY_MASK | 1) else 0)


def dequantized_view(arena: Arena) -> Arena:
    """``arena`` as the GEMM sees it after :func:`dequantize` (codes, masks and groups), its weights
    and meta not written yet: what picking tiles and launches needs."""
    rest = arena.codes_mask & ~WONLY_MASK & ~1  # codes that keep their branch: their groups still bound BK
    return dataclasses.replace(arena, codes_mask=view_codes(arena.codes_mask),
                               extra_codes=view_codes(arena.kernel_mask) & ~view_codes(arena.codes_mask),
                               min_group=arena.min_group if rest else 1 << 30)  # fmt: skip


def scratch_elems(arena: Arena, count: int | None = None) -> int:
    """bf16 elements of the scratch buffer for ``count`` experts of ``arena`` (default: all)."""
    return (arena.n_experts if count is None else count) * arena.n * arena.k


def dequantize(arena: Arena, scratch: torch.Tensor, first: int = 0, count: int | None = None, bn: int = BN,
               warps: int = WARPS) -> Arena:  # fmt: skip
    """The arena with its bf16 and weight-only experts ``first`` .. ``first + count - 1`` (default: all)
    as bf16 experts reading ``scratch`` (bf16, at least :func:`scratch_elems` of ``count``), written here,
    and every other bf16 or weight-only expert skipped; fp8 and integer-activation experts run in the
    view of the chunk with ``first`` 0 only. One launch of ``bn`` rows by a K tile per program
    (benchmarks/dequant_tiles.py times others). A layer runs chunk by chunk where its scratch is capped."""
    count = arena.n_experts - first if count is None else count
    if not (0 <= first and 0 < count and first + count <= arena.n_experts):
        raise ValueError(f"experts {first}..{first + count - 1} of {arena.n_experts}")
    if scratch.dtype != torch.bfloat16 or scratch.numel() < scratch_elems(arena, count):
        raise ValueError("the scratch buffer must be bf16 of at least experts x N x K elements")
    meta = torch.empty_like(arena.meta)
    bk = max(32, min(128, arena.min_group))
    grid = (count, triton.cdiv(arena.n, bn), triton.cdiv(arena.k, bk))
    dequant_kernel[grid](arena.meta, meta, arena.wi, arena.wb, arena.sc, arena.zp, scratch, arena.n, arena.k,
                         arena.n_experts, first, int(first == 0), CODES=arena.codes_mask & (WONLY_MASK | 1), BN=bn,
                         BK=bk, K128=arena.k128, F32=INTERPRET, EP=triton.next_power_of_2(arena.n_experts),
                         SKIP_CODE=SKIP, num_warps=warps)  # fmt: skip
    view = dequantized_view(arena)
    if first:  # no activations to quantize for the fp8 and integer experts: the first chunk's launches run them
        view = dataclasses.replace(view, codes_mask=1, extra_codes=view.kernel_mask & ~1)
    return dataclasses.replace(view, meta=meta, wb=scratch, raw=None)
