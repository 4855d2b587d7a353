"""Mixed-precision grouped GEMM for MoE layers (Triton), all experts in one launch.

One program computes a [BM, BN] tile for the BM (token, slot) rows of one
expert (rows were sorted by expert and padded to BM by :func:`align`), over
its share of K. The expert's kernel code (arena.py) picks the inner loop at
run time:

- bf16: plain bf16 MMA;
- weight-only int (1/2/3/4/8 bits, any group): codes are unpacked from their
  bit planes and turned into bf16 by a bit trick (OR a code below 128 into the
  mantissa of 128.0 gives exactly 128 + code, no int-to-float conversion); the
  zero point and the bias of 128 are removed and the group scale applied
  either per weight before the MMA (prefill) or once per output after a K
  tile's MMA (decode: ``a.(q - z)s = s(a.q - z sum(a))``, for few rows far
  fewer operations than dequantizing every weight);
- w8a8 fp8: activations arrive quantized per token to fp8 e4m3 (one pass per
  launch, moe.py) and run on fp8 MMA with the per-token and per-channel scales;
- w4a4 / w8a8 int: activations are quantized per token to symmetric integers in
  registers (row amax computed once per launch) and run on int8 MMA (Hopper has
  no int4 MMA; int4 values ride in int8).

Layouts, chosen per launch by moe.py:

- SWAP puts the weights on the MMA's M side and the few token rows on its N
  side (the MMA's M is 64 per warpgroup on Hopper; a decode block has 16 rows
  or fewer), so tiles are [BN, BM] and every helper takes the orientation;
- SWAP == FMA keeps that orientation for one row per program (about one row per
  expert: decode at 1 or 2 tokens) and multiplies on CUDA cores, each weight by the
  activation where it was loaded, summed along K: no MMA operand layout, so the
  dequantized tile never goes through shared memory;
- a split > 1 splits K over programs (grid axis 2) when too few (expert, N tile)
  pairs would fill the GPU; each program stores an fp32 partial sum (PARTIAL) and
  the SiLU (gate/up) or the top-k sum (down) adds the partials after (moe.py).
  The split count is a run-time argument: it follows the batch size, and as a
  constexpr it made one compile per value.

Branches of codes absent from the layer are pruned at compile time (CODES); a
program whose expert's code is not among CODES stores nothing (another launch of
a dispatch per group of codes covers it: moe.py).
With GATE_UP and no split the program computes the gate and the up tile of the
same columns and stores SiLU(gate) * up; otherwise it scales by the routing
weight.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from mxkernels.pdl import wait_then_release

# Triton's CPU interpreter mis-computes bf16 tl.dot (seen with triton 3.9): under it,
# bf16 operands are upcast to fp32 for the dot. GPUs keep the bf16 MMA.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# SWAP values: weights on the MMA's N side (0) or its M side (1), or on the M side with
# CUDA-core products instead of the MMA (FMA, decode with few rows per expert).
FMA: tl.constexpr = tl.constexpr(2)

# Helpers taking the orientation have one return each: Triton's compiler (unlike its
# interpreter) refuses returns of different shapes even on a compile-time branch.


@triton.jit
def _dot(a, w, SWAP: tl.constexpr, F32: tl.constexpr):
    """a [BM, BK] activations, w the weight tile ([BN, BK] with SWAP, else [BK, BN]): the
    product [BN, BM] with SWAP, else [BM, BN]. SWAP == FMA takes CUDA-core products: for a
    few rows the MMA's operand layout costs more (the dequantized tile's round trip through
    shared memory) than multiplying each weight by each row where it was loaded."""
    if SWAP == FMA:  # one row (BM == 1): a [1, BK] broadcast over the tile, reduced along K
        tl.static_assert(a.shape[0] == 1, "CUDA-core products take one row per program")
        if w.dtype == tl.int8:  # integer activations: exact int32 sums, as the int8 MMA
            r = tl.sum(w.to(tl.int32) * a.to(tl.int32), axis=1, keep_dims=True)
        else:
            r = tl.sum(w.to(tl.float32) * a.to(tl.float32), axis=1, keep_dims=True)
    else:
        if F32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        if SWAP:
            r = tl.dot(w, tl.trans(a))
        else:
            r = tl.dot(a, w)
    return r


@triton.jit
def _nk(n, k, SWAP: tl.constexpr):
    """Column and depth indices broadcast to the weight tile's orientation (see _dot)."""
    return tl.expand_dims(n, 1 if SWAP else 0), tl.expand_dims(k, 0 if SWAP else 1)


@triton.jit
def _per_n(v, SWAP: tl.constexpr):
    """A per-output-column vector [BN] broadcast over the tile."""
    return tl.expand_dims(v, 1 if SWAP else 0)


@triton.jit
def _per_m(v, SWAP: tl.constexpr):
    """A per-row vector [BM] broadcast over the tile."""
    return tl.expand_dims(v, 0 if SWAP else 1)


@triton.jit
def _zeros(BM: tl.constexpr, BN: tl.constexpr, SWAP: tl.constexpr, DT: tl.constexpr):
    return tl.zeros((BN if SWAP else BM, BM if SWAP else BN), dtype=DT)


@triton.jit
def _bf16(x, F32: tl.constexpr):
    """x rounded to bf16 (to nearest even). Triton's CPU interpreter truncates fp32 -> bf16
    (seen with triton 3.9), so under it the rounding is done on the bits first."""
    if F32:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        x = u.to(tl.float32, bitcast=True)
    return x.to(tl.bfloat16)


@triton.jit
def _load_a(a_ptr, rows, offs_k, k0, mask_m, stride_am, K):
    kk = k0 + offs_k
    return tl.load(a_ptr + rows[:, None] * stride_am + kk[None, :], mask=mask_m[:, None] & (kk[None, :] < K), other=0.0)


@triton.jit
def _load_w(w_ptr, w_off, cols, mask_n, offs_k, k0, K, SWAP: tl.constexpr):
    """A tile of a dense (bf16 or fp8) weight stored [N, K], oriented as _dot takes it."""
    n, kk = _nk(cols, k0 + offs_k, SWAP)
    mn, _ = _nk(mask_n, offs_k, SWAP)
    return tl.load(w_ptr + w_off + n * K + kk, mask=mn & (kk < K), other=0.0)


@triton.jit
def _plane_words(wi_ptr, base, cols, k0, row_words, mask_n, P: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr,
                 K128: tl.constexpr, BITS: tl.constexpr = 0):  # fmt: skip
    """The packed words of one bit plane of width P for a K tile, each loaded once (K-contiguous).
    With K128 (K % 128 == 0, so K tiles never pass K) the load needs no K mask and its rows start
    at 16-byte multiples: 16-byte loads. K128 == 2: the codes are tiled (arena.tile_words; BITS the
    code's width, BK a divisor of 128, so the tile lies in one of 128), ``base`` the plane's offset in a tile."""
    PER: tl.constexpr = 32 // P
    if K128 == 2:
        wk = (k0 % 128) // PER + tl.arange(0, BK // PER)
        n, k = _nk(cols, wk, SWAP)
        mn, _ = _nk(mask_n, wk, SWAP)
        row = (n >> 4) * (16 * row_words) + (n & 15) * (4 * P)
        return tl.load(wi_ptr + base + (k0 // 128) * (64 * BITS) + row + k, mask=mn, other=0)
    wk = k0 // PER + tl.arange(0, BK // PER)
    n, k = _nk(cols, wk, SWAP)
    mn, _ = _nk(mask_n, wk, SWAP)
    if K128:
        words = tl.load(wi_ptr + base + n * row_words + k, mask=mn, other=0)
    else:
        words = tl.load(wi_ptr + base + n * row_words + k, mask=mn & (k < row_words), other=0)
    return words


@triton.jit
def _plane_codes(words, P: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr):
    """A plane's words split into codes in registers, oriented as _dot takes the weights."""
    PER: tl.constexpr = 32 // P
    if SWAP:
        # [BN, BK/PER] words -> [BN, BK]: halve the field width at each level, low field first, the
        # fields joined on a new innermost axis: within both 16-bit halves at once, then the halves
        # last, whose codes are k and k + 1 (packing's paired order). Flattened, that is K order
        # again, and every code stays in the thread that loaded its word (a shifts tensor over a new
        # axis would spread the codes over threads and cost a shuffle through shared memory per code)
        q = words
        LEVELS: tl.constexpr = 5 - (P >= 2) - (P >= 4) - (P >= 8)  # 32 bits down to P
        for level in tl.static_range(1, LEVELS):
            both = ((1 << (16 >> level)) - 1) * 0x10001  # a field in each half
            q = tl.join(q & both, (q >> (16 >> level)) & both)
        q = tl.join(q & 0xFFFF, (q >> 16) & 0xFFFF)
        q = tl.reshape(q, (words.shape[0], BK))
    else:  # [BK/PER, BN] words -> [BK/PER, PER, BN] codes
        i = tl.arange(0, PER)
        shifts = (i >> 1) * P + (i & 1) * 16  # packing's paired order
        q = (words[:, None, :] >> shifts[None, :, None]) & ((1 << P) - 1)
        q = tl.reshape(q, (BK, words.shape[1]))
    return q


@triton.jit
def _int_words(wi_ptr, w_off, cols, k0, K, mask_n, BITS: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr,
               K128: tl.constexpr):  # fmt: skip
    """A K tile's packed words: (plane, plane) for one plane, (2-bit plane, 1-bit plane) for 3 bits."""
    # words per packed row (K * BITS / 32; 3 bits: a 2-bit plane then a 1-bit plane per row), written
    # with K128 so that the compiler sees multiples of 4 words
    if K128:
        row_words = K // 128 * (4 * BITS)
        plane1 = 16 * 8 if K128 == 2 else K // 128 * 8  # tiled: after the 2-bit plane's 16 rows of a tile
    else:
        row_words = K * BITS // 32
        plane1 = K * 2 // 32
    if BITS == 3:
        hi = _plane_words(wi_ptr, w_off, cols, k0, row_words, mask_n, 2, BK, SWAP, K128, BITS)
        lo = _plane_words(wi_ptr, w_off + plane1, cols, k0, row_words, mask_n, 1, BK, SWAP, K128, BITS)
    else:
        hi = _plane_words(wi_ptr, w_off, cols, k0, row_words, mask_n, BITS, BK, SWAP, K128, BITS)
        lo = hi
    return hi, lo


@triton.jit
def _int_unpack(hi, lo, BITS: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr):
    if BITS == 3:
        q = _plane_codes(hi, 2, BK, SWAP) | (_plane_codes(lo, 1, BK, SWAP) << 2)
    else:
        q = _plane_codes(hi, BITS, BK, SWAP)
    return q


@triton.jit
def _int_codes(wi_ptr, w_off, cols, k0, K, mask_n, BITS: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr,
               K128: tl.constexpr):  # fmt: skip
    hi, lo = _int_words(wi_ptr, w_off, cols, k0, K, mask_n, BITS, BK, SWAP, K128)
    return _int_unpack(hi, lo, BITS, BK, SWAP)


@triton.jit
def _plane_fields(words, P: tl.constexpr, BK: tl.constexpr, T: tl.constexpr):
    """A plane's [BN, BK/PER] words as [BN, BK] values whose bits T.. hold code k (CUDA-core path; the
    bits around it are left as they fall). Each level of the same join tree as _plane_codes takes
    one shift per value and no mask: each level within the halves moves the high field down, and
    the last moves the low half's field up to bit T and the high half's down to it, so one AND per
    code at the end isolates it, in the place where ORing 128.0's bits makes a float of it (_fma_codes)."""
    LEVELS: tl.constexpr = 5 - (P >= 2) - (P >= 4) - (P >= 8)  # 32 bits down to P
    q = words
    for level in tl.static_range(1, LEVELS):
        q = tl.join(q, q >> (16 >> level))
    q = tl.join(q << T, q >> (16 - T))
    return tl.reshape(q, (words.shape[0], BK))


@triton.jit
def _fma_codes(hi, lo, one, BITS: tl.constexpr, BK: tl.constexpr):
    """The codes of a K tile's words as fp32 bits of 128 + code (256 + code for 8 bits, 512 + code
    for 3), exactly: the code ORed into the mantissa of 2^7 (2^8, 2^9; for 3 bits the 2-bit plane's
    field at bit 14 and the 1-bit plane's at 16, so no shift joins them). ``one`` is the integer 1
    passed at run time, so that the masks and the exponent bits made from it stay in registers: as
    immediates, ptxas put the mask in a register again before nearly every use (84 MOVs per K tile
    of the w4 gate/up loop on sm_90; 602 instructions per tile instead of 684)."""
    if BITS == 3:
        f = (_plane_fields(hi, 2, BK, 14) & ((one * 3) << 14)) | (_plane_fields(lo, 1, BK, 16) & (one << 16))
        f = f | ((one * 0x11) << 26)  # 0x44000000: 512.0
    elif BITS == 8:
        f = (_plane_fields(hi, 8, BK, 15) & ((one * 255) << 15)) | ((one * 0x87) << 23)  # 0x43800000: 256.0
    else:
        f = (_plane_fields(hi, BITS, BK, 16) & (((one << BITS) - one) << 16)) | ((one * 0x43) << 24)  # 128.0
    return f


@triton.jit
def _wonly_codes(hi, lo, one, BITS: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr):
    """A K tile's codes for _wonly_step: as fp32 bits of 128 + code on the CUDA-core path, else plain."""
    if SWAP == FMA:
        q = _fma_codes(hi, lo, one, BITS, BK)
    else:
        q = _int_unpack(hi, lo, BITS, BK, SWAP)
    return q


# Each branch loops over its K tiles once. With PAIR (gate/up) it computes the columns ``cols``
# and ``cols + n_up`` in the same loop: one A load and one loop's latency chain for both,
# and twice the weight bytes in flight per iteration (decode is bound by that latency).


@triton.jit
def _bf16_step(a, wb_ptr, w_off, cols, mask_n, offs_k, k0, K, SWAP: tl.constexpr, F32: tl.constexpr):
    return _dot(a, _load_w(wb_ptr, w_off, cols, mask_n, offs_k, k0, K, SWAP), SWAP, F32)


@triton.jit
def _mm_bf16(a_ptr, rows, mask_m, stride_am, wb_ptr, w_off, cols, n_up, mask_n, k_lo, k_hi, K,
             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr, PAIR: tl.constexpr,
             F32: tl.constexpr):  # fmt: skip
    acc = _zeros(BM, BN, SWAP, tl.float32)
    acc2 = _zeros(BM, BN, SWAP, tl.float32)
    offs_k = tl.arange(0, BK)
    for k0 in range(k_lo, k_hi, BK):
        a = _load_a(a_ptr, rows, offs_k, k0, mask_m, stride_am, K)
        acc += _bf16_step(a, wb_ptr, w_off, cols, mask_n, offs_k, k0, K, SWAP, F32)
        if PAIR:
            acc2 += _bf16_step(a, wb_ptr, w_off, cols + n_up, mask_n, offs_k, k0, K, SWAP, F32)
    return acc, acc2


@triton.jit
def tiled_scale_at(rows, ngroups, g):
    """Row ``rows``' scale or zero of group ``g`` in arena.tile_rows' order: its row group's 16 of that group, rows r
    and r + 8 side by side (arena.pair_slot)."""
    return (rows >> 4) * (16 * ngroups) + g * 16 + (rows & 7) * 2 + ((rows >> 3) & 1)


@triton.jit
def _wonly_step(a, asum, q, sc_ptr, zp_ptr, s_off, z_off, ngroups, group, cols, mask_n, k0, BITS: tl.constexpr,
                SWAP: tl.constexpr, SCALE_AFTER: tl.constexpr, F32: tl.constexpr, FOLD_Z: tl.constexpr,
                KMAJOR: tl.constexpr = False, TILED: tl.constexpr = False):  # fmt: skip
    """A K tile's product from its codes ``q``. FOLD_Z (CUDA-core products): the zero point is taken off
    each weight (one add per weight) instead of off the sum (z * sum(a): a reduction of the tile's
    activations over the whole program, two barriers per K tile in the sm_90 SASS). TILED: the scales and
    zeros in arena.tile_rows' order."""
    # BK never exceeds the smallest group of the layer (pick_tiles), so a tile has one group
    if TILED:
        g = tiled_scale_at(cols, ngroups, k0 // group)
    else:
        g = cols * ngroups + k0 // group
    s = tl.load(sc_ptr + s_off + g, mask=mask_n, other=0.0).to(tl.float32)
    z = tl.load(zp_ptr + z_off + g, mask=mask_n, other=0.0).to(tl.float32)
    if SCALE_AFTER:
        # (the interpreter converts int32 to bf16 wrongly, seen with triton 3.9: via fp32)
        if SWAP == FMA:  # fp32 operands: q is already the bits of 128 + code (256, 512 + code): _fma_codes
            wq = q.to(tl.float32, bitcast=True)
            z = z + (256.0 if BITS == 8 else (512.0 if BITS == 3 else 128.0))
        elif BITS == 8:
            wq = q.to(tl.float32).to(tl.bfloat16)  # exact: 8 significant bits
        else:
            wq = (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)  # 128 + q, exactly
            z = z + 128.0
        # zero points are integers and the codes exact, so only fp32 sums round here
        if FOLD_Z:
            tl.static_assert(SWAP == FMA, "the zero point folded into the weights: CUDA-core products only")
            r = _dot(a, wq - _per_n(z, SWAP), SWAP, F32) * _per_n(s, SWAP)
        else:
            r = (_dot(a, wq, SWAP, F32) - _per_n(z, SWAP) * _per_m(asum, SWAP)) * _per_n(s, SWAP)
    elif KMAJOR:  # q is [BN, BK] (_mm_wonly): dequantized so, then transposed into the MMA
        r = _dot(a, tl.trans(_bf16((q.to(tl.float32) - z[:, None]) * s[:, None], F32)), SWAP, F32)
    else:
        r = _dot(a, _bf16((q.to(tl.float32) - _per_n(z, SWAP)) * _per_n(s, SWAP), F32), SWAP, F32)
    return r


@triton.jit
def _mm_wonly(a_ptr, rows, mask_m, stride_am, wi_ptr, sc_ptr, zp_ptr, w_off, s_off, z_off, group, cols, n_up,
              mask_n, k_lo, k_hi, K, one, BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              BK: tl.constexpr, SWAP: tl.constexpr, SCALE_AFTER: tl.constexpr, PAIR: tl.constexpr,
              F32: tl.constexpr, K128: tl.constexpr, PREFETCH: tl.constexpr, FOLD_Z: tl.constexpr,
              KMAJOR: tl.constexpr = False):  # fmt: skip
    acc = _zeros(BM, BN, SWAP, tl.float32)
    acc2 = _zeros(BM, BN, SWAP, tl.float32)
    offs_k = tl.arange(0, BK)
    ngroups = K // group
    if PREFETCH:
        # the next K tile's words and activations are loaded before this tile's products, so
        # their latency hides behind the arithmetic (Triton pipelines only loads that feed an MMA)
        k1 = tl.where(k_lo < k_hi, k_lo, 0)  # an empty split loads tile 0 (in bounds) and uses nothing
        a = _load_a(a_ptr, rows, offs_k, k1, mask_m, stride_am, K)
        g_hi, g_lo = _int_words(wi_ptr, w_off, cols, k1, K, mask_n, BITS, BK, SWAP, K128)
        u_hi, u_lo = g_hi, g_lo
        if PAIR:
            u_hi, u_lo = _int_words(wi_ptr, w_off, cols + n_up, k1, K, mask_n, BITS, BK, SWAP, K128)
        for k0 in range(k_lo, k_hi, BK):
            nk = tl.where(k0 + BK < k_hi, k0 + BK, k0)  # the last tile loads itself again (in cache)
            a_next = _load_a(a_ptr, rows, offs_k, nk, mask_m, stride_am, K)
            g_hi2, g_lo2 = _int_words(wi_ptr, w_off, cols, nk, K, mask_n, BITS, BK, SWAP, K128)
            u_hi2, u_lo2 = g_hi2, g_lo2
            if PAIR:
                u_hi2, u_lo2 = _int_words(wi_ptr, w_off, cols + n_up, nk, K, mask_n, BITS, BK, SWAP, K128)
            asum = tl.sum(a.to(tl.float32), axis=1)
            acc += _wonly_step(a, asum, _wonly_codes(g_hi, g_lo, one, BITS, BK, SWAP), sc_ptr, zp_ptr, s_off, z_off,
                               ngroups, group, cols, mask_n, k0, BITS, SWAP, SCALE_AFTER, F32, FOLD_Z,
                               TILED=K128 == 2)  # fmt: skip
            if PAIR:
                acc2 += _wonly_step(a, asum, _wonly_codes(u_hi, u_lo, one, BITS, BK, SWAP), sc_ptr, zp_ptr, s_off,
                                    z_off, ngroups, group, cols + n_up, mask_n, k0, BITS, SWAP, SCALE_AFTER, F32,
                                    FOLD_Z, TILED=K128 == 2)  # fmt: skip
            a, g_hi, g_lo, u_hi, u_lo = a_next, g_hi2, g_lo2, u_hi2, u_lo2
    else:
        # KMAJOR (prefill, weights on the N side): the codes unpacked as [BN, BK], each thread's along K,
        # so that the dequantized tile goes to the MMA's shared memory in K-contiguous vectors
        WS: tl.constexpr = 1 if KMAJOR else SWAP
        for k0 in range(k_lo, k_hi, BK):
            a = _load_a(a_ptr, rows, offs_k, k0, mask_m, stride_am, K)
            asum = tl.sum(a.to(tl.float32), axis=1)  # unused (and removed) unless SCALE_AFTER
            hi, lo = _int_words(wi_ptr, w_off, cols, k0, K, mask_n, BITS, BK, WS, K128)
            q = _wonly_codes(hi, lo, one, BITS, BK, WS)
            acc += _wonly_step(a, asum, q, sc_ptr, zp_ptr, s_off, z_off, ngroups, group, cols, mask_n, k0, BITS,
                               SWAP, SCALE_AFTER, F32, FOLD_Z, KMAJOR, K128 == 2)  # fmt: skip
            if PAIR:
                hi, lo = _int_words(wi_ptr, w_off, cols + n_up, k0, K, mask_n, BITS, BK, WS, K128)
                q = _wonly_codes(hi, lo, one, BITS, BK, WS)
                acc2 += _wonly_step(a, asum, q, sc_ptr, zp_ptr, s_off, z_off, ngroups, group, cols + n_up, mask_n,
                                    k0, BITS, SWAP, SCALE_AFTER, F32, FOLD_Z, KMAJOR, K128 == 2)  # fmt: skip
    return acc, acc2


@triton.jit
def _row_amax(amax_ptr, rows, mask_m):
    """Per-row |a| max, computed once per launch (moe.py): the quantization to fp8/int8 itself
    happens here in registers, but an in-program amax pass would re-read A for every N tile."""
    return tl.maximum(tl.load(amax_ptr + rows, mask=mask_m, other=1.0), 1e-8)


@triton.jit
def _fp8_step(acc, aq, wf_ptr, w_off, cols, mask_n, offs_k, k0, K, SWAP: tl.constexpr):
    """``acc`` plus a K tile's fp8 product, the accumulator passed into the MMA (as SGLang's fused_moe
    does for fp8). Triton does not fuse ``acc + dot`` for fp8, whose MMA accumulates in less than fp32:
    each K tile's wgmma chain then started from zero, was waited for at once, and its result was added
    with 64 FADDs a thread (sm_90 SASS: 254 registers for gate/up, 24 bytes of stack)."""
    w = _load_w(wf_ptr, w_off, cols, mask_n, offs_k, k0, K, SWAP)
    if SWAP == FMA:
        return acc + _dot(aq, w, SWAP, False)
    elif SWAP:
        return tl.dot(w, tl.trans(aq), acc=acc)
    else:
        return tl.dot(aq, w, acc=acc)


@triton.jit
def _mm_fp8(amax_ptr, a8_ptr, rows, mask_m, stride_am, wf_ptr, sc_ptr, w_off, s_off, cols, n_up, mask_n, k_lo,
            k_hi, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr,
            PAIR: tl.constexpr):  # fmt: skip
    a_s = tl.div_rn(_row_amax(amax_ptr, rows, mask_m), 448.0)  # exact division, as torch
    acc = _zeros(BM, BN, SWAP, tl.float32)
    acc2 = _zeros(BM, BN, SWAP, tl.float32)
    offs_k = tl.arange(0, BK)
    for k0 in range(k_lo, k_hi, BK):
        # A was quantized to fp8 per token once per launch (moe.py): loaded like the weights,
        # asynchronously, instead of being converted in registers for every N tile
        aq = _load_a(a8_ptr, rows, offs_k, k0, mask_m, stride_am, K)
        acc = _fp8_step(acc, aq, wf_ptr, w_off, cols, mask_n, offs_k, k0, K, SWAP)
        if PAIR:
            acc2 = _fp8_step(acc2, aq, wf_ptr, w_off, cols + n_up, mask_n, offs_k, k0, K, SWAP)
    ws = tl.load(sc_ptr + s_off + cols, mask=mask_n, other=0.0).to(tl.float32)
    ws2 = ws
    if PAIR:
        ws2 = tl.load(sc_ptr + s_off + cols + n_up, mask=mask_n, other=0.0).to(tl.float32)
    return acc * _per_m(a_s, SWAP) * _per_n(ws, SWAP), acc2 * _per_m(a_s, SWAP) * _per_n(ws2, SWAP)


@triton.jit
def _round_half_even(v):
    """torch.round's rule (ties to even), so int activations match the reference exactly."""
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where((r - v == 0.5) & odd, r - 1.0, r)


@triton.jit
def _wa_int_step(aq, wi_ptr, w_off, cols, mask_n, offs_k, k0, K, BITS: tl.constexpr, BK: tl.constexpr,
                 SWAP: tl.constexpr, K128: tl.constexpr):  # fmt: skip
    QPOS: tl.constexpr = (1 << (BITS - 1)) - 1
    q = _int_codes(wi_ptr, w_off, cols, k0, K, mask_n, BITS, BK, SWAP, K128)
    mn, kk = _nk(mask_n, k0 + offs_k, SWAP)
    return _dot(aq, tl.where(mn & (kk < K), q - (QPOS + 1), 0).to(tl.int8), SWAP, False)


@triton.jit
def _mm_wa_int(amax_ptr, a_ptr, rows, mask_m, stride_am, wi_ptr, sc_ptr, w_off, s_off, cols, n_up, mask_n, k_lo,
               k_hi, K, BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               SWAP: tl.constexpr, PAIR: tl.constexpr, K128: tl.constexpr):  # fmt: skip
    QPOS: tl.constexpr = (1 << (BITS - 1)) - 1
    a_s = tl.div_rn(_row_amax(amax_ptr, rows, mask_m), QPOS * 1.0)  # no inexact reciprocal
    acc = _zeros(BM, BN, SWAP, tl.int32)
    acc2 = _zeros(BM, BN, SWAP, tl.int32)
    offs_k = tl.arange(0, BK)
    for k0 in range(k_lo, k_hi, BK):
        a = _load_a(a_ptr, rows, offs_k, k0, mask_m, stride_am, K).to(tl.float32)
        aq = tl.minimum(tl.maximum(_round_half_even(tl.div_rn(a, a_s[:, None])), -QPOS - 1.0), QPOS * 1.0).to(tl.int8)
        acc += _wa_int_step(aq, wi_ptr, w_off, cols, mask_n, offs_k, k0, K, BITS, BK, SWAP, K128)
        if PAIR:
            acc2 += _wa_int_step(aq, wi_ptr, w_off, cols + n_up, mask_n, offs_k, k0, K, BITS, BK, SWAP, K128)
    ws = tl.load(sc_ptr + s_off + cols, mask=mask_n, other=0.0).to(tl.float32)
    ws2 = ws
    if PAIR:
        ws2 = tl.load(sc_ptr + s_off + cols + n_up, mask=mask_n, other=0.0).to(tl.float32)
    scale = _per_m(a_s, SWAP)
    return acc.to(tl.float32) * scale * _per_n(ws, SWAP), acc2.to(tl.float32) * scale * _per_n(ws2, SWAP)


@triton.jit
def _expert_tile(code, a_ptr, rows, mask_m, stride_am, wi_ptr, wb_ptr, wf_ptr, sc_ptr, zp_ptr, amax_ptr, a8_ptr,
                 w_off, s_off, z_off, group, cols, n_up, mask_n, k_lo, k_hi, K, one, CODES: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr,
                 SCALE_AFTER: tl.constexpr, PAIR: tl.constexpr, F32: tl.constexpr, K128: tl.constexpr,
                 PREFETCH: tl.constexpr, FOLD_Z: tl.constexpr, KMAJOR: tl.constexpr):  # fmt: skip
    """The expert's tile for columns ``cols`` and, with PAIR, for ``cols + n_up`` (else zeros)."""
    acc = _zeros(BM, BN, SWAP, tl.float32)
    acc2 = _zeros(BM, BN, SWAP, tl.float32)
    if CODES & 1:
        if code == 0:
            acc, acc2 = _mm_bf16(a_ptr, rows, mask_m, stride_am, wb_ptr, w_off, cols, n_up, mask_n, k_lo, k_hi, K,
                                 BM, BN, BK, SWAP, PAIR, F32)  # fmt: skip
    # weight-only integer codes 1..5 are 1, 2, 3, 4 and 8 bits (arena.CODE_WONLY)
    for c in tl.static_range(1, 6):
        if CODES & (1 << c):
            if code == c:
                acc, acc2 = _mm_wonly(a_ptr, rows, mask_m, stride_am, wi_ptr, sc_ptr, zp_ptr, w_off, s_off, z_off,
                                      group, cols, n_up, mask_n, k_lo, k_hi, K, one, c + 3 * (c == 5), BM, BN, BK,
                                      SWAP, SCALE_AFTER, PAIR, F32, K128, PREFETCH, FOLD_Z, KMAJOR)  # fmt: skip
    if CODES & 64:
        if code == 6:
            acc, acc2 = _mm_fp8(amax_ptr, a8_ptr, rows, mask_m, stride_am, wf_ptr, sc_ptr, w_off, s_off, cols, n_up,
                                mask_n, k_lo, k_hi, K, BM, BN, BK, SWAP, PAIR)  # fmt: skip
    for bits in tl.static_range(4, 9, 4):  # w4a4 (code 7), w8a8 int (code 8)
        if CODES & (1 << (6 + bits // 4)):
            if code == 6 + bits // 4:
                acc, acc2 = _mm_wa_int(amax_ptr, a_ptr, rows, mask_m, stride_am, wi_ptr, sc_ptr, w_off, s_off, cols,
                                       n_up, mask_n, k_lo, k_hi, K, bits, BM, BN, BK, SWAP, PAIR, K128)  # fmt: skip
    return acc, acc2


# The batch-dependent integers are not specialized: each of their equal-to-1 / divisible-by-16
# states would be one more compile (cold start, CUDA-graph capture over many batch sizes), and
# none of them feeds a vectorized address (num_valid is compared, amax_rot_rows offsets scalar
# loads, split sizes the K range). ``one`` is the integer 1, unspecialized so that it is not a
# constant (_fma_codes says why).
@triton.jit(do_not_specialize=["amax_rot_rows", "num_valid", "split", "one"])
def mx_moe_gemm_kernel(
    a_ptr,
    a_rot_off,
    amax_ptr,
    amax_rot_rows,
    a8_ptr,
    stride_am,
    out_ptr,
    stride_om,
    split_stride,
    sorted_ids_ptr,
    block_expert_ptr,
    num_post_pad_ptr,
    route_w_ptr,
    meta_ptr,
    wi_ptr,
    wb_ptr,
    wf_ptr,
    sc_ptr,
    zp_ptr,
    N,
    K,
    num_valid,
    a_div,
    split,
    one,
    GATE_UP: tl.constexpr,
    CODES: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PARTIAL: tl.constexpr,
    SWAP: tl.constexpr,
    SCALE_AFTER: tl.constexpr,
    F32: tl.constexpr,
    K128: tl.constexpr = False,  # Arena.k128: 1 where K % 128 == 0, 2 where the codes are tiled too
    PREFETCH: tl.constexpr = False,  # weight-only codes: load the next K tile first (CUDA-core path)
    FOLD_Z: tl.constexpr = False,  # weight-only codes: zero points off each weight (CUDA-core path)
    KMAJOR: tl.constexpr = False,  # weight-only prefill (SWAP 0): dequantized K-major, transposed into the MMA
    GROUP_M: tl.constexpr = 0,  # unswapped: programs taken GROUP_M blocks at a time, each over every N tile (0: off)
):
    if K128:  # K % 128 == 0: packed rows are whole 16-byte words, so code loads can be 16 bytes wide
        K = tl.multiple_of(K, 128)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    if SWAP:  # decode: programs taken N tile first, as the Gluon kernel takes them (moe_gemm_gluon.py says why)
        lin = pid_m + tl.num_programs(0) * (pid_n + tl.num_programs(1) * pid_s)
        pid_n = lin % tl.num_programs(1)
        pid_s = (lin // tl.num_programs(1)) % tl.num_programs(2)
        pid_m = lin // (tl.num_programs(1) * tl.num_programs(2))
    elif GROUP_M > 0:
        # the launch takes axis 0 fastest: one N tile of every block, then the next N tile of every block, so a
        # block's rows are read again once per N tile, after all other blocks' (at 4096 tokens the down GEMM's
        # input is 46 MB in fp8, 92 in bf16: past what L2 keeps). Here GROUP_M blocks take every N tile before the
        # next GROUP_M blocks start (as the Triton matmul tutorial and SGLang's GROUP_SIZE_M): their rows stay in L2
        n_m = tl.num_programs(0)
        per_group = GROUP_M * tl.num_programs(1)
        lin = pid_m + n_m * pid_n
        first = (lin // per_group) * GROUP_M
        size = tl.minimum(n_m - first, GROUP_M)
        pid_m = first + (lin % per_group) % size
        pid_n = (lin % per_group) // size
    if pid_m * BM >= tl.load(num_post_pad_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m)
    meta = meta_ptr + expert * 6
    code = tl.load(meta).to(tl.int32)
    if ((CODES >> code) & 1) == 0:  # another launch's expert (a dispatch per group of codes: moe.py)
        return
    ids = tl.load(sorted_ids_ptr + pid_m * BM + tl.arange(0, BM))
    mask_m = ids < num_valid
    rows = tl.where(mask_m, ids // a_div, 0)
    cols = pid_n * BN + tl.arange(0, BN)
    mask_n = cols < N
    # this program's share of K: whole BK tiles, so a tile still has one quantization group
    k_per = tl.cdiv(tl.cdiv(K, BK), split) * BK
    k_lo = pid_s * k_per
    k_hi = tl.minimum(K, k_lo + k_per)
    # arena offsets are multiples of 16 elements (build_arena pads): say so, or loads stay scalar
    w_off = tl.multiple_of(tl.load(meta + 1), 16)
    s_off = tl.multiple_of(tl.load(meta + 2), 16)
    z_off = tl.multiple_of(tl.load(meta + 3), 16)
    group = tl.load(meta + 4).to(tl.int32)
    rot = tl.load(meta + 5)  # 1: the expert reads the Hadamard-rotated copy of its input
    a_base = a_ptr + tl.multiple_of(rot * a_rot_off, 16)
    amax_base = amax_ptr + rot * amax_rot_rows
    a8_base = a8_ptr + tl.multiple_of(rot * a_rot_off, 16)
    # GATE_UP: rows [0, N) of the expert's fused weight are gate, [N, 2N) up: one loop for both
    res, up = _expert_tile(code, a_base, rows, mask_m, stride_am, wi_ptr, wb_ptr, wf_ptr, sc_ptr, zp_ptr,
                           amax_base, a8_base, w_off, s_off, z_off, group, cols, N, mask_n, k_lo, k_hi, K, one,
                           CODES, BM, BN, BK, SWAP, SCALE_AFTER, GATE_UP, F32, K128, PREFETCH, FOLD_Z,
                           KMAJOR and not SWAP and not SCALE_AFTER)  # fmt: skip
    mask = _per_m(mask_m, SWAP) & _per_n(mask_n, SWAP)
    out = out_ptr + pid_s * split_stride + _per_m(ids, SWAP) * stride_om + _per_n(cols, SWAP)
    if GATE_UP:
        if PARTIAL:
            # fp32 partial sums of gate and up side by side; the SiLU comes after the sum (moe.py)
            tl.store(out, res, mask=mask)
            tl.store(out + N, up, mask=mask)
        else:
            # gate and up are rounded to bf16 first, as an unfused gate_up GEMM stores them (moe.py)
            res = _bf16(res, F32).to(tl.float32)
            up = _bf16(up, F32).to(tl.float32)
            res = _bf16(res / (1.0 + tl.exp(-res)) * up, F32)  # SiLU(gate) * up
            tl.store(out, res, mask=mask)
    else:
        res = res * _per_m(tl.load(route_w_ptr + ids, mask=mask_m, other=0.0), SWAP)
        if PARTIAL:
            tl.store(out, res, mask=mask)  # fp32 partial; the top-k sum adds the partials
        else:
            tl.store(out, _bf16(res, F32), mask=mask)


# batch-dependent or layout integers: none feeds a vectorized address, and each 1 would be a compile
@triton.jit(do_not_specialize=["rows", "slots", "first", "count"])
def silu_mul_kernel(ws_ptr, out_ptr, rows, N, slots, first, count, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
                    F32: tl.constexpr, PDL: tl.constexpr = False):  # fmt: skip
    """inter [rows, N] = SiLU(gate) * up from SPLIT fp32 partials [SPLIT, rows, 2N] of gate | up,
    rounded as the unsplit kernel rounds (gate and up to bf16 first). Program p takes row
    (p // count) * slots + first + p % count: slots first..first+count-1 of each token (all rows
    with 1, 0, 1)."""
    if PDL:  # gate | up are the launch before's (pdl.py)
        wait_then_release()
    p = tl.program_id(0)
    r = (p // count) * slots + first + p % count
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.zeros((BLOCK,), dtype=tl.float32)
    u = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        base = ws_ptr + (s * rows + r) * 2 * N
        g += tl.load(base + cols, mask=mask, other=0.0)
        u += tl.load(base + N + cols, mask=mask, other=0.0)
    g = _bf16(g, F32).to(tl.float32)
    u = _bf16(u, F32).to(tl.float32)
    tl.store(out_ptr + r * N + cols, _bf16(g / (1.0 + tl.exp(-g)) * u, F32), mask=mask)
