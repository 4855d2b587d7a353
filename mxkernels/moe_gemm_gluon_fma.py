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
whole 128s: moe_gemm_gluon.eligible). On the H200 it took the Triton kernel's time (eighth session):
the 1-token GEMM is bound by instructions per weight, not by barriers. PACKED runs 1, 2 and 4-bit
codes two per register in bf16 pairs instead (_product_packed: a quarter fewer instructions).
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
    the bits around it left as they fall (moe_gemm._plane_fields: one shift per value and level,
    the halves, codes k and k + 1 of the arena's pairs, split last)."""
    LEVELS: gl.constexpr = 5 - (P >= 2) - (P >= 4) - (P >= 8)  # 32 bits down to P
    q = words
    for level in gl.static_range(1, LEVELS):
        q = gl.join(q, q >> (16 >> level))
    q = gl.join(q << T, q >> (16 - T))
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
def _pairs(words, P: gl.constexpr):
    """[BN, 4, P] words of P-bit codes -> [BN, 4, 16] words, pair t of word i at index i 16/P + t
    with code 2t of the word at bit 0 and code 2t + 1 at bit 16 (the arena's pairs; the bits around
    them left as they fall): the join tree of _fields without its last level, one shift per two codes."""
    q = words
    for level in gl.static_range(1, 5 - (P >= 2) - (P >= 4)):
        q = gl.join(q, q >> (16 >> level))
    return gl.reshape(q, [words.shape[0], 4, 16])


@gluon.jit
def _bf16_bits(x):
    """Finite fp32 -> the bits of x rounded to the nearest bf16 (ties to even), in the low half of an
    int32. By integer arithmetic: the interpreter's conversion truncates (moe_gemm._bf16)."""
    b = x.to(gl.int32, bitcast=True)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF


@gluon.jit
def _halves(x):
    """Two bf16 packed in an int32 -> (low, high) as fp32, exactly."""
    return (x << 16).to(gl.float32, bitcast=True), ((x >> 16) << 16).to(gl.float32, bitcast=True)


@gluon.jit
def _bf16x2_fma(h, a2, c2, p, ASM: gl.constexpr):
    """p + a2 (h - c2) on two bf16 per int32 (fma.rn.bf16x2): h - c2 is exact (128 + code less 128 +
    zero point, small integers), the product and sum round to bf16 once. Without ASM (the interpreter,
    which runs no PTX) the same arithmetic on each half in fp32, rounded to bf16."""
    if ASM:
        r = gl.inline_asm_elementwise("{ .reg .b32 d; sub.rn.bf16x2 d, $1, $3; fma.rn.bf16x2 $0, $2, d, $4; }",
                                      "=r,r,r,r,r", [h, a2, c2, p], dtype=gl.int32, is_pure=True, pack=1)  # fmt: skip
    else:
        hl, hh = _halves(h)
        al, ah = _halves(a2)
        cl, ch = _halves(c2)
        pl, ph = _halves(p)
        r = _bf16_bits(al * (hl - cl) + pl) | (_bf16_bits(ah * (hh - ch) + ph) << 16)
    return r


@gluon.constexpr_function
def _groups():
    """[rows, 4, 4, 4]: a lane's 16 pairs of codes (or of activations) as 4 chains of 4, in registers."""
    return gl.BlockedLayout([1, 1, 4, 4], [8, 4, 1, 1], [WARPS, 1, 1, 1], [3, 2, 1, 0])


@gluon.jit
def _chain(h, a2, c2, p, N: gl.constexpr, ASM: gl.constexpr):
    """p [rows, 4, 4] after N packed fused multiply-adds along the last dimension of h and a2
    ([rows, 4, 4, N]), in one chain per element of p (the halves split off recursively, as _dot)."""
    if N == 1:
        P3: gl.constexpr = gl.SliceLayout(3, _groups())
        h = gl.convert_layout(gl.reshape(h, [h.shape[0], 4, 4]), P3, assert_trivial=True)
        a2 = gl.convert_layout(gl.reshape(a2, [h.shape[0], 4, 4]), P3, assert_trivial=True)
        p = _bf16x2_fma(h, a2, c2, p, ASM)
    else:
        h0, h1 = gl.split(gl.reshape(h, [h.shape[0], 4, 4, N // 2, 2]))
        a0, a1 = gl.split(gl.reshape(a2, [h.shape[0], 4, 4, N // 2, 2]))
        p = _chain(h1, a1, c2, _chain(h0, a0, c2, p, N // 2, ASM), N // 2, ASM)
    return p


@gluon.jit
def _act_pairs(a):
    """[1, 4, 32] bf16 activations -> [1, 4, 4, 4] int32 in _pairs' order (flattened): pair m holds
    k = 2m in its low half and 2m + 1 in its high half."""
    lo, hi = gl.split(gl.reshape(a, [1, 4, 16, 2]))
    lo = gl.reshape(lo.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF, [1, 4, 4, 4])
    hi = gl.reshape(hi.to(gl.int16, bitcast=True).to(gl.int32) << 16, [1, 4, 4, 4])
    return gl.convert_layout(lo | hi, _groups(), assert_trivial=True)


@gluon.jit
def _product_packed(w, s, z, a2, one, BITS: gl.constexpr, ASM: gl.constexpr):
    """One tile's [BN, 4] partials for 1, 2 or 4-bit codes with packed bf16 arithmetic: two codes per
    register as bf16 128 + code (one AND and OR: 0x43004300), the zero point taken off both at once
    exactly, then one fused multiply-add for both products. Each half's chain adds 4 products in bf16
    before its sum goes to fp32 (a bf16 rounding per product); scaled once per tile. ``z``: 128 + zero
    point. The w4 gate/up loop: 432 instructions per K tile against 571, 82 registers against 127 (sm_90)."""
    P3: gl.constexpr = gl.SliceLayout(3, _groups())
    h = (_pairs(w, BITS) & ((one * ((1 << BITS) - 1)) * 0x10001)) | (one * 0x43004300)
    h = gl.convert_layout(gl.reshape(h, [h.shape[0], 4, 4, 4]), _groups(), assert_trivial=True)
    a2, h = gl.broadcast(a2, h)  # the activations of every row: the same registers
    c = gl.convert_layout(_bf16_bits(z), gl.SliceLayout(1, gl.SliceLayout(2, P3)), assert_trivial=True)
    p = gl.zeros([h.shape[0], 4, 4], gl.int32, layout=P3)
    c2, p = gl.broadcast((c | (c << 16))[:, None, None], p)
    p = _chain(h, a2, c2, p, 4, ASM)
    lo, hi = _halves(p)
    part = gl.convert_layout(gl.reduce(lo + hi, 2, _add), gl.SliceLayout(2, _lanes(32)), assert_trivial=True)
    return part * s[:, None]


@gluon.jit
def _rows(rb, r0, N, BN: gl.constexpr):
    """Weight rows rb + r0 .. (rows past N read row N - 1, whose results are never stored)."""
    return rb + gl.minimum(r0 + gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, _lanes(32)))), N - 1)


@gluon.jit
def _weights(wi_ptr, wb_ptr, rb, r0, N, k0, K, BITS: gl.constexpr, BN: gl.constexpr, P: gl.constexpr = 0,
             LOW: gl.constexpr = 0, TILED: gl.constexpr = False):  # fmt: skip
    """One K tile of weight rows: [BN, 4, 32] bf16, or [BN, 4, W] words of one bit plane (P bits
    wide with LOW bits of planes before it in a row; P 0: the whole code, W = its bits)."""
    W: gl.constexpr = 32 if BITS == 16 else (BITS if P == 0 else P)
    L: gl.constexpr = _lanes(W)
    r = (rb + gl.minimum(r0 + gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, L))), N - 1))[:, None, None]
    c = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, L)))[None, :, None]
    i = gl.arange(0, W, layout=gl.SliceLayout(0, gl.SliceLayout(1, L)))[None, None, :]
    if BITS == 16:
        ptr = wb_ptr + r * K + k0 + c * 32 + i
    elif TILED:  # arena.tile_words' order
        tile = wi_ptr + (r >> 4) * (K // 32 * BITS * 16) + (r & 15) * (4 * W) + 64 * LOW + k0 // 128 * (64 * BITS)
        ptr = tile + c * W + i
    else:
        ptr = wi_ptr + r * (K // 32 * BITS) + K // 32 * LOW + k0 // 32 * W + c * W + i
    return gl.load(ptr)


@gluon.jit
def _tile(wi_ptr, wb_ptr, sc_ptr, zp_ptr, rb, r0, N, k0, K, group, BITS: gl.constexpr, BN: gl.constexpr,
          TILED: gl.constexpr):  # fmt: skip
    """Loads of one K tile of rows rb + r0 ..: weights (3 bits: both planes), scale, zero point plus
    the codes' offset (1 and 0 for bf16)."""
    if BITS == 3:
        w = _weights(wi_ptr, wb_ptr, rb, r0, N, k0, K, BITS, BN, 2, 0, TILED)
        wx = _weights(wi_ptr, wb_ptr, rb, r0, N, k0, K, BITS, BN, 1, 2, TILED)
    else:
        w = _weights(wi_ptr, wb_ptr, rb, r0, N, k0, K, BITS, BN, TILED=TILED)
        wx = w
    if BITS == 16:
        s = gl.full([BN], 1.0, gl.float32, layout=gl.SliceLayout(1, gl.SliceLayout(2, _lanes(32))))
        z = s * 0.0
    else:
        rows = _rows(rb, r0, N, BN)
        if TILED:  # arena.tile_rows' order (as moe_gemm.tiled_scale_at, which the Triton kernels call)
            g = (rows >> 4) * (16 * (K // group)) + (k0 // group) * 16 + (rows & 7) * 2 + ((rows >> 3) & 1)
        else:
            g = rows * (K // group) + k0 // group
        offset: gl.constexpr = 256.0 if BITS == 8 else (512.0 if BITS == 3 else 128.0)
        s = gl.load(sc_ptr + g).to(gl.float32)
        z = gl.load(zp_ptr + g).to(gl.float32) + offset
    return w, wx, s, z


@gluon.jit
def _acts(a_base, tok, k0, PK: gl.constexpr):
    """One K tile of the token's activations as [1, 4, 32] fp32: chunk c in every lane of chunk c;
    with PK as _act_pairs gives them to _product_packed."""
    AL: gl.constexpr = gl.SliceLayout(0, _lanes(32))
    c = gl.arange(0, 4, layout=gl.SliceLayout(1, AL))[:, None]
    j = gl.arange(0, 32, layout=gl.SliceLayout(0, AL))[None, :]
    a = gl.load(a_base + tok + k0 + c * 32 + j)[None, :, :]
    if PK:
        a = _act_pairs(a)
    else:
        a = a.to(gl.float32)
    return a


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
def _product(w, wx, s, z, a, one, BITS: gl.constexpr, PK: gl.constexpr, ASM: gl.constexpr):
    """One tile's [BN, 4] partials, a chunk's each: s (sum(a w) - z sum(a)) along its 32 k (PK: packed
    bf16 arithmetic, _product_packed)."""
    if PK:
        r = _product_packed(w, s, z, a, one, BITS, ASM)
    else:
        f = _floats(w, wx, one, BITS)
        a_rows, f = gl.broadcast(a, f)  # the activations of every row: the same registers
        r = _dot(f, a_rows, gl.zeros([f.shape[0], 4], gl.float32, layout=gl.SliceLayout(2, _lanes(32))), 32)
        if BITS != 16:
            r = (r - z[:, None] * gl.reduce(a, 2, _add)) * s[:, None]
    return r


@gluon.jit
def _expert(wi_ptr, wb_ptr, sc_ptr, zp_ptr, a_base, tok, r0, N, K, group, k_lo, k_hi, one, BITS: gl.constexpr,
            BN: gl.constexpr, GATE_UP: gl.constexpr, PACKED: gl.constexpr, ASM: gl.constexpr,
            TILED: gl.constexpr):  # fmt: skip
    """The K loop over [k_lo, k_hi) of one expert (gate and up together for GATE_UP), the next tile's
    loads in registers while this tile's products run. Returns the rows' sums [BN] (and up's)."""
    P2: gl.constexpr = gl.SliceLayout(2, _lanes(32))
    PK: gl.constexpr = PACKED and (BITS == 1 or BITS == 2 or BITS == 4)
    acc = gl.zeros([BN, 4], gl.float32, layout=P2)
    acc2 = gl.zeros([BN, 4], gl.float32, layout=P2)
    # an empty split still loads one valid tile (unused), so no load needs a mask
    k0 = gl.minimum(k_lo, K - _BK)
    w, wx, s, z = _tile(wi_ptr, wb_ptr, sc_ptr, zp_ptr, 0, r0, N, k0, K, group, BITS, BN, TILED)
    w2, wx2, s2, z2 = w, wx, s, z
    if GATE_UP:  # rows [N, 2N) of the fused weight are up: same loop, same activations
        w2, wx2, s2, z2 = _tile(wi_ptr, wb_ptr, sc_ptr, zp_ptr, N, r0, N, k0, K, group, BITS, BN, TILED)
    a = _acts(a_base, tok, k0, PK)
    for k0 in range(k_lo, k_hi, _BK):
        kn = gl.minimum(k0 + _BK, k_hi - _BK)  # the last tile loads itself again, from cache
        wn, wxn, sn, zn = _tile(wi_ptr, wb_ptr, sc_ptr, zp_ptr, 0, r0, N, kn, K, group, BITS, BN, TILED)
        w2n, wx2n, s2n, z2n = wn, wxn, sn, zn
        if GATE_UP:
            w2n, wx2n, s2n, z2n = _tile(wi_ptr, wb_ptr, sc_ptr, zp_ptr, N, r0, N, kn, K, group, BITS, BN, TILED)
        an = _acts(a_base, tok, kn, PK)
        acc += _product(w, wx, s, z, a, one, BITS, PK, ASM)
        if GATE_UP:
            acc2 += _product(w2, wx2, s2, z2, a, one, BITS, PK, ASM)
        w, wx, s, z, a, w2, wx2, s2, z2 = wn, wxn, sn, zn, an, w2n, wx2n, s2n, z2n
    return gl.reduce(acc, 1, _add), gl.reduce(acc2, 1, _add)  # the 4 lanes of each row meet once


@gluon.jit(do_not_specialize=["num_valid", "split", "one"])
def mx_moe_gemm_gluon_fma_kernel(a_ptr, a_rot_off, stride_am, out_ptr, stride_om, split_stride, sorted_ids_ptr,
                                 block_expert_ptr, num_post_pad_ptr, route_w_ptr, meta_ptr, wi_ptr, wb_ptr, sc_ptr,
                                 zp_ptr, N, K, num_valid, a_div, split, one, GATE_UP: gl.constexpr,
                                 CODES: gl.constexpr, BN: gl.constexpr, PARTIAL: gl.constexpr,
                                 PACKED: gl.constexpr = False, ASM: gl.constexpr = True,
                                 TILED: gl.constexpr = False):  # fmt: skip
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
                                  GATE_UP, PACKED, ASM, TILED)  # fmt: skip
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
