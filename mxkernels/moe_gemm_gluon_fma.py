"""The 1-token grouped GEMM on CUDA cores, with its register layouts spelled out (Gluon).

At about one row per expert (decode at 1 token) the products run on CUDA cores, one row per
program: no MMA wants a tile of one row. The Triton version (moe_gemm.py, SWAP == FMA) leaves
the layouts to Triton, whose choice costs 4 barriers per K tile in the sm_90 SASS: two to sum
the tile's activations over the whole program (the zero-point term) and two to move the
activations into the weight tile's layout through shared memory (benchmarks/README.md, seventh
session). Here lane 4 r + c of a warp holds 32 consecutive k (chunk c of a 128-deep K tile) of
weight row r, as 16-byte loads of its packed codes, and loads the 32 activations of the same k
itself. It multiplies and sums along those k in registers, sums its activations for the
zero-point term the same way, and keeps one partial per chunk; the 4 lanes of a row meet once,
after the K loop. Nothing goes through shared memory and the loop has no barrier.

The codes become floats as in the Triton version: each field cut by shifts only and kept at the
bit where ORing 128.0's bits makes 128 + code (moe_gemm._plane_fields), the scale and zero point
applied once per row and K tile: ``s (sum(a (128 + q)) - (128 + z) sum(a))``. Same grid, routing
arguments and results as :func:`mxkernels.moe_gemm.mx_moe_gemm_kernel` with SWAP == FMA and one
row per block, for the experts the Gluon MMA kernel runs (bf16 and weight-only codes, groups of
whole 128s: moe_gemm_gluon.eligible).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

WARPS = 4  # 8 weight rows per warp, 4 lanes per row
BN = 16 * WARPS  # weight rows per program: two repetitions of the 8 x WARPS rows a layout covers
BK = 128  # 4 lanes x 32 consecutive k
_WARPS = gl.constexpr(WARPS)
_BK = gl.constexpr(BK)


@gluon.constexpr_function
def _lanes(width):
    """[rows, 4, width]: lane 4 r + c of warp w holds row 8 w + r (and 8 WARPS further per
    repetition) and the ``width`` elements of chunk c, in consecutive registers."""
    return gl.BlockedLayout([1, 1, width], [8, 4, 1], [WARPS, 1, 1], [2, 1, 0])


@gluon.jit
def _add(x, y):
    # the sums' combine function, not gl.sum: that one's combine is a @triton.jit function, which under
    # TRITON_INTERPRET (CI) becomes an interpreted one that this kernel's sm_90 compile cannot call
    return x + y


@gluon.jit
def _fields(words, P: gl.constexpr, T: gl.constexpr):
    """[BN, 4, P] words of P-bit codes (32 k per lane) -> [BN, 4, 32] with code j's field at bit T,
    the bits around it left as they fall (moe_gemm._plane_fields: one shift per value and level)."""
    LEVELS: gl.constexpr = 5 - (P >= 2) - (P >= 4) - (P >= 8)  # 32 bits down to P
    q = gl.join(words << T, words >> (16 - T))
    for level in gl.static_range(1, LEVELS):
        q = gl.join(q, q >> (16 >> level))
    q = gl.reshape(q, [words.shape[0], 4, 32])
    return gl.convert_layout(q, _lanes(32), assert_trivial=True)  # registers renamed, nothing moved


@gluon.jit
def _floats(w, wx, one, BITS: gl.constexpr):
    """A tile's weights as fp32 [BN, 4, 32]: bf16 as they are, codes as 128 + code (256 for 8 bits,
    512 for 3, whose 2-bit plane sits at bit 14 and 1-bit plane at 16). ``one`` is the integer 1
    at run time, so that masks and exponent bits stay in registers (moe_gemm._fma_codes)."""
    if BITS == 16:
        f = w.to(gl.float32)
    else:
        if BITS == 3:
            q = (_fields(w, 2, 14) & ((one * 3) << 14)) | (_fields(wx, 1, 16) & (one << 16)) | ((one * 0x11) << 26)
        elif BITS == 8:
            q = (_fields(w, 8, 15) & ((one * 255) << 15)) | ((one * 0x87) << 23)
        else:
            q = (_fields(w, BITS, 16) & (((one << BITS) - one) << 16)) | ((one * 0x43) << 24)
        f = q.to(gl.float32, bitcast=True)
    return f


@gluon.jit
def _rows(rb, r0, N, BN: gl.constexpr):
    """Weight rows rb + r0 .. (rows past N read row N - 1, whose results are never stored)."""
    return rb + gl.minimum(r0 + gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, _lanes(32)))), N - 1)


@gluon.jit
def _weights(wi_ptr, wb_ptr, rb, r0, N, k0, K, BITS: gl.constexpr, BN: gl.constexpr, P: gl.constexpr = 0,
             LOW: gl.constexpr = 0):  # fmt: skip
    """One K tile of weight rows: [BN, 4, 32] bf16, or [BN, 4, W] words of one bit plane (P bits
    wide with LOW bits of planes before it in a row; P 0: the whole code, W = its bits)."""
    W: gl.constexpr = 32 if BITS == 16 else (BITS if P == 0 else P)
    L: gl.constexpr = _lanes(W)
    r = (rb + gl.minimum(r0 + gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, L))), N - 1))[:, None, None]
    c = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, L)))[None, :, None]
    i = gl.arange(0, W, layout=gl.SliceLayout(0, gl.SliceLayout(1, L)))[None, None, :]
    if BITS == 16:
        ptr = wb_ptr + r * K + k0 + c * 32 + i
    else:
        ptr = wi_ptr + r * (K // 32 * BITS) + K // 32 * LOW + k0 // 32 * W + c * W + i
    return gl.load(ptr)


@gluon.jit
def _tile(wi_ptr, wb_ptr, sc_ptr, zp_ptr, rb, r0, N, k0, K, group, BITS: gl.constexpr, BN: gl.constexpr):
    """Loads of one K tile of rows rb + r0 ..: weights (3 bits: both planes), scale, zero point plus
    the codes' offset (1 and 0 for bf16)."""
    if BITS == 3:
        w = _weights(wi_ptr, wb_ptr, rb, r0, N, k0, K, BITS, BN, 2, 0)
        wx = _weights(wi_ptr, wb_ptr, rb, r0, N, k0, K, BITS, BN, 1, 2)
    else:
        w = _weights(wi_ptr, wb_ptr, rb, r0, N, k0, K, BITS, BN)
        wx = w
    if BITS == 16:
        s = gl.full([BN], 1.0, gl.float32, layout=gl.SliceLayout(1, gl.SliceLayout(2, _lanes(32))))
        z = s * 0.0
    else:
        g = _rows(rb, r0, N, BN) * (K // group) + k0 // group
        offset: gl.constexpr = 256.0 if BITS == 8 else (512.0 if BITS == 3 else 128.0)
        s = gl.load(sc_ptr + g).to(gl.float32)
        z = gl.load(zp_ptr + g).to(gl.float32) + offset
    return w, wx, s, z


@gluon.jit
def _acts(a_base, tok, k0):
    """One K tile of the token's activations as [1, 4, 32] fp32: chunk c in every lane of chunk c."""
    AL: gl.constexpr = gl.SliceLayout(0, _lanes(32))
    c = gl.arange(0, 4, layout=gl.SliceLayout(1, AL))[:, None]
    j = gl.arange(0, 32, layout=gl.SliceLayout(0, AL))[None, :]
    return gl.load(a_base + tok + k0 + c * 32 + j).to(gl.float32)[None, :, :]


@gluon.jit
def _dot(f, a, acc, N: gl.constexpr):
    """acc + sum(f a) along the last dimension (N, in registers) as one chain of N fused multiply-adds:
    the halves split off recursively (a reduction would sum the products in a tree, about half its
    multiplies left unfused in the sm_90 SASS)."""
    if N == 1:
        prod = gl.reshape(f, [f.shape[0], 4]) * gl.reshape(a, [f.shape[0], 4])
        acc = acc + gl.convert_layout(prod, gl.SliceLayout(2, _lanes(32)), assert_trivial=True)
    else:
        f0, f1 = gl.split(gl.reshape(f, [f.shape[0], 4, N // 2, 2]))
        a0, a1 = gl.split(gl.reshape(a, [f.shape[0], 4, N // 2, 2]))
        acc = _dot(f1, a1, _dot(f0, a0, acc, N // 2), N // 2)
    return acc


@gluon.jit
def _product(w, wx, s, z, a, one, BITS: gl.constexpr):
    """One tile's [BN, 4] partials, a chunk's each: s (sum(a w) - z sum(a)) along its 32 k."""
    f = _floats(w, wx, one, BITS)
    a_rows, f = gl.broadcast(a, f)  # the activations of every row: the same registers
    dot = _dot(f, a_rows, gl.zeros([f.shape[0], 4], gl.float32, layout=gl.SliceLayout(2, _lanes(32))), 32)
    if BITS == 16:
        return dot
    else:
        return (dot - z[:, None] * gl.reduce(a, 2, _add)) * s[:, None]


@gluon.jit
def _expert(wi_ptr, wb_ptr, sc_ptr, zp_ptr, a_base, tok, r0, N, K, group, k_lo, k_hi, one, BITS: gl.constexpr,
            BN: gl.constexpr, GATE_UP: gl.constexpr):  # fmt: skip
    """The K loop over [k_lo, k_hi) of one expert (gate and up together for GATE_UP), the next tile's
    loads in registers while this tile's products run. Returns the rows' sums [BN] (and up's)."""
    P2: gl.constexpr = gl.SliceLayout(2, _lanes(32))
    acc = gl.zeros([BN, 4], gl.float32, layout=P2)
    acc2 = gl.zeros([BN, 4], gl.float32, layout=P2)
    # an empty split still loads one valid tile (unused), so no load needs a mask
    k0 = gl.minimum(k_lo, K - _BK)
    w, wx, s, z = _tile(wi_ptr, wb_ptr, sc_ptr, zp_ptr, 0, r0, N, k0, K, group, BITS, BN)
    w2, wx2, s2, z2 = w, wx, s, z
    if GATE_UP:  # rows [N, 2N) of the fused weight are up: same loop, same activations
        w2, wx2, s2, z2 = _tile(wi_ptr, wb_ptr, sc_ptr, zp_ptr, N, r0, N, k0, K, group, BITS, BN)
    a = _acts(a_base, tok, k0)
    for k0 in range(k_lo, k_hi, _BK):
        kn = gl.minimum(k0 + _BK, k_hi - _BK)  # the last tile loads itself again, from cache
        wn, wxn, sn, zn = _tile(wi_ptr, wb_ptr, sc_ptr, zp_ptr, 0, r0, N, kn, K, group, BITS, BN)
        w2n, wx2n, s2n, z2n = wn, wxn, sn, zn
        if GATE_UP:
            w2n, wx2n, s2n, z2n = _tile(wi_ptr, wb_ptr, sc_ptr, zp_ptr, N, r0, N, kn, K, group, BITS, BN)
        an = _acts(a_base, tok, kn)
        acc += _product(w, wx, s, z, a, one, BITS)
        if GATE_UP:
            acc2 += _product(w2, wx2, s2, z2, a, one, BITS)
        w, wx, s, z, a, w2, wx2, s2, z2 = wn, wxn, sn, zn, an, w2n, wx2n, s2n, z2n
    return gl.reduce(acc, 1, _add), gl.reduce(acc2, 1, _add)  # the 4 lanes of each row meet once


@gluon.jit(do_not_specialize=["num_valid", "split", "one"])
def mx_moe_gemm_gluon_fma_kernel(a_ptr, a_rot_off, stride_am, out_ptr, stride_om, split_stride, sorted_ids_ptr,
                                 block_expert_ptr, num_post_pad_ptr, route_w_ptr, meta_ptr, wi_ptr, wb_ptr, sc_ptr,
                                 zp_ptr, N, K, num_valid, a_div, split, one, GATE_UP: gl.constexpr,
                                 CODES: gl.constexpr, BN: gl.constexpr, PARTIAL: gl.constexpr):  # fmt: skip
    # eligible(): K is a multiple of 128 and the activations contiguous rows of K. Said, so that a
    # lane's chunk loads 16 bytes at a time
    K = gl.multiple_of(K, 128)
    stride_am = gl.multiple_of(stride_am, 128)
    pid_m = gl.program_id(0)
    pid_n = gl.program_id(1)
    if pid_m >= gl.load(num_post_pad_ptr):  # one row per block
        return
    row = gl.load(sorted_ids_ptr + pid_m)
    if row >= num_valid:  # a padding row: nothing to store
        return
    expert = gl.load(block_expert_ptr + pid_m)
    # the expert's meta row (arena.py), read as mx_moe_gemm_gluon_kernel reads it. Written out here, not a
    # jitted helper shared with that module: tests/gluon_shim.py runs each Gluon module's own source in the
    # interpreter, and a helper imported from the other module would stay compiled Gluon there
    meta = meta_ptr + expert * 6
    code = gl.load(meta).to(gl.int32)
    if ((CODES >> code) & 1) == 0:  # another launch's expert (a dispatch per group of codes: moe.py)
        return
    w_off = gl.multiple_of(gl.load(meta + 1), 16)
    s_off = gl.multiple_of(gl.load(meta + 2), 16)
    z_off = gl.multiple_of(gl.load(meta + 3), 16)
    group = gl.load(meta + 4).to(gl.int32)
    a_base = a_ptr + gl.multiple_of(gl.load(meta + 5) * a_rot_off, 128)  # the rotated copy, for rotated experts
    tok = gl.multiple_of((row // a_div) * stride_am, 128)
    k_per = gl.cdiv(gl.cdiv(K, _BK), split) * _BK
    k_lo = gl.program_id(2) * k_per
    k_hi = gl.minimum(K, k_lo + k_per)
    P1: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, _lanes(32)))
    res = gl.zeros([BN], gl.float32, layout=P1)
    up = gl.zeros([BN], gl.float32, layout=P1)
    for c in gl.static_range(0, 6):  # bf16 (code 0) and weight-only 1, 2, 3, 4 and 8 bits (code 5)
        if (CODES >> c) & 1:
            if code == c:
                res, up = _expert(wi_ptr + w_off, wb_ptr + w_off, sc_ptr + s_off, zp_ptr + z_off, a_base, tok,
                                  pid_n * BN, N, K, group, k_lo, k_hi, one, c + 16 * (c == 0) + 3 * (c == 5), BN,
                                  GATE_UP)  # fmt: skip
    cols = pid_n * BN + gl.arange(0, BN, layout=P1)
    out = out_ptr + gl.program_id(2) * split_stride + row * stride_om + cols
    if GATE_UP:
        if PARTIAL:
            gl.store(out, res, mask=cols < N)
            gl.store(out + N, up, mask=cols < N)
        else:
            # gate and up rounded to bf16 first, as the Triton kernel (and an unfused GEMM) stores them
            g = res.to(gl.bfloat16).to(gl.float32)
            u = up.to(gl.bfloat16).to(gl.float32)
            gl.store(out, (g / (1.0 + gl.exp(-g)) * u).to(gl.bfloat16), mask=cols < N)
    else:
        res = res * gl.load(route_w_ptr + row)
        if PARTIAL:
            gl.store(out, res, mask=cols < N)
        else:
            gl.store(out, res.to(gl.bfloat16), mask=cols < N)
