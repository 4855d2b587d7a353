"""The decode grouped GEMM with weights loaded straight into MMA registers (Gluon).

Triton gives no say over the register layout of a dot operand, so the Triton
kernel's dequantized weight tile goes through shared memory to reach the MMA,
which bounds it at 2 to 64 tokens (benchmarks/README.md, ncu). Gluon, Triton's
layout-explicit dialect, lets a tensor be *born* in the operand layout.

The order of K inside a tile is free as long as weights and activations agree
on it. Of a 128-deep K tile each of the 4 lanes of an ``mma.sync`` m16n8k16 row
group takes 32 consecutive k (one 16-byte load per row at 4 bits), and the
kernel assigns those k to the MMA's k slots as a lane's activations arrive:
k and k + 1 in one register. The arena holds the codes in the same pairs
(packing.kernel_order: codes k and k + 1 of a word 16 bits apart), so
``((w >> bt) & mask) | 0x43004300`` makes one such register of two bf16
128 + q (one instruction per code pair in the sm_90 SASS), and the
activations are used as loaded (in checkpoint order codes t and t + 16/b shared
a register, and the activations had to be paired alike). With the loop carrying
words, not bf16 (``_halves``), the w4 gate/up loop went from 42 PRMT in 275
instructions per K tile to 8 in 236 (sm_90 SASS). The reshapes and
permutes below only rename registers (``convert_layout(...,
assert_trivial=True)`` proves it at compile time), so nothing passes through
shared memory.

As in the Triton kernel's decode layout the zero point and scale come after
the MMA: per tile ``s * (W.a - (z + 128) sum(a))``, the sum from one more MMA
of a tile of ones (3 bits: its two planes joined into one register per pair of codes, ``_codes3``; 8 bits:
its two nibbles in two MMAs, since 128 + code does not fit bf16). A tile never spans two
quantization groups, so experts need groups that are multiples of 128 and K a multiple of 128 (``eligible``); the
next tile's codes, scales and activations are loaded before this tile's
products (loop-carried registers). Same grid, routing arguments and results
as :func:`mxkernels.moe_gemm.mx_moe_gemm_kernel` with SWAP, for layers whose
experts are bf16 or weight-only (the launch takes it for decode where a
layer's schemes were timed on a GPU: mxkernels/moe.py, ``_gluon_decode``).
"""

from __future__ import annotations

import os

import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

WARPS = 4  # along the weight rows: 16 rows per warp and MMA tile
BN = 16 * WARPS  # weight rows per program: one MMA tile per warp (128: two)
BK = 128  # 4 lanes x 32 consecutive k
KERNEL_CODES = 0b111111  # kernel codes it runs: bf16 (0) and weight-only 1, 2, 3, 4 and 8 bits (arena.CODE_WONLY)
# Code sets within 1, 2 and 4 bits compile to 87 registers (gate/up, sm_90); with bf16, 3 or 8 bits
# the kernel holds 106 to 158. Only the narrow ones gain from two MMA tiles of rows per warp
# (BN 128): on the H200 they run up to 11% faster at 16 and 64 tokens, the wide ones slower
# (results/moe_layer_h200_layouts.md; w3 then held 128).
NARROW_CODES = 0b10110
# 128.0 in both bf16 halves: ORed onto two codes 16 bits apart, two bf16 128 + code. Passed as an
# argument, not a constant, so that it sits in a register and the AND and the OR fuse into one LOP3
MAGIC = 0x43004300
# inline PTX where the kernel is compiled; the interpreter (CI's tests, TRITON_INTERPRET=1) runs none
_ASM = gl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")
_WARPS = gl.constexpr(WARPS)
_BK = gl.constexpr(BK)
_MINUS_128 = gl.constexpr(0xC300C300 - (1 << 32))  # two bf16 -128, as an int32
# Tiles.staged: the ring of K tiles of activations in shared memory. The buffer a copy lands in was last read three
# tiles before, so one barrier a tile orders them (the sm_90 K loop holds a second: Triton's own hazard analysis)
STAGES = 4
_STAGES = gl.constexpr(STAGES)
# Triton 3.6's names, then 3.9's
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared


def eligible(codes_mask: int, k: int, min_group: int) -> bool:
    """Whether an arena can run on this kernel: the codes its experts use (a slab's: its
    candidates'), and whole groups per K tile."""
    return not codes_mask & ~KERNEL_CODES and k % BK == 0 and min_group % BK == 0


@gluon.constexpr_function
def _powers(n, at, rank):
    """Bases 1, 2, 4 .. n / 2 along dimension ``at`` of a rank-``rank`` tensor."""
    out, b = [], 1
    while b < n:
        out.append([b if d == at else 0 for d in range(rank)])
        b *= 2
    return out


@gluon.constexpr_function
def _weight_lanes(bits, bn):
    """[bn, 4, width]: lane (g, c) of warp w holds rows 16w + g and 16w + g + 8 (+ 16 WARPS for a
    second MMA tile: the rows of the MMA's A operand) and the whole chunk c: ``width`` 4-byte
    words of codes, or 16 words of two bf16 (as ``_acts``)."""
    width = 16 if bits == 16 else bits
    regs = _powers(width, 2, 3) + [[8, 0, 0]] + [[16 * WARPS * t[0], 0, 0] for t in _powers(bn // (16 * WARPS), 0, 3)]
    warps = [[16 * w[0], 0, 0] for w in _powers(WARPS, 0, 3)]
    return gl.DistributedLinearLayout(regs, [[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]], warps, [],
                                      [bn, 4, width])  # fmt: skip


@gluon.constexpr_function
def _lane_tokens(bm):
    """[4, 16, bm]: lane (g, c) holds tokens g (and g + 8) and the 32 k of chunk c as 16 words of two
    bf16, in every warp: the B operand's lanes."""
    regs = _powers(16, 1, 3) + [[0, 0, 8 * b[2]] for b in _powers(bm // 8, 2, 3)]
    warps = [[0, 0, 0] for _ in _powers(WARPS, 0, 3)]
    return gl.DistributedLinearLayout(regs, [[1, 0, 0], [2, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4]], warps, [],
                                      [4, 16, bm])  # fmt: skip


@gluon.constexpr_function
def _staged_rows(bm):
    """[2 bm, 32] words of a K tile's activations in shared memory (Tiles.staged), a token t's 64 in rows 2t and
    2t + 1 of 128 bytes (32 banks), held as ``_lane_tokens`` holds them: row 2t + c // 2, column 16 (c % 2) + j.
    With the rows swizzled 16 bytes at a time (``_STAGED``), the 8 lanes of a quarter warp (tokens 2m and 2m + 1,
    c 0 to 3) read 8 different 16-byte bank groups."""
    regs = [[0, 1], [0, 2], [0, 4], [0, 8]] + [[16 * t[0], 0] for t in _powers(bm // 8, 0, 2)]
    warps = [[0, 0] for _ in _powers(WARPS, 0, 2)]
    return gl.DistributedLinearLayout(regs, [[0, 16], [1, 0], [2, 0], [4, 0], [8, 0]], warps, [], [2 * bm, 32])


# [STAGES, 2 BM, 32] words: rows of 128 bytes whose 16-byte vectors are XORed with the row's low 3 bits
_STAGED = gl.constexpr(gl.SwizzledSharedLayout(4, 1, 8, [1, 0]))  # of one stage: an allocation's first dim is its ring
# the copy into it: 16 bytes a lane, a row by 8 lanes
_COPY = gl.constexpr(gl.BlockedLayout([1, 4], [4, 8], [WARPS, 1], [1, 0]))
# Tiles.wgmma: a K tile's activations as the warpgroup MMA reads its B operand, [BM, 128] bf16 (K-major rows of 256
# bytes, swizzled 128 bytes wide), copied in as [BM, 64] int32 words (pairs of k) in a ring of WG_STAGES buffers, one
# tile ahead: the buffer a copy lands in was last read two tiles before, so one barrier a tile orders them
WG_STAGES = 3
_WG_STAGES = gl.constexpr(WG_STAGES)
_WG_B = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2))
_WG_WORDS = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2))
# the copy: 4 bytes a lane (the words change order, _stage_wg), a warp along a token's 64 words
_WG_COPY = gl.constexpr(gl.BlockedLayout([1, 1], [1, 32], [WARPS, 1], [1, 0]))
# Triton 3.6's name of a shared memory view's reinterpret, then 3.9's
_OLD_REINTERPRET = gl.constexpr(hasattr(gl.shared_memory_descriptor, "_reinterpret"))


@gluon.jit
def _k_order(x):
    """[R, 4 (c), 8 (s), 2 (h), 2 (p)] -> [R, 128]: the MMA's k = 16 s + 8 h + 2 c + p."""
    x = gl.permute(x, [0, 2, 3, 1, 4])
    return gl.reshape(x, [x.shape[0], 128])


@gluon.jit
def _chunk_order(x):
    """[R, 4, 32] with j the k inside a lane's chunk -> [R, 128] in MMA order, the pair (p) of a
    register j and j + 1: j = 2 (2 s + h) + p."""
    return _k_order(gl.reshape(x, [x.shape[0], 4, 8, 2, 2]))


@gluon.jit
def _halves(q):
    """int32 words -> their two bf16 on a new last dimension, the low half first: registers renamed
    only, where the words are what a loop carries (bf16 values carried across a loop became 16-bit
    values of their own, packed into registers again by a PRMT per pair: sm_90 SASS)."""
    return gl.join(q.to(gl.int16), (q >> 16).to(gl.int16)).to(gl.bfloat16, bitcast=True)


@gluon.jit
def _codes(words, magic, B: gl.constexpr, A_OP: gl.constexpr, M: gl.constexpr = 0, OFF: gl.constexpr = 0,
           G: gl.constexpr = 1):  # fmt: skip
    """[BN, 4, B] words of B-bit codes -> [BN, 128] bf16 128 + code in the A operand's layout, k in
    the order of ``_chunk_order``; with M, 128 + the M-bit field at bit OFF of each code; with G, G
    fields a shift, in place (``_pairs``)."""
    return _operand(_pairs(words, magic, B, B if M == 0 else M, OFF, 0, 16 // B, 1, G=G), A_OP)


@gluon.constexpr_function
def _per_shift(bits):
    """Fields of ``bits`` a shift when each stays in place (``_pairs``' G): as many as bf16's 7 bits of
    mantissa hold, 7 of 1 bit, 3 of 2 and 1 of 4."""
    return (7 - bits) // bits + 1


@gluon.jit
def _pairs(w, magic, B: gl.constexpr, M: gl.constexpr, OFF: gl.constexpr, T: gl.constexpr, N: gl.constexpr,
           STEP: gl.constexpr, AT: gl.constexpr = 0, MASKED: gl.constexpr = True, G: gl.constexpr = 1):  # fmt: skip
    """Fields of M bits at bit OFF of codes T, T + STEP, .. (N of them) of B bits in each word's low
    half, each with its partner 16 bits up (in the arena's pairs, codes 2T and 2T + 1), as two bf16
    128 + field in an int32 (one shift and one LOP3): [..., 2, .., 2], the last dimension the lowest bit
    of the index. Without MASKED only shifted, the field at bit AT of each half (``_codes3``).
    G > 1 (1 and 2-bit codes): G codes a shift, code T left at bit p = B (T % G) of the shifted word, so
    128 + 2^p code (p + B <= 7, bf16's bits of mantissa), with the activations scaled by 2^-p
    (``_placed_acts``): 128 a 2^-p + code a. 2 bits: 2 shifts and 8 LOP3 a word, against 7 and 8."""
    if N == 1:
        if MASKED:
            PL: gl.constexpr = B * (T % G)
            return ((w >> (T * B + OFF - PL)) & ((((1 << M) - 1) << PL) * 0x10001)) | magic
        elif T * B + OFF >= AT:
            return w >> (T * B + OFF - AT)
        else:
            return w << (AT - T * B - OFF)
    else:
        return gl.join(_pairs(w, magic, B, M, OFF, T, N // 2, 2 * STEP, AT, MASKED, G),
                       _pairs(w, magic, B, M, OFF, T + STEP, N // 2, 2 * STEP, AT, MASKED, G))  # fmt: skip


@gluon.jit
def _place_sums(w, B: gl.constexpr, T: gl.constexpr, N: gl.constexpr, STEP: gl.constexpr, G: gl.constexpr):
    """``_pairs``' tree with G as a constant A operand (registers only) whose MMA with the placed
    activations a' (``_placed_acts``) gives, in the rows g of each MMA tile, sum(a) (2^p, p the code's
    place), and in the rows g + 8, -128 sum(a') (``_row_halves``)."""
    if N == 1:
        WL: gl.constexpr = _weight_lanes(B, w.shape[0])
        r = gl.arange(0, w.shape[0], layout=gl.SliceLayout(1, gl.SliceLayout(2, WL)))[:, None, None]
        unscale = ((127 + B * (T % G)) << 7) * 0x10001  # two bf16 2^p
        return gl.where((r & 8) != 0, _MINUS_128, unscale) + gl.zeros_like(w)
    else:
        return gl.join(_place_sums(w, B, T, N // 2, 2 * STEP, G), _place_sums(w, B, T + STEP, N // 2, 2 * STEP, G))


@gluon.jit
def _row_halves(x, MMA: gl.constexpr):
    """[BN, BM] in the MMA's layout -> its rows g and its rows g + 8 of each 16, each in both
    (one lane holds both: registers renamed only)."""
    y = gl.permute(gl.reshape(x, [x.shape[0] // 16, 2, 8, x.shape[1]]), [0, 2, 3, 1])
    lo, hi = gl.split(y)
    lo = gl.reshape(gl.permute(gl.join(lo, lo), [0, 3, 1, 2]), [x.shape[0], x.shape[1]])
    hi = gl.reshape(gl.permute(gl.join(hi, hi), [0, 3, 1, 2]), [x.shape[0], x.shape[1]])
    return gl.convert_layout(lo, MMA, assert_trivial=True), gl.convert_layout(hi, MMA, assert_trivial=True)


@gluon.jit
def _codes3(lo, hi, magic, A_OP: gl.constexpr):
    """3-bit codes from their planes, [BN, 4, 2] words of the low two bits and [BN, 4, 1] of the high
    one -> [BN, 128] bf16 128 + code, as ``_codes``: both planes' fields of a pair of codes in one
    register, then one MMA, where each plane took MMAs of its own. Two shifts and two LOP3 a register
    (the masks and ORs in PTX: compiled from the expression, the magic's OR took a third LOP3)."""
    lo_s = gl.reshape(_pairs(lo, magic, 2, 2, 0, 0, 8, 1, 0, False), [lo.shape[0], 4, 16])
    hi_s = gl.reshape(_pairs(hi, magic, 1, 1, 0, 0, 16, 1, 2, False), [hi.shape[0], 4, 16])
    if _ASM:  # (hi & 0x40004) | magic, then (lo & 0x30003) | that: LUT 0xEA is (a & b) | c
        q = gl.inline_asm_elementwise(
            "{ .reg .b32 t; lop3.b32 t, $2, 0x40004, $3, 0xEA; lop3.b32 $0, $1, 0x30003, t, 0xEA; }", "=r,r,r,r",
            [lo_s, hi_s, gl.zeros_like(lo_s) + magic], dtype=gl.int32, is_pure=True, pack=1)  # fmt: skip
    else:
        q = ((hi_s & 0x40004) | magic) | (lo_s & 0x30003)
    return _operand(q, A_OP)


@gluon.jit
def _bf16_operand(w, A_OP: gl.constexpr):
    """[BN, 4, 16] words of two bf16 weights (``_weight_ptrs``, bf16 experts) -> [BN, 128] in the A operand's layout."""
    return gl.convert_layout(_chunk_order(gl.reshape(_halves(w), [w.shape[0], 4, 32])), A_OP, assert_trivial=True)


@gluon.jit
def _operand(pairs, A_OP: gl.constexpr):
    """[BN, 4, ...] int32 registers of two bf16 (``_pairs``) -> [BN, 128] bf16 in the A operand's layout."""
    q = gl.reshape(_halves(pairs), [pairs.shape[0], 4, 8, 2, 2])
    return gl.convert_layout(_k_order(q), A_OP, assert_trivial=True)


@gluon.jit
def _weight_ptrs(wi_ptr, wb_ptr, rb, r0, N, k0, K, BITS: gl.constexpr, BN: gl.constexpr, P: gl.constexpr = 0,
                 LOW: gl.constexpr = 0, TILED: gl.constexpr = False):  # fmt: skip
    """One K tile's bf16 weights, or codes of one bit plane (P bits wide, LOW bits below it, whose
    planes come first in a row; P 0: the whole code), of rows ``rb + r0 ..``, in the lanes' layout.
    Rows past N (a partial tile) read row N - 1, whose results are never stored, so no load needs
    a mask. TILED: the codes in arena.tile_words' order, where a warp's 16 rows of a K tile are one
    contiguous block (lanes of 8 rows load 512 bytes in a row at 4 bits)."""
    WL: gl.constexpr = _weight_lanes(BITS if P == 0 else P, BN)
    c = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, WL)))[None, :, None]
    r = rb + gl.minimum(r0 + gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, WL))), N - 1)[:, None, None]
    if BITS == 16:
        j = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, WL)))[None, None, :]
        return (wb_ptr + r * K + k0).to(gl.pointer_type(gl.int32)) + c * 16 + j
    else:
        W: gl.constexpr = BITS if P == 0 else P
        i = gl.arange(0, W, layout=gl.SliceLayout(0, gl.SliceLayout(1, WL)))[None, None, :]
        if TILED:
            tile = wi_ptr + (r >> 4) * (K // 32 * BITS * 16) + (r & 15) * (4 * W) + 64 * LOW + (k0 >> 7) * (64 * BITS)
            return tile + c * W + i
        return wi_ptr + r * (K // 32 * BITS) + K // 32 * LOW + (k0 >> 5) * W + c * W + i  # k0 >= 0: a shift


@gluon.jit
def _scales(sc_ptr, zp_ptr, rb, r0, N, k0, gpr, inv_tpg, BITS: gl.constexpr, BN: gl.constexpr,
            MMA: gl.constexpr, PLACE: gl.constexpr = False, TILED: gl.constexpr = False):  # fmt: skip
    """One K tile's scale per row, and its zero point plus the offset the codes carry into the MMA
    (``_product``): 1 and 0 for bf16. ``gpr``: groups per row; ``inv_tpg``: 1 / (K tiles per group). TILED:
    scales and zeros in arena.tile_rows' order (a row group's 16 of a K tile in one sector, rows r and r + 8
    side by side: ``_pair_loads``)."""
    if BITS == 16:
        s = gl.full([BN], 1.0, gl.float32, layout=gl.SliceLayout(1, MMA))
        return s, s
    else:
        # the tile's group, k0 // group, without the integer division by a runtime value (13 instructions a
        # tile in the sm_90 SASS): (tile + 1/2) / (tiles per group) is at least 1 / (2 tiles per group) from a
        # whole number, far more than fp32's error on quotients below 2^13
        tg = (((k0 >> 7).to(gl.float32) + 0.5) * inv_tpg).to(gl.int32)
        # 8 bits: 16 (128 + hi) + (128 + lo); otherwise 128 + code; codes in place: none (``_product``)
        offset: gl.constexpr = 2176.0 if BITS == 8 else (0.0 if PLACE and BITS <= 2 else 128.0)
        if TILED:
            s, z = _pair_loads(sc_ptr, zp_ptr, rb, r0, N, tg, gpr, BN, MMA)
            return s, z + offset
        rows = rb + gl.minimum(r0 + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA)), N - 1)
        g = rows * gpr + tg
        return gl.load(sc_ptr + g).to(gl.float32), gl.load(zp_ptr + g).to(gl.float32) + offset


@gluon.jit
def _pair_loads(sc_ptr, zp_ptr, rb, r0, N, tg, gpr, BN: gl.constexpr, MMA: gl.constexpr):
    """The tiled scales and zeros of rows ``rb + r0 ..`` for K group ``tg``, as fp32 in the MMA's row layout. A lane
    holds rows g and g + 8 of each 16 (the MMA tile's), which arena.tile_rows puts side by side: one 4-byte load a
    row group for both, where a load per row with its own address took about 70 of gate/up's 510 instructions a K
    tile (sm_90 SASS, Triton 3.6: 16 two-byte loads, each with its address and a register for its element size).
    Row groups past the rows' last (a partial tile) read the last one's, whose results are never stored. ``rb`` (0,
    or up's first row: N) is a whole number of row groups, as this kernel's K, and so every N, is a multiple of 128."""
    PL: gl.constexpr = gl.BlockedLayout([1, 1, 2], [1, 8, 4], [_WARPS, 1, 1], [2, 1, 0])
    grp = gl.arange(0, BN // 16, layout=gl.SliceLayout(1, gl.SliceLayout(2, PL)))[:, None, None]
    r8 = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, PL)))[None, :, None]
    half = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, PL)))[None, None, :]
    groups = (rb >> 4) + gl.minimum((r0 >> 4) + grp, (N - 1) >> 4)
    at = groups * (16 * gpr) + tg * 16 + r8 * 2 + half
    s = _row_order(gl.load(sc_ptr + at).to(gl.float32), BN, MMA)
    z = _row_order(gl.load(zp_ptr + at).to(gl.float32), BN, MMA)
    return s, z


@gluon.jit
def _row_order(x, BN: gl.constexpr, MMA: gl.constexpr):
    """[BN / 16, 8, 2] values of (row group, r % 8, r // 8 % 2) -> [BN] in the MMA's row layout (registers renamed
    only)."""
    return gl.convert_layout(gl.reshape(gl.permute(x, [0, 2, 1]), [BN]), gl.SliceLayout(1, MMA), assert_trivial=True)


@gluon.jit
def _acts(a_base, toks, stride_am, k0, BM: gl.constexpr, SKIP_PAD: gl.constexpr):
    """One K tile's activations of the block's tokens as [4, 16, BM] int32 words of two bf16 (k and
    k + 1; ``_act_operand`` makes the MMA operand of them, ``_halves`` says why words). SKIP_PAD:
    padding slots (token -1) load nothing and read zeros."""
    XL: gl.constexpr = _lane_tokens(BM)
    ca = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, XL)))[:, None, None]
    ja = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, XL)))[None, :, None]
    rows = (a_base + toks[None, None, :] * stride_am + k0).to(gl.pointer_type(gl.int32))
    ptrs = rows + ca * 16 + ja
    if SKIP_PAD:
        return gl.load(ptrs, mask=(toks >= 0)[None, None, :], other=0)
    else:
        return gl.load(ptrs)


@gluon.jit
def _act_operand(words, B_OP: gl.constexpr):
    """[4, 16, BM] words (``_acts``) -> the tile's [128, BM] bf16 B operand, k in ``_chunk_order``."""
    x = gl.reshape(gl.permute(_halves(words), [2, 0, 1, 3]), [words.shape[2], 4, 32])
    return gl.convert_layout(gl.permute(_chunk_order(x), [1, 0]), B_OP, assert_trivial=True)


@gluon.jit
def _stage_wg(buf, a_base, tok_rows, stride_am, k0):
    """One K tile's activations of the block's tokens copied into ``buf`` ([BM, 64] int32, Tiles.wgmma), k in
    ``_chunk_order`` (the A operand's): word 4u + c of a row is pair u of lane chunk c, word 16c + u of the tile in
    memory. Asynchronously (cp.async, 4 bytes a copy), one commit group. ``tok_rows``: each row's token."""
    d = gl.arange(0, 64, layout=gl.SliceLayout(0, _WG_COPY))[None, :]
    rows = (a_base + tok_rows[:, None] * stride_am + k0).to(gl.pointer_type(gl.int32))
    _async_load(buf, rows + ((d % 4) * 16 + d // 4))
    async_copy.commit_group()


@gluon.jit
def _wg_operand(buf, BM: gl.constexpr):
    """A staged K tile (``_stage_wg``) as the warpgroup MMA's B operand: [128, BM] bf16 in shared memory."""
    if _OLD_REINTERPRET:
        rows = buf._reinterpret(gl.bfloat16, [BM, _BK], _WG_B)
    else:
        rows = buf.reinterpret(gl.bfloat16, [BM, _BK], _WG_B)
    return rows.permute([1, 0])


@gluon.jit
def _placed_acts(words, B: gl.constexpr):
    """[4, 16, BM] activation words (``_acts``) each times 2^-p, p the place of its pair's code in the
    shifted word (``_pairs`` with G): (128 + 2^p q) a 2^-p = 128 a 2^-p + q a. One packed bf16 multiply
    a word, exact (a power of two; bf16 has fp32's exponents)."""
    G: gl.constexpr = _per_shift(B)
    XL: gl.constexpr = _lane_tokens(words.shape[2])
    u = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, XL)))[None, :, None]  # the pair of a chunk
    e = B * ((u % (16 // B)) % G)
    if _ASM:  # times the two bf16 2^-e, plus -0 (so that a zero keeps its sign)
        f = ((127 - e) << 7) * 0x10001 + gl.zeros_like(words)
        return gl.inline_asm_elementwise(
            "{ .reg .b32 z; mov.b32 z, 0x80008000; fma.rn.bf16x2 $0, $1, $2, z; }", "=r,r,r", [words, f],
            dtype=gl.int32, is_pure=True, pack=1)  # fmt: skip
    else:
        x = (_halves(words).to(gl.float32) * (1.0 / (1 << e).to(gl.float32))[:, :, :, None]).to(gl.bfloat16)
        lo, hi = gl.split(x)
        lo = lo.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        return lo | (hi.to(gl.int16, bitcast=True).to(gl.int32) << 16)


@gluon.jit
def _tile(wi_ptr, wb_ptr, sc_ptr, zp_ptr, a_base, rb, r0, N, toks, stride_am, k0, K, gpr, inv_tpg,
          BITS: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr, MMA: gl.constexpr,
          SKIP_PAD: gl.constexpr, WAIT: gl.constexpr = False, PLACE: gl.constexpr = False,
          TILED: gl.constexpr = False, ACTS: gl.constexpr = True):  # fmt: skip
    """Loads of one K tile (weights, scales, activations): everything the products need, so the
    next tile's can be in flight during these. 3 bits: the two planes (w, wx); otherwise wx is w.
    WAIT: the activations are the launch before's (programmatic dependent launch, pdl.py): the weights and
    scales load first, then the program waits for that launch. Without ACTS (Tiles.staged: they come through
    shared memory, ``_stage``) ``toks`` stands in for them."""
    if BITS == 3:
        w = gl.load(_weight_ptrs(wi_ptr, wb_ptr, rb, r0, N, k0, K, BITS, BN, 2, 0, TILED))
        wx = gl.load(_weight_ptrs(wi_ptr, wb_ptr, rb, r0, N, k0, K, BITS, BN, 1, 2, TILED))
    else:
        w = gl.load(_weight_ptrs(wi_ptr, wb_ptr, rb, r0, N, k0, K, BITS, BN, TILED=TILED))
        wx = w
    if WAIT:
        s, z = _scales(sc_ptr, zp_ptr, rb, r0, N, k0, gpr, inv_tpg, BITS, BN, MMA, PLACE, TILED)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
        a = _acts(a_base, toks, stride_am, k0, BM, SKIP_PAD) if ACTS else toks
    else:
        a = _acts(a_base, toks, stride_am, k0, BM, SKIP_PAD) if ACTS else toks
        s, z = _scales(sc_ptr, zp_ptr, rb, r0, N, k0, gpr, inv_tpg, BITS, BN, MMA, PLACE, TILED)
    return w, wx, s, z, a


@gluon.jit
def _stage(buf, a_base, tok_rows, stride_am, k0):
    """One K tile's activations of the block's tokens copied into the shared memory ``buf`` ([2 BM, 32] words,
    ``_staged_rows``), asynchronously, as one commit group. ``tok_rows``: each row's token, in _COPY's rows."""
    r = gl.arange(0, tok_rows.shape[0], layout=gl.SliceLayout(1, _COPY))[:, None]
    col = gl.arange(0, 32, layout=gl.SliceLayout(0, _COPY))[None, :]
    rows = (a_base + tok_rows[:, None] * stride_am + k0).to(gl.pointer_type(gl.int32)) + (r % 2) * 32
    _async_load(buf, rows + col)
    async_copy.commit_group()


@gluon.jit
def _staged_words(buf, BM: gl.constexpr):
    """A staged K tile's activations (``_stage``) as ``_acts`` gives them: [4, 16, BM] words (registers renamed
    only after the load)."""
    x = buf.load(_staged_rows(BM))
    gl.static_assert(gl.bank_conflicts(x.type, buf.type) == 0, "the staged activations' loads conflict in banks")
    x = gl.reshape(x, [BM, 2, 2, 16])  # (token, c // 2, c % 2, j)
    x = gl.reshape(gl.permute(x, [1, 2, 3, 0]), [4, 16, BM])
    return gl.convert_layout(x, _lane_tokens(BM), assert_trivial=True)


@gluon.jit
def _product(w, wx, s, z, a, ones, magic, BITS: gl.constexpr, A_OP: gl.constexpr, MMA: gl.constexpr,
             PLACE: gl.constexpr = False):  # fmt: skip
    """One tile's [BN, BM] fp32 result: W.a for bf16, s (Q.a - z sum(a)) for codes, Q the codes as
    the MMA gets them and z the zero point plus their offset (``_scales``). PLACE (1 and 2 bits): the
    codes in place, ``a`` the placed activations a' (``_placed_acts``), z the zero point alone:
    s (Q'.a' - 128 sum(a') - z sum(a)), both sums from one MMA of a constant (``_place_sums``)."""
    r = gl.zeros([ones.shape[0], a.shape[1]], gl.float32, layout=MMA)
    if BITS == 16:
        return mma_v2(_bf16_operand(w, A_OP), a, r)
    elif PLACE and BITS <= 2:
        G: gl.constexpr = _per_shift(BITS)
        asum, off = _row_halves(mma_v2(_operand(_place_sums(w, BITS, 0, 16 // BITS, 1, G), A_OP), a, r), MMA)
        q = mma_v2(_codes(w, magic, BITS, A_OP, G=G), a, r)
        return (q + (off - z[:, None] * asum)) * s[:, None]
    else:
        asum = mma_v2(ones, a, r)  # every row: the tile's sum of each token's activations
        if BITS == 8:  # 128 + code does not fit bf16's 8 bits: the high and the low nibble apart
            q = mma_v2(_codes(w, magic, 8, A_OP, 4, 4), a, r) * 16.0 + mma_v2(_codes(w, magic, 8, A_OP, 4, 0), a, r)
        elif BITS == 3:  # the 2-bit and the 1-bit plane (w, wx), joined
            q = mma_v2(_codes3(w, wx, magic, A_OP), a, r)
        else:
            q = mma_v2(_codes(w, magic, BITS, A_OP), a, r)
        return (q - z[:, None] * asum) * s[:, None]


@gluon.jit
def _products(w, wx, s, z, a, w2, wx2, s2, z2, acc, acc2, ones, magic, BITS: gl.constexpr, GATE_UP: gl.constexpr,
              A_OP: gl.constexpr, B_OP: gl.constexpr, MMA: gl.constexpr, PLACE: gl.constexpr,
              WG: gl.constexpr = False):  # fmt: skip
    """One K tile's products added into the sums (gate and up for GATE_UP), from the activation words ``a`` (WG: the
    tile's activations in shared memory, as the warpgroup MMA's B operand)."""
    if WG:
        acc, acc2 = _products_wg(w, wx, s, z, a, w2, wx2, s2, z2, acc, acc2, ones, magic, BITS, GATE_UP, A_OP, MMA)
    else:
        if PLACE and BITS <= 2:
            ab = _act_operand(_placed_acts(a, BITS), B_OP)
        else:
            ab = _act_operand(a, B_OP)
        acc += _product(w, wx, s, z, ab, ones, magic, BITS, A_OP, MMA, PLACE)
        if GATE_UP:
            acc2 += _product(w2, wx2, s2, z2, ab, ones, magic, BITS, A_OP, MMA, PLACE)
    return acc, acc2


@gluon.jit
def _issue_wg(w, wx, magic, b, r, BITS: gl.constexpr, A_OP: gl.constexpr):
    """A tile's weights times its activations ``b`` (shared memory) as warpgroup MMAs, issued, not waited for: their
    token and A operands (registers the MMAs read until waited for: the wait keeps them alive). Codes as ``_product``
    takes them; 8 bits in one sum: the high nibble's codes as bf16 2048 + 16 hi (an exponent 4 higher than 128's), so
    both MMAs add into one accumulator, 2176 + code a pair."""
    if BITS == 16:
        x = _bf16_operand(w, A_OP)
        return warpgroup_mma(x, b, r, use_acc=False, is_async=True), x, x
    elif BITS == 8:
        hi = _codes(w, magic + 0x02000200, 8, A_OP, 4, 4)
        lo = _codes(w, magic, 8, A_OP, 4, 0)
        t = warpgroup_mma(hi, b, r, use_acc=False, is_async=True)
        return warpgroup_mma(lo, b, t, is_async=True), hi, lo
    elif BITS == 3:
        x = _codes3(w, wx, magic, A_OP)
        return warpgroup_mma(x, b, r, use_acc=False, is_async=True), x, x
    else:
        x = _codes(w, magic, BITS, A_OP)
        return warpgroup_mma(x, b, r, use_acc=False, is_async=True), x, x


@gluon.jit
def _products_wg(w, wx, s, z, b, w2, wx2, s2, z2, acc, acc2, ones, magic, BITS: gl.constexpr, GATE_UP: gl.constexpr,
                 A_OP: gl.constexpr, MMA: gl.constexpr):  # fmt: skip
    """``_products`` as warpgroup MMAs (Tiles.wgmma), all of a tile's issued before one wait: ``b`` the activations'
    tile and ``ones`` a tile of ones, both in shared memory (held there, a constant A operand takes registers or is
    made again each tile). Codes: s (Q.b - z sum(b)), as ``_product``."""
    r = gl.zeros([acc.shape[0], acc.shape[1]], gl.float32, layout=MMA)
    t, x, xh = _issue_wg(w, wx, magic, b, r, BITS, A_OP)
    t2, x2, x2h = t, x, xh
    if GATE_UP:
        t2, x2, x2h = _issue_wg(w2, wx2, magic, b, r, BITS, A_OP)
    if BITS == 16:
        q, q2, x, xh, x2, x2h = warpgroup_mma_wait(0, deps=[t, t2, x, xh, x2, x2h])
        acc += q
        if GATE_UP:
            acc2 += q2
    else:
        ts = warpgroup_mma(ones, b, r, use_acc=False, is_async=True)
        q, q2, asum, x, xh, x2, x2h = warpgroup_mma_wait(0, deps=[t, t2, ts, x, xh, x2, x2h])
        acc += (q - z[:, None] * asum) * s[:, None]
        if GATE_UP:
            acc2 += (q2 - z2[:, None] * asum) * s2[:, None]
    return acc, acc2


@gluon.jit
def _expert(wi_ptr, wb_ptr, sc_ptr, zp_ptr, a_base, r0, toks, stride_am, N, K, group, k_lo, k_hi, magic,
            BITS: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr, GATE_UP: gl.constexpr, A_OP: gl.constexpr,
            B_OP: gl.constexpr, MMA: gl.constexpr, SKIP_PAD: gl.constexpr, WAIT: gl.constexpr,
            PLACE: gl.constexpr = False, EARLY: gl.constexpr = False, TILED: gl.constexpr = False,
            STAGED: gl.constexpr = False, WG: gl.constexpr = False):  # fmt: skip
    """The K loop over [k_lo, k_hi) of one expert (gate and up together for GATE_UP), the next
    tile's loads in registers while this tile's products run (PLACE: ``_product``). In one block, ptxas
    issues gate/up's loads after most of its MMAs (sm_90 SASS, ptxas 12.8 and 13.4: 13 to 130 of 360 to 455
    instructions after the last load, benchmarks/results/sass_census_s28_*.md), so they have little time to
    arrive; EARLY puts a branch between loads and products, which keeps the loads first (for 30 to 70
    more registers). (Loading the weights two tiles ahead in registers, through a cp.async ring in shared
    memory, or asking L2 for the run's tiles with bulk prefetches, was measured slower on the H200; the
    cp.async ring again on the H100 with the codes tiled, 2 or 3 tiles ahead at 1 to 64 tokens, 1.03 to 1.25x
    the time: benchmarks/README.md, thirty-fourth session. What paid was the codes' order in memory, TILED:
    arena.tile_words.)
    STAGED: the activations are copied one tile ahead (cp.async) into a ring of STAGES buffers in shared memory,
    and read where their tile's products need them, so the look-ahead holds no registers for them (4 BM a thread
    otherwise). ptxas then issues the weights' loads at the top of the K loop, which pays on layers whose programs
    walk long K runs (decode's default there: moe.STAGED_ROWS). Blocks of 32 rows fit too, but took 2.1x the time
    (H100; benchmarks/README.md, thirty-third session).
    WG (Tiles.wgmma, sm_90): the products as warpgroup MMAs, the weights' codes still unpacked into registers (the A
    operand), each tile's activations copied one tile ahead into shared memory (the B operand, ``_stage_wg``). One
    wgmma takes a 16-deep slice of all BM tokens for the 4 warps' 64 rows, where mma_v2 takes 8 tokens of one warp's
    16 rows: at 32 or 64 rows a block the MMAs stop growing with the rows, which doubled the 32-row blocks' time
    above, and no warp loads the activations every other warp loads too. Measured on the H100 (thirty-sixth session,
    benchmarks/README.md) it lost: 1.15x the held layout's time at the picked block, 1.48x at 32 rows and 3.3x at 64
    (geometric means): the issued MMAs keep their A operands and results live until the wait (at 16 rows the served
    plan's gate/up holds 254 registers, 2 programs an SM, where mma_v2 holds 168, 3), and it takes 64 rows a
    program, 4.9 instructions a row of a K tile where the held narrow sets' 128 take 4.0. Opt-in."""
    ones = gl.full([BN, _BK], 1.0, gl.bfloat16, layout=A_OP)
    if WG:
        ones = gl.allocate_shared_memory(gl.bfloat16, [BN, _BK], _WG_B, value=ones)
    acc = gl.zeros([BN, BM], gl.float32, layout=MMA)
    acc2 = gl.zeros([BN, BM], gl.float32, layout=MMA)
    gpr = K // group  # groups per row of scales
    inv_tpg = 1.0 / (group // _BK).to(gl.float32)  # eligible(): whole K tiles per group
    # an empty split still loads one valid tile (unused), so no load needs a mask
    k0 = gl.minimum(k_lo, K - _BK)
    w, wx, s, z, a = _tile(wi_ptr, wb_ptr, sc_ptr, zp_ptr, a_base, 0, r0, N, toks, stride_am, k0, K, gpr,
                           inv_tpg, BITS, BN, BM, MMA, SKIP_PAD, WAIT, PLACE, TILED, not (STAGED or WG))  # fmt: skip
    w2, wx2, s2, z2 = w, wx, s, z
    if GATE_UP:  # rows [N, 2N) of the fused weight are up: same loop, same activations
        w2, wx2, s2, z2, a = _tile(wi_ptr, wb_ptr, sc_ptr, zp_ptr, a_base, N, r0, N, toks, stride_am, k0, K,
                                   gpr, inv_tpg, BITS, BN, BM, MMA, SKIP_PAD, WAIT, PLACE, TILED,
                                   not (STAGED or WG))  # fmt: skip
    if STAGED:  # after _tile's wait for the launch before (WAIT), whose output the activations are
        acts = gl.allocate_shared_memory(gl.int32, [_STAGES, 2 * BM, 32], _STAGED)
        t = gl.maximum(toks, 0)  # padding: token 0's row (SKIP_PAD's -1 loads nothing in _acts)
        tok_rows = gl.convert_layout(gl.reshape(gl.join(t, t), [2 * BM]), gl.SliceLayout(1, _COPY))
        _stage(acts.index(0), a_base, tok_rows, stride_am, k0)
    if WG:  # as STAGED's ring
        ring = gl.allocate_shared_memory(gl.int32, [_WG_STAGES, BM, 64], _WG_WORDS)
        wg_toks = gl.convert_layout(gl.maximum(toks, 0), gl.SliceLayout(1, _WG_COPY))
        _stage_wg(ring.index(0), a_base, wg_toks, stride_am, k0)
    for k0 in range(k_lo, k_hi, _BK):
        kn = gl.minimum(k0 + _BK, k_hi - _BK)  # the last tile loads itself again, from cache
        wn, wxn, sn, zn, an = _tile(wi_ptr, wb_ptr, sc_ptr, zp_ptr, a_base, 0, r0, N, toks, stride_am, kn, K,
                                    gpr, inv_tpg, BITS, BN, BM, MMA, SKIP_PAD, PLACE=PLACE, TILED=TILED,
                                    ACTS=not (STAGED or WG))  # fmt: skip
        w2n, wx2n, s2n, z2n = wn, wxn, sn, zn
        if GATE_UP:
            w2n, wx2n, s2n, z2n, an = _tile(wi_ptr, wb_ptr, sc_ptr, zp_ptr, a_base, N, r0, N, toks, stride_am,
                                            kn, K, gpr, inv_tpg, BITS, BN, BM, MMA, SKIP_PAD, PLACE=PLACE,
                                            TILED=TILED, ACTS=not (STAGED or WG))  # fmt: skip
        words = a  # this tile's activations
        if STAGED:
            # tile i + 1 into the buffer read at tile i - 3, which every warp left at the last barrier; then tile
            # i's copies, every thread's, are done and seen
            i = (k0 - k_lo) // _BK
            _stage(acts.index((i + 1) % _STAGES), a_base, tok_rows, stride_am, kn)
            async_copy.wait_group(1)
            _cta_barrier()
            words = _staged_words(acts.index(i % _STAGES), BM)
        if WG:
            i = (k0 - k_lo) // _BK
            _stage_wg(ring.index((i + 1) % _WG_STAGES), a_base, wg_toks, stride_am, kn)
            async_copy.wait_group(1)
            fence_async_shared()  # the copies seen by the MMA's reads of shared memory (the async proxy)
            _cta_barrier()
            words = _wg_operand(ring.index(i % _WG_STAGES), BM)
        if EARLY:
            # never false (a K loop that runs has k_hi >= 128), but neither compiler knows, and ptxas schedules
            # within a block: the loads above stay above (a condition fixed for the loop, magic's, was unswitched)
            if kn >= 0:
                acc, acc2 = _products(w, wx, s, z, words, w2, wx2, s2, z2, acc, acc2, ones, magic, BITS, GATE_UP,
                                      A_OP, B_OP, MMA, PLACE, WG)  # fmt: skip
        else:
            acc, acc2 = _products(w, wx, s, z, words, w2, wx2, s2, z2, acc, acc2, ones, magic, BITS, GATE_UP, A_OP,
                                  B_OP, MMA, PLACE, WG)  # fmt: skip
        w, wx, s, z, a, w2, wx2, s2, z2 = wn, wxn, sn, zn, an, w2n, wx2n, s2n, z2n
    if STAGED:  # no copy left in flight, and no warp still reading, when a stream-K unit after this one stages
        async_copy.wait_group(0)
        _cta_barrier()
    if WG:  # as STAGED
        async_copy.wait_group(0)
        _cta_barrier()
    return acc, acc2


@gluon.constexpr_function
def _topk_slots(sp):
    """[sp]: every routed slot in each warp (sp / 32 a lane, the warps alike): a reduction is a warp's, with no
    shared memory."""
    return gl.BlockedLayout([sp // 32], [32], [WARPS], [0])


@gluon.jit
def _topk_lead(ids_ptr, pid_m, num_valid, TOPK: gl.constexpr, SLOTS: gl.constexpr, SP: gl.constexpr,
               BM: gl.constexpr):  # fmt: skip
    """GRID_TOPK: whether routed slot ``pid_m`` of the top-k ([T, TOPK] ids) leads a block, with no alignment. An
    expert's slots, in order, make blocks of BM: slot ``pid_m`` leads one where its rank among its expert's slots is
    a multiple of BM. A padded token's slot (-1) is expert 0's, as the alignment takes it. Returns (leads, expert,
    same): ``same``, which slots are the expert's (_topk_rows takes it)."""
    gl.static_assert(SP >= 32, "GRID_TOPK reads at least a warp's 32 slots")
    S1: gl.constexpr = _topk_slots(SP)
    j = gl.arange(0, SP, layout=S1)
    n = (num_valid // SLOTS) * TOPK  # the routed slots
    e = gl.maximum(gl.load(ids_ptr + j, mask=j < n, other=0).to(gl.int32), 0)
    me = gl.maximum(gl.load(ids_ptr + pid_m).to(gl.int32), 0)
    same = (e == me) & (j < n)
    rank = gl.sum((same & (j < pid_m)).to(gl.int32), axis=0)
    return rank % BM == 0, me, same


@gluon.jit
def _topk_rows(same, pid_m, num_valid, L: gl.constexpr, TOPK: gl.constexpr, SLOTS: gl.constexpr,
               SP: gl.constexpr, BM: gl.constexpr):  # fmt: skip
    """The rows (layout ``L``) of the block that slot ``pid_m`` leads (_topk_lead; ``same``: its expert's slots):
    that slot and the expert's next BM - 1, numbered as the alignment numbers rows (token * SLOTS + slot),
    ``num_valid`` past the expert's last. Only a leader builds them: the grid's other programs return at once."""
    j = gl.arange(0, SP, layout=_topk_slots(SP))
    n = (num_valid // SLOTS) * TOPK
    m = gl.arange(0, BM, layout=L)
    rows = gl.where(m == 0, (pid_m // TOPK) * SLOTS + pid_m % TOPK, num_valid)
    at = pid_m
    for i in gl.static_range(1, BM):  # each next slot of the expert: a warp's reduction (redux.sync) each
        at = gl.min(gl.where(same & (j > at), j, SP), axis=0)
        rows = gl.where(m == i, gl.where(at < n, (at // TOPK) * SLOTS + at % TOPK, num_valid), rows)
    return rows


@gluon.constexpr_function
def _topk_pairs(sp):
    """[sp, sp]: slot i (rows, over the warps) against slot j (columns, over the lanes)."""
    return gl.BlockedLayout([1, sp // 32], [1, 32], [WARPS, 1], [1, 0])


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _topk_leaders(ids_ptr, num_valid, TOPK: gl.constexpr, SLOTS: gl.constexpr, SP: gl.constexpr,
                  BM: gl.constexpr):  # fmt: skip
    """Stream-K's GRID_TOPK: for each routed slot of the top-k, how many of the slots up to it lead a block (as
    _topk_lead finds for one), and how many blocks there are: every program deals out the same blocks, so
    each finds them all (a slot's rank among its expert's slots counted pairwise, then the leaders up to it scanned)."""
    P: gl.constexpr = _topk_pairs(SP)
    i = gl.arange(0, SP, layout=gl.SliceLayout(1, P))
    j = gl.arange(0, SP, layout=gl.SliceLayout(0, P))
    n = (num_valid // SLOTS) * TOPK
    ei = gl.maximum(gl.load(ids_ptr + i, mask=i < n, other=0).to(gl.int32), 0)
    ej = gl.maximum(gl.load(ids_ptr + j, mask=j < n, other=0).to(gl.int32), 0)
    rank = gl.sum(((ei[:, None] == ej[None, :]) & (j[None, :] < i[:, None])).to(gl.int32), axis=1)
    # into every warp (a scan takes no sliced layout; _topk_nth's reduction is then a warp's)
    lead = gl.convert_layout(((rank % BM == 0) & (i < n)).to(gl.int32), _topk_slots(SP))
    # the leaders up to each slot (Triton 3.6's Gluon, the device's, has the scan but not gl.cumsum): the b-th leader
    # is the first slot with b + 1. One array kept over the program's K loops (the leaders beside it, or the count
    # taken as its maximum, spilled there at 96 registers with w2 to w4)
    return gl.associative_scan(lead, 0, _add), gl.sum(lead, axis=0)


@gluon.jit
def _topk_nth(upto, leaders, b, n, SP: gl.constexpr):
    """Stream-K's GRID_TOPK block ``b``: the slot that leads it, the first whose leaders up to it (``upto``,
    _topk_leaders') are b + 1, and past the ``leaders`` the shared experts' blocks, numbered from ``n`` (the routed
    slots) on (_block)."""
    i = gl.arange(0, SP, layout=_topk_slots(SP))
    at = gl.min(gl.where(upto == b + 1, i, SP), axis=0)
    return gl.where(b < leaders, at, n + b - leaders)


@gluon.jit
def _block(a_ptr, a_rot_off, stride_am, out_ptr, stride_om, split_stride, sorted_ids_ptr, block_expert_ptr,
           route_w_ptr, meta_ptr, wi_ptr, wb_ptr, sc_ptr, zp_ptr, N, K, num_valid, a_div, magic, pid_m, pid_n, pid_s,
           split, code_splits, k_lo, k_hi, GATE_UP: gl.constexpr, CODES: gl.constexpr, BN: gl.constexpr,
           BM: gl.constexpr, PARTIAL: gl.constexpr, SKIP_PAD: gl.constexpr, STREAM_K: gl.constexpr, MMA: gl.constexpr,
           A_OP: gl.constexpr, B_OP: gl.constexpr, WAIT: gl.constexpr, PLACE: gl.constexpr,
           EARLY: gl.constexpr, TILED: gl.constexpr, STAGED: gl.constexpr, WG: gl.constexpr = False,
           TOPK: gl.constexpr = 0, N_ROUTED: gl.constexpr = 0, GRID_TOPK: gl.constexpr = 0,
           SLOTS: gl.constexpr = 0, SP: gl.constexpr = 0):  # fmt: skip
    """Block ``pid_m``'s rows times N tile ``pid_n`` over one K range: split ``pid_s`` of ``split``
    (by the expert's bits where ``code_splits`` says), or with STREAM_K [k_lo, k_hi), added into fp32
    ``out`` with atomics (several programs share a tile's K). Nothing for another launch's expert.
    TOPK (one token, the top-k's width): block ``pid_m`` is row ``pid_m`` alone, and its expert the top-k's
    (``sorted_ids_ptr``: the top-k ids [TOPK]; ``route_w_ptr``: their weights) or a shared one past it.
    GRID_TOPK (any tokens, the top-k's width): block ``pid_m`` is the one routed slot ``pid_m`` leads (_topk_lead,
    _topk_rows; ``route_w_ptr``: the top-k weights), or nothing; on stream-K (only leaders come: _topk_nth) past the
    routed slots a shared expert's block of tokens (N_ROUTED: the first shared expert)."""
    XL: gl.constexpr = _lane_tokens(BM)
    if TOPK:  # slot pid_m of the one token: a routed one's expert from the top-k (-1: expert 0, weight 0)
        picked = gl.load(sorted_ids_ptr + gl.minimum(pid_m, TOPK - 1)).to(gl.int32)
        expert = gl.where(pid_m < TOPK, gl.maximum(picked, 0), N_ROUTED + pid_m - TOPK)
    elif GRID_TOPK:
        n = (num_valid // SLOTS) * GRID_TOPK
        leads, expert, same = _topk_lead(sorted_ids_ptr, gl.minimum(pid_m, n - 1), num_valid, GRID_TOPK, SLOTS, SP,
                                         BM)  # fmt: skip
        if STREAM_K:  # past the routed slots, the shared experts' blocks: each expert's tokens, BM at a time
            per = gl.cdiv(num_valid // SLOTS, BM)
            sb = pid_m - n
            expert = gl.where(sb >= 0, N_ROUTED + sb // per, expert)
    else:
        expert = gl.load(block_expert_ptr + pid_m)
    # the expert's meta row (arena.py), read as mx_moe_gemm_kernel reads it. Not a shared @triton.jit
    # helper: under TRITON_INTERPRET (CI) that becomes an interpreted function, which the sm_90
    # compile of this kernel in tests/test_gluon_sass.py cannot call
    meta = meta_ptr + expert * 6
    code = gl.load(meta).to(gl.int32)
    # the row's other fields and the block's token ids load beside the code, not after the branch on it: one
    # dependent round trip less before a unit's first weights (a stream-K program at 1 token walks 1 or 2 units)
    # arena offsets are multiples of 16 elements (build_arena pads)
    w_off = gl.multiple_of(gl.load(meta + 1), 16)
    s_off = gl.multiple_of(gl.load(meta + 2), 16)
    z_off = gl.multiple_of(gl.load(meta + 3), 16)
    group = gl.load(meta + 4).to(gl.int32)
    rotated = gl.load(meta + 5)
    run = ((CODES >> code) & 1) != 0  # else another launch's expert (a dispatch per group of codes: moe.py)
    if TOPK:  # the block's one row, then padding
        ids_x = gl.where(gl.arange(0, BM, layout=gl.SliceLayout(0, gl.SliceLayout(1, XL))) == 0, pid_m, num_valid)
    elif GRID_TOPK:
        if not STREAM_K:  # stream-K deals out the leaders' blocks alone (_topk_nth)
            run = run & leads
    else:
        ids_x = gl.load(sorted_ids_ptr + pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, gl.SliceLayout(1, XL))))
    if run:
        if GRID_TOPK:  # the rows of a leader's block only
            L: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, XL))
            if STREAM_K:
                if pid_m >= n:  # a shared expert's block of tokens: each token's row of that expert
                    tok = ((pid_m - n) % per) * BM + gl.arange(0, BM, layout=L)
                    ids_x = gl.where(tok < num_valid // SLOTS, tok * SLOTS + GRID_TOPK + (pid_m - n) // per,
                                     num_valid)  # fmt: skip
                else:
                    ids_x = _topk_rows(same, pid_m, num_valid, L, GRID_TOPK, SLOTS, SP, BM)
            else:
                ids_x = _topk_rows(same, pid_m, num_valid, L, GRID_TOPK, SLOTS, SP, BM)
        # the Hadamard-rotated copy, for rotated experts
        a_base = a_ptr + gl.multiple_of(rotated * a_rot_off, 128)
        rows_o = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
        # SKIP_PAD: padding slots are token -1 and load nothing (at 1 or 2 rows per expert most of a block's
        # 8 slots are padding, and every warp loads the block's activations); otherwise they read token 0,
        # and their results are never stored
        toks = gl.where(ids_x < num_valid, ids_x // a_div, -1 if SKIP_PAD else 0)
        if STREAM_K:
            k_a = k_lo
            k_b = k_hi
        else:
            if code_splits != 0:  # K split by the expert's bits (moe.code_splits): programs past it store zeros
                split = (code_splits >> (4 * code)) & 15
            k_per = gl.cdiv(gl.cdiv(K, _BK), split) * _BK
            k_a = pid_s * k_per
            k_b = gl.minimum(K, k_a + k_per)
        acc = gl.zeros([BN, BM], gl.float32, layout=MMA)
        acc2 = gl.zeros([BN, BM], gl.float32, layout=MMA)
        for c in gl.static_range(0, 6):  # bf16 (code 0) and weight-only 1, 2, 3, 4 and 8 bits (code 5)
            if (CODES >> c) & 1:
                if code == c:
                    acc, acc2 = _expert(wi_ptr + w_off, wb_ptr + w_off, sc_ptr + s_off, zp_ptr + z_off, a_base,
                                        pid_n * BN, toks, stride_am, N, K, group, k_a, k_b, magic,
                                        c + 16 * (c == 0) + 3 * (c == 5), BN, BM, GATE_UP, A_OP, B_OP, MMA,
                                        SKIP_PAD, WAIT, PLACE, EARLY, TILED, STAGED, WG)  # fmt: skip
        if TOPK:
            ids = gl.where(gl.arange(0, BM, layout=gl.SliceLayout(0, MMA)) == 0, pid_m, num_valid)
        elif GRID_TOPK:
            ids = gl.convert_layout(ids_x, gl.SliceLayout(0, MMA))
        else:
            ids = gl.load(sorted_ids_ptr + pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, MMA)))
        mask = (rows_o < N)[:, None] & (ids < num_valid)[None, :]
        out = out_ptr + pid_s * split_stride + ids[None, :] * stride_om + rows_o[:, None]
        if GATE_UP:
            if STREAM_K:
                gl.atomic_add(out, acc, mask=mask, sem="relaxed")
                gl.atomic_add(out + N, acc2, mask=mask, sem="relaxed")
            elif PARTIAL:
                gl.store(out, acc, mask=mask)
                gl.store(out + N, acc2, mask=mask)
            else:
                # gate and up rounded to bf16 first, as the Triton kernel (and an unfused GEMM) stores them
                g = acc.to(gl.bfloat16).to(gl.float32)
                u = acc2.to(gl.bfloat16).to(gl.float32)
                gl.store(out, (g / (1.0 + gl.exp(-g)) * u).to(gl.bfloat16), mask=mask)
        else:
            if TOPK:  # the routed slot's top-k weight (a padded token's -1: none), a shared one's 1
                w = gl.load(route_w_ptr + gl.minimum(pid_m, TOPK - 1)).to(gl.float32)
                w = gl.where(pid_m < TOPK, gl.where(picked < 0, 0.0, w), 1.0)
                res = acc * gl.where(ids < num_valid, w, 0.0)[None, :]
            elif GRID_TOPK:  # the row's top-k weight (a padded token's -1: none), a shared expert's 1
                routed = ids % SLOTS < GRID_TOPK
                slot = gl.where((ids < num_valid) & routed, (ids // SLOTS) * GRID_TOPK + ids % SLOTS, 0)
                w = gl.load(route_w_ptr + slot).to(gl.float32)
                w = gl.where(routed, gl.where(gl.load(sorted_ids_ptr + slot).to(gl.int32) < 0, 0.0, w), 1.0)
                res = acc * gl.where(ids < num_valid, w, 0.0)[None, :]
            else:
                res = acc * gl.load(route_w_ptr + ids, mask=ids < num_valid, other=0.0)[None, :]
            if STREAM_K:
                gl.atomic_add(out, res, mask=mask, sem="relaxed")
            elif PARTIAL:
                gl.store(out, res, mask=mask)
            else:
                gl.store(out, res.to(gl.bfloat16), mask=mask)


@gluon.jit
def _grouped(i, blocks, n_tiles, splits, GROUP_M: gl.constexpr):
    """Work item ``i`` -> (block, N tile, split), GROUP_M blocks at a time over every N tile and split
    (Tiles.group_m). An expert with more rows than a block has blocks side by side (the rows sorted by expert);
    taken N tile first, its blocks read each N tile's weights a whole row of N tiles apart, after most of
    those bytes have left L2. Taken so, they read it at once, the later ones from L2 (expert_reads.py: at 64
    tokens each active expert gets 1.26 to 2.4 blocks under skewed routing, and a shared expert 4 or 8)."""
    per = GROUP_M * n_tiles * splits
    first = (i // per) * GROUP_M
    size = gl.minimum(blocks - first, GROUP_M)  # the last group: the blocks left
    r = i - (i // per) * per
    return first + r % size, (r // size) % n_tiles, (r // size) // n_tiles


@gluon.jit(do_not_specialize=["num_valid", "split", "code_splits", "magic"])
def mx_moe_gemm_gluon_kernel(a_ptr, a_rot_off, stride_am, out_ptr, stride_om, split_stride, sorted_ids_ptr,
                             block_expert_ptr, num_post_pad_ptr, route_w_ptr, meta_ptr, wi_ptr, wb_ptr, sc_ptr,
                             zp_ptr, N, K, num_valid, a_div, split, code_splits, magic, GATE_UP: gl.constexpr,
                             CODES: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr, PARTIAL: gl.constexpr,
                             SKIP_PAD: gl.constexpr = False, STREAM_K: gl.constexpr = False,
                             PDL: gl.constexpr = 0, PLACE: gl.constexpr = False,
                             EARLY: gl.constexpr = False, TILED: gl.constexpr = False,
                             GROUP_M: gl.constexpr = 0, STAGED: gl.constexpr = False,
                             WGMMA: gl.constexpr = False, TOPK: gl.constexpr = 0,
                             N_ROUTED: gl.constexpr = 0, GRID_TOPK: gl.constexpr = 0, SLOTS: gl.constexpr = 0,
                             SP: gl.constexpr = 0):  # fmt: skip
    # PDL (programmatic dependent launch, pdl.py): 1, everything waits for the launch before (the alignment, for
    # gate/up); 2, only the activations do (down: the blocks are the alignment's, two or more launches back), so
    # the first K tile's weights load while that launch ends
    if PDL == 1:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if WGMMA:  # Tiles.wgmma: one warpgroup MMA of all BM tokens (the 4 warps' rows); its B from shared memory
        gl.static_assert(not (PLACE or STAGED), "wgmma takes neither placed codes nor the staged ring")
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[_WARPS, 1],
                                                      instr_shape=[16, BM, 16])  # fmt: skip
    else:
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[_WARPS, 1], instr_shape=[16, 8])
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)  # weights [BN, BK]
    B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)  # tokens [BK, BM]
    # eligible(): K is a multiple of 128, and the activations are contiguous rows of K. Said, so that
    # a lane's chunk loads 16 bytes at a time
    K = gl.multiple_of(K, 128)
    stride_am = gl.multiple_of(stride_am, 128)
    if STREAM_K:
        # A grid of as many programs as the SMs hold at once (moe.py). The K tiles of all (block, N tile)
        # pairs with rows, in a row, are dealt out in equal runs, one per program: every SM works to the
        # end of the launch, and no program walks more K than its share. A run may start or end inside a
        # pair's K, so every program adds its sums into the zeroed fp32 output (ncu at 16 and 64 tokens:
        # 2 of 3 grid rows without work and each program as long as its whole K loop; Marlin strides a fixed
        # grid so: benchmarks/README.md, seventeenth session)
        gl.static_assert(TOPK == 0 or GRID_TOPK == 0, "one token's rows (TOPK) or any tokens' (GRID_TOPK)")
        n_tiles = gl.cdiv(N, BN)
        k_tiles = K // _BK
        if TOPK:  # one token: a block a row, and no alignment's count to wait for
            total = num_valid * n_tiles * k_tiles
        elif GRID_TOPK:  # any tokens: the blocks that routed slots lead, then the shared experts' (_block)
            upto, leaders = _topk_leaders(sorted_ids_ptr, num_valid, GRID_TOPK, SLOTS, SP, BM)
            shared = (SLOTS - GRID_TOPK) * gl.cdiv(num_valid // SLOTS, BM)
            total = (leaders + shared) * n_tiles * k_tiles
        else:
            total = (gl.load(num_post_pad_ptr).to(gl.int32) // BM) * n_tiles * k_tiles
        programs = gl.num_programs(0)
        pid = gl.program_id(0)
        share = total // programs
        start = pid * share + gl.minimum(pid, total % programs)
        end = start + share + (pid < total % programs).to(gl.int32)
        first = start // k_tiles
        stop = gl.cdiv(end, k_tiles)
        if end <= start:  # no share (fewer K tiles than programs)
            stop = first
        for unit in range(first, stop):  # (block, N tile) pairs, N tile fastest (GROUP_M: _grouped)
            lo = (gl.maximum(start, unit * k_tiles) - unit * k_tiles) * _BK
            hi = (gl.minimum(end, unit * k_tiles + k_tiles) - unit * k_tiles) * _BK
            pid_m = unit // n_tiles
            pid_n = unit % n_tiles
            if GROUP_M > 1:  # an expert's blocks one after the other in a run, the later ones reading L2
                pid_m, pid_n, _s = _grouped(unit, total // (n_tiles * k_tiles), n_tiles, 1, GROUP_M)
            if GRID_TOPK:
                pid_m = _topk_nth(upto, leaders, pid_m, (num_valid // SLOTS) * GRID_TOPK, SP)
            _block(a_ptr, a_rot_off, stride_am, out_ptr, stride_om, 0, sorted_ids_ptr, block_expert_ptr,
                   route_w_ptr, meta_ptr, wi_ptr, wb_ptr, sc_ptr, zp_ptr, N, K, num_valid, a_div, magic,
                   pid_m, pid_n, 0, 1, 0, lo, hi, GATE_UP, CODES, BN, BM, True, SKIP_PAD, True,
                   MMA, A_OP, B_OP, PDL == 2, PLACE, EARLY, TILED, STAGED, WGMMA, TOPK, N_ROUTED, GRID_TOPK, SLOTS,
                   SP)  # fmt: skip
    else:
        gl.static_assert(TOPK == 0, "the top-k's rows straight (TOPK) are dealt out on the stream-K grid only")
        # The grid is (blocks, N tiles, splits), sized for the most blocks a batch can have (CUDA graphs);
        # blocks past num_post_pad return at once. Programs are taken N tile first, then split, then block:
        # the GPU hands programs out in launch order, so the real blocks' programs (the first ones) spread
        # evenly over the SMs. In the grid's own order a block's N tiles sat a block count apart, and at 8
        # tokens some SMs ran 4 real programs while others ran only returning ones (ncu: SM active cycles
        # min 1.2k, mean 32.6k, max 68.8k in one launch; benchmarks/results/ncu-qwen15-8tok-gluon-full-h200.txt).
        n_tiles = gl.num_programs(1)
        splits = gl.num_programs(2)
        lin = gl.program_id(0) + gl.num_programs(0) * (gl.program_id(1) + n_tiles * gl.program_id(2))
        if GROUP_M > 1:
            pid_m, pid_n, pid_s = _grouped(lin, gl.num_programs(0), n_tiles, splits, GROUP_M)
        else:
            pid_n = lin % n_tiles
            pid_s = (lin // n_tiles) % splits
            pid_m = lin // (n_tiles * splits)
        if GRID_TOPK:  # a program row per routed slot (moe.py's topk_rows): those that lead no block do nothing
            _block(a_ptr, a_rot_off, stride_am, out_ptr, stride_om, split_stride, sorted_ids_ptr, block_expert_ptr,
                   route_w_ptr, meta_ptr, wi_ptr, wb_ptr, sc_ptr, zp_ptr, N, K, num_valid, a_div, magic, pid_m,
                   pid_n, pid_s, split, code_splits, 0, 0, GATE_UP, CODES, BN, BM, PARTIAL, SKIP_PAD, False, MMA,
                   A_OP, B_OP, PDL == 2, PLACE, EARLY, TILED, STAGED, WGMMA, 0, 0, GRID_TOPK, SLOTS, SP)  # fmt: skip
        elif pid_m * BM < gl.load(num_post_pad_ptr):
            _block(a_ptr, a_rot_off, stride_am, out_ptr, stride_om, split_stride, sorted_ids_ptr, block_expert_ptr,
                   route_w_ptr, meta_ptr, wi_ptr, wb_ptr, sc_ptr, zp_ptr, N, K, num_valid, a_div, magic, pid_m,
                   pid_n, pid_s, split, code_splits, 0, 0, GATE_UP, CODES, BN, BM, PARTIAL, SKIP_PAD, False, MMA,
                   A_OP, B_OP, PDL == 2, PLACE, EARLY, TILED, STAGED, WGMMA)  # fmt: skip
    if PDL == 2:  # every program waits before it ends, those with no work too (pdl.py's rule); again: at once
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
