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
from mxkernels.moe_gemm import INTERPRET, _bf16, _int_unpack, _int_words

WONLY_MASK = sum(1 << c for c in CODE_WONLY.values())  # the kernel codes this path dequantizes
BN, WARPS = 64, 4  # a program's rows of one expert's weight and its warps


@triton.jit
def dequant_kernel(meta_ptr, meta_out_ptr, wi_ptr, wb_ptr, sc_ptr, zp_ptr, out_ptr, N, K, CODES: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr, K128: tl.constexpr, F32: tl.constexpr):  # fmt: skip
    """Program (expert, N tile, K tile): the expert's bf16 weights [N, K] at ``out`` + expert * N * K,
    dequantized as moe_gemm._wonly_step does (KMAJOR), or copied for a bf16 expert; other codes write
    nothing. Program (expert, 0, 0) writes the expert's row of the view's meta (moe_gemm's six fields)."""
    e = tl.program_id(0)
    pid_n = tl.program_id(1)
    k0 = tl.program_id(2) * BK
    meta = meta_ptr + e * 6
    code = tl.load(meta).to(tl.int32)
    w_off = tl.multiple_of(tl.load(meta + 1), 16)
    s_off = tl.multiple_of(tl.load(meta + 2), 16)
    z_off = tl.multiple_of(tl.load(meta + 3), 16)
    group = tl.load(meta + 4).to(tl.int32)
    mine = code <= 5  # bf16 or weight-only: a bf16 expert of the view
    dst = e.to(tl.int64) * N * K
    if (pid_n == 0) & (k0 == 0):
        f = tl.arange(0, 8)
        row = tl.load(meta + f, mask=f < 6, other=0)
        row = tl.where(mine & (f == 0), 0, row)
        row = tl.where(mine & (f == 1), dst, row)
        tl.store(meta_out_ptr + e * 6 + f, row, mask=f < 6)
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


def scratch_elems(arena: Arena) -> int:
    return arena.n_experts * arena.n * arena.k


def dequantize(arena: Arena, scratch: torch.Tensor, bn: int = BN, warps: int = WARPS) -> Arena:
    """The arena with every bf16 and weight-only expert as a bf16 expert reading ``scratch`` (bf16, at
    least :func:`scratch_elems`), written here; one launch of ``bn`` rows by a K tile per program
    (benchmarks/dequant_tiles.py times others)."""
    if scratch.dtype != torch.bfloat16 or scratch.numel() < scratch_elems(arena):
        raise ValueError("the scratch buffer must be bf16 of at least experts x N x K elements")
    meta = torch.empty_like(arena.meta)
    bk = max(32, min(128, arena.min_group))
    grid = (arena.n_experts, triton.cdiv(arena.n, bn), triton.cdiv(arena.k, bk))
    dequant_kernel[grid](arena.meta, meta, arena.wi, arena.wb, arena.sc, arena.zp, scratch, arena.n, arena.k,
                         CODES=arena.codes_mask & (WONLY_MASK | 1), BN=bn, BK=bk, K128=arena.k % 128 == 0,
                         F32=INTERPRET, num_warps=warps)  # fmt: skip
    return dataclasses.replace(dequantized_view(arena), meta=meta, wb=scratch, raw=None)
