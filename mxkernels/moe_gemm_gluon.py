"""The decode grouped GEMM with weights loaded straight into MMA registers (Gluon), experimental.

Triton gives no say over the register layout of a dot operand, so the Triton
kernel's dequantized weight tile goes through shared memory to reach the MMA,
which bounds it at 2 to 64 tokens (benchmarks/README.md, ncu). Gluon, Triton's
layout-explicit dialect, lets a tensor be *born* in the operand layout: here
every weight element is loaded from its packed word by the thread whose
``mma.sync`` fragment holds it, split and turned into bf16 in that register,
and multiplied without shared memory (checked in the sm_90 SASS by
``tests/test_gluon.py``).

Same arguments, grid and results as :func:`mxkernels.moe_gemm.mx_moe_gemm_kernel`
with SWAP (weights on the MMA's M side, the tokens on N) for layers whose experts
are bf16 or weight-only integers; the launcher (moe.py, ``Tiles.gluon``) takes
it only for those, on a GPU (Triton's interpreter does not run Gluon). Codes are
read as packed (no shuffled layout yet): the words a fragment needs are
re-read by the threads that share them, from L1. Per K tile the codes minus the
zero point are exact in bf16 (integers below 256), so the group scale is applied
once to the tile's MMA result.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

WARPS = 4  # the MMA layout below: 4 warps along the weight rows (BN = 64, 16 rows per warp)
_WARPS = gl.constexpr(WARPS)


@gluon.jit
def _plane(wi_ptr, base, cols, mask_n, kc, K, row_words, P: gl.constexpr):
    """Codes of one bit plane of width P for the K indices ``kc``, each element from its word."""
    PER: gl.constexpr = 32 // P
    words = gl.load(wi_ptr + base + cols[:, None] * row_words + kc[None, :] // PER,
                    mask=mask_n[:, None] & (kc[None, :] < K), other=0)  # fmt: skip
    return (words >> ((kc[None, :] % PER) * P)) & ((1 << P) - 1)


@gluon.jit
def _wonly_tile(wi_ptr, sc_ptr, zp_ptr, w_off, s_off, z_off, group, cols, mask_n, cols_o, mask_no, kc, k0, K,
                BITS: gl.constexpr):  # fmt: skip
    """(codes - zero) as bf16 in the A-operand layout, and the tile's scale per row (MMA layout)."""
    if BITS == 3:
        q = _plane(wi_ptr, w_off, cols, mask_n, kc, K, K * 3 // 32, 2)
        q = q | (_plane(wi_ptr, w_off + K * 2 // 32, cols, mask_n, kc, K, K * 3 // 32, 1) << 2)
    else:
        q = _plane(wi_ptr, w_off, cols, mask_n, kc, K, K * BITS // 32, BITS)
    g = k0 // group  # BK never exceeds the smallest group (pick_tiles): one group per tile
    ngroups = K // group
    z = gl.load(zp_ptr + z_off + cols * ngroups + g, mask=mask_n, other=0.0).to(gl.float32)
    s = gl.load(sc_ptr + s_off + cols_o * ngroups + g, mask=mask_no, other=0.0).to(gl.float32)
    # a code ORed into the mantissa of 2^7 (2^8 for 8 bits) is 2^7 + code in fp32: no int-to-float
    # conversion. Codes and zero points are integers below 256, so (code - zero) is exact in bf16
    if BITS == 8:
        w = ((q << 15) | 0x43800000).to(gl.float32, bitcast=True) - (z + 256.0)[:, None]
    else:
        w = ((q << 16) | 0x43000000).to(gl.float32, bitcast=True) - (z + 128.0)[:, None]
    return w.to(gl.bfloat16), s


@gluon.jit
def _tile_product(code, a, wi_ptr, wb_ptr, sc_ptr, zp_ptr, w_off, s_off, z_off, group, cols, mask_n, cols_o,
                  mask_no, kc, k0, K, CODES: gl.constexpr, MMA: gl.constexpr):  # fmt: skip
    """One K tile's [BN, BM] product for the expert's kernel code (bf16 or weight-only)."""
    r = gl.zeros([cols.shape[0], a.shape[1]], gl.float32, layout=MMA)
    if CODES & 1:
        if code == 0:
            w = gl.load(wb_ptr + w_off + cols[:, None] * K + kc[None, :],
                        mask=mask_n[:, None] & (kc[None, :] < K), other=0.0)  # fmt: skip
            r = mma_v2(w, a, r)
    for c in gl.static_range(1, 6):  # weight-only 1, 2, 3, 4 and 8 bits (arena.CODE_WONLY)
        if CODES & (1 << c):
            if code == c:
                w, s = _wonly_tile(wi_ptr, sc_ptr, zp_ptr, w_off, s_off, z_off, group, cols, mask_n, cols_o, mask_no,
                                   kc, k0, K, c + 3 * (c == 5))  # fmt: skip
                r = mma_v2(w, a, r) * s[:, None]
    return r


@gluon.jit(do_not_specialize=["num_valid", "split"])
def mx_moe_gemm_gluon_kernel(a_ptr, a_rot_off, stride_am, out_ptr, stride_om, split_stride, sorted_ids_ptr,
                             block_expert_ptr, num_post_pad_ptr, route_w_ptr, meta_ptr, wi_ptr, wb_ptr, sc_ptr,
                             zp_ptr, N, K, num_valid, a_div, split, GATE_UP: gl.constexpr, CODES: gl.constexpr,
                             BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                             PARTIAL: gl.constexpr):  # fmt: skip
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[_WARPS, 1], instr_shape=[16, 8])
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)  # weights [BN, BK]
    B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)  # tokens [BK, BM]
    pid_m = gl.program_id(0)
    pid_n = gl.program_id(1)
    if pid_m * BM >= gl.load(num_post_pad_ptr):
        return
    expert = gl.load(block_expert_ptr + pid_m)
    meta = meta_ptr + expert * 6
    code = gl.load(meta).to(gl.int32)
    w_off = gl.load(meta + 1)
    s_off = gl.load(meta + 2)
    z_off = gl.load(meta + 3)
    group = gl.load(meta + 4).to(gl.int32)
    a_base = a_ptr + gl.load(meta + 5) * a_rot_off  # the Hadamard-rotated copy, for rotated experts
    # the same row and column indices in each layout that uses them
    ids_b = gl.load(sorted_ids_ptr + pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, B_OP)))
    rows = gl.where(ids_b < num_valid, ids_b // a_div, 0)
    mask_m = ids_b < num_valid
    cols = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, A_OP))
    mask_n = cols < N
    cols_o = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    mask_no = cols_o < N
    kk = gl.arange(0, BK, layout=gl.SliceLayout(0, A_OP))
    kb = gl.arange(0, BK, layout=gl.SliceLayout(1, B_OP))
    k_per = gl.cdiv(gl.cdiv(K, BK), split) * BK  # whole BK tiles: a tile keeps one quantization group
    k_lo = gl.program_id(2) * k_per
    k_hi = gl.minimum(K, k_lo + k_per)
    acc = gl.zeros([BN, BM], gl.float32, layout=MMA)
    acc2 = gl.zeros([BN, BM], gl.float32, layout=MMA)
    for k0 in range(k_lo, k_hi, BK):
        a = gl.load(a_base + rows[None, :] * stride_am + (k0 + kb)[:, None],
                    mask=mask_m[None, :] & ((k0 + kb)[:, None] < K), other=0.0)  # fmt: skip
        acc += _tile_product(code, a, wi_ptr, wb_ptr, sc_ptr, zp_ptr, w_off, s_off, z_off, group, cols, mask_n,
                             cols_o, mask_no, k0 + kk, k0, K, CODES, MMA)  # fmt: skip
        if GATE_UP:  # rows [N, 2N) of the fused weight are up: same loop, same A tile
            acc2 += _tile_product(code, a, wi_ptr, wb_ptr, sc_ptr, zp_ptr, w_off, s_off, z_off, group, cols + N,
                                  mask_n, cols_o + N, mask_no, k0 + kk, k0, K, CODES, MMA)  # fmt: skip
    ids = gl.load(sorted_ids_ptr + pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, MMA)))
    mask_mo = ids < num_valid
    mask = mask_no[:, None] & mask_mo[None, :]
    out = out_ptr + gl.program_id(2) * split_stride + ids[None, :] * stride_om + cols_o[:, None]
    if GATE_UP:
        if PARTIAL:
            gl.store(out, acc, mask=mask)
            gl.store(out + N, acc2, mask=mask)
        else:
            # gate and up rounded to bf16 first, as the Triton kernel (and an unfused GEMM) stores them
            g = acc.to(gl.bfloat16).to(gl.float32)
            u = acc2.to(gl.bfloat16).to(gl.float32)
            gl.store(out, (g / (1.0 + gl.exp(-g)) * u).to(gl.bfloat16), mask=mask)
    else:
        res = acc * gl.load(route_w_ptr + ids, mask=mask_mo, other=0.0)[None, :]
        if PARTIAL:
            gl.store(out, res, mask=mask)
        else:
            gl.store(out, res.to(gl.bfloat16), mask=mask)
