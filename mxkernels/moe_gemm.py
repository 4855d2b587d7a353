"""Mixed-precision grouped GEMM for MoE layers (Triton), all experts in one launch.

One program computes a [BM, BN] tile for the BM (token, slot) rows of one
expert (rows were sorted by expert and padded to BM by :func:`align`). The
expert's kernel code (arena.py) picks the inner loop at run time:

- bf16: plain bf16 MMA;
- weight-only int (1/2/3/4/8 bits, any group): codes are unpacked from their
  bit planes and dequantized to bf16 in registers, then bf16 MMA;
- w8a8 fp8: activations arrive quantized per token to fp8 e4m3 (one pass per
  launch, moe.py) and run on fp8 MMA with the per-token and per-channel scales;
- w4a4 / w8a8 int: activations are quantized per token to symmetric integers in
  registers (row amax computed once per launch) and run on int8 MMA (Hopper has
  no int4 MMA; int4 values ride in int8).

Branches of codes absent from the layer are pruned at compile time (CODES).
With GATE_UP the program computes the gate and the up tile of the same
columns and stores SiLU(gate) * up; otherwise it scales by the routing weight.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton's CPU interpreter mis-computes bf16 tl.dot (seen with triton 3.9): under it,
# bf16 operands are upcast to fp32 for the dot. GPUs keep the bf16 MMA.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dot_bf16(a, w, F32: tl.constexpr):
    if F32:
        return tl.dot(a.to(tl.float32), w.to(tl.float32))
    return tl.dot(a, w)


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
def _plane(wi_ptr, base, cols, k0, row_words, col0, mask_n, P: tl.constexpr, BK: tl.constexpr):
    """Codes of one bit plane of width P for a [BK, BN] tile: each word loaded once, split in registers."""
    PER: tl.constexpr = 32 // P
    wk = k0 // PER + tl.arange(0, BK // PER)
    words = tl.load(
        wi_ptr + base + cols[None, :] * row_words + col0 + wk[:, None],
        mask=mask_n[None, :] & (wk[:, None] < row_words),
        other=0,
    )  # [BK/PER, BN]
    shifts = tl.arange(0, PER) * P
    q = (words[:, None, :] >> shifts[None, :, None]) & ((1 << P) - 1)  # [BK/PER, PER, BN]
    return tl.reshape(q, (BK, q.shape[2]))


@triton.jit
def _int_codes(wi_ptr, w_off, cols, k0, K, mask_n, BITS: tl.constexpr, BK: tl.constexpr):
    if BITS == 3:
        q = _plane(wi_ptr, w_off, cols, k0, K * 3 // 32, 0, mask_n, 2, BK)
        q = q | (_plane(wi_ptr, w_off + K * 2 // 32, cols, k0, K * 3 // 32, 0, mask_n, 1, BK) << 2)
    else:
        q = _plane(wi_ptr, w_off, cols, k0, K * BITS // 32, 0, mask_n, BITS, BK)
    return q


@triton.jit
def _mm_bf16(
    a_ptr,
    rows,
    mask_m,
    stride_am,
    wb_ptr,
    w_off,
    cols,
    mask_n,
    K,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    F32: tl.constexpr,
):
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    offs_k = tl.arange(0, BK)
    for k0 in range(0, K, BK):
        a = _load_a(a_ptr, rows, offs_k, k0, mask_m, stride_am, K)
        kk = k0 + offs_k
        m = (kk[:, None] < K) & mask_n[None, :]
        w = tl.load(wb_ptr + w_off + cols[None, :] * K + kk[:, None], mask=m, other=0.0)
        acc += _dot_bf16(a, w, F32)
    return acc


@triton.jit
def _mm_wonly(
    a_ptr,
    rows,
    mask_m,
    stride_am,
    wi_ptr,
    sc_ptr,
    zp_ptr,
    w_off,
    s_off,
    z_off,
    group,
    cols,
    mask_n,
    K,
    BITS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    F32: tl.constexpr,
):
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    offs_k = tl.arange(0, BK)
    ngroups = K // group
    for k0 in range(0, K, BK):
        a = _load_a(a_ptr, rows, offs_k, k0, mask_m, stride_am, K)
        q = _int_codes(wi_ptr, w_off, cols, k0, K, mask_n, BITS, BK)
        # BK never exceeds the smallest group of the layer (pick_tiles), so a tile has one group
        g = cols * ngroups + k0 // group
        s = tl.load(sc_ptr + s_off + g, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(zp_ptr + z_off + g, mask=mask_n, other=0.0).to(tl.float32)
        w = _bf16((q.to(tl.float32) - z[None, :]) * s[None, :], F32)
        acc += _dot_bf16(a, w, F32)
    return acc


@triton.jit
def _row_amax(amax_ptr, rows, mask_m):
    """Per-row |a| max, computed once per launch (moe.py): the quantization to fp8/int8 itself
    happens here in registers, but an in-program amax pass would re-read A for every N tile."""
    return tl.maximum(tl.load(amax_ptr + rows, mask=mask_m, other=1.0), 1e-8)


@triton.jit
def _mm_fp8(
    amax_ptr,
    a8_ptr,
    rows,
    mask_m,
    stride_am,
    wf_ptr,
    sc_ptr,
    w_off,
    s_off,
    cols,
    mask_n,
    K,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    a_s = tl.div_rn(_row_amax(amax_ptr, rows, mask_m), 448.0)  # exact division, as torch
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    offs_k = tl.arange(0, BK)
    for k0 in range(0, K, BK):
        # A was quantized to fp8 per token once per launch (moe.py): loaded like the weights,
        # asynchronously, instead of being converted in registers for every N tile
        aq = _load_a(a8_ptr, rows, offs_k, k0, mask_m, stride_am, K)
        kk = k0 + offs_k
        m = (kk[:, None] < K) & mask_n[None, :]
        w = tl.load(wf_ptr + w_off + cols[None, :] * K + kk[:, None], mask=m, other=0.0)
        acc += tl.dot(aq, w)
    ws = tl.load(sc_ptr + s_off + cols, mask=mask_n, other=0.0).to(tl.float32)
    return acc * a_s[:, None] * ws[None, :]


@triton.jit
def _round_half_even(v):
    """torch.round's rule (ties to even), so int activations match the reference exactly."""
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where((r - v == 0.5) & odd, r - 1.0, r)


@triton.jit
def _mm_wa_int(
    amax_ptr,
    a_ptr,
    rows,
    mask_m,
    stride_am,
    wi_ptr,
    sc_ptr,
    w_off,
    s_off,
    cols,
    mask_n,
    K,
    BITS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    QPOS: tl.constexpr = (1 << (BITS - 1)) - 1
    a_s = tl.div_rn(_row_amax(amax_ptr, rows, mask_m), QPOS * 1.0)  # no inexact reciprocal
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    offs_k = tl.arange(0, BK)
    for k0 in range(0, K, BK):
        a = _load_a(a_ptr, rows, offs_k, k0, mask_m, stride_am, K).to(tl.float32)
        aq = tl.minimum(tl.maximum(_round_half_even(tl.div_rn(a, a_s[:, None])), -QPOS - 1.0), QPOS * 1.0).to(tl.int8)
        q = _int_codes(wi_ptr, w_off, cols, k0, K, mask_n, BITS, BK)
        kk = k0 + offs_k
        w = tl.where((kk[:, None] < K) & mask_n[None, :], q - (QPOS + 1), 0).to(tl.int8)
        acc += tl.dot(aq, w)
    ws = tl.load(sc_ptr + s_off + cols, mask=mask_n, other=0.0).to(tl.float32)
    return acc.to(tl.float32) * a_s[:, None] * ws[None, :]


@triton.jit
def _expert_tile(
    code,
    a_ptr,
    rows,
    mask_m,
    stride_am,
    wi_ptr,
    wb_ptr,
    wf_ptr,
    sc_ptr,
    zp_ptr,
    amax_ptr,
    a8_ptr,
    w_off,
    s_off,
    z_off,
    group,
    cols,
    mask_n,
    K,
    CODES: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    F32: tl.constexpr,
):
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if CODES & 1:
        if code == 0:
            acc = _mm_bf16(a_ptr, rows, mask_m, stride_am, wb_ptr, w_off, cols, mask_n, K, BM, BN, BK, F32)
    # weight-only integer codes 1..5 are 1, 2, 3, 4 and 8 bits (arena.CODE_WONLY)
    for c in tl.static_range(1, 6):
        if CODES & (1 << c):
            if code == c:
                acc = _mm_wonly(a_ptr, rows, mask_m, stride_am, wi_ptr, sc_ptr, zp_ptr, w_off, s_off, z_off,
                                group, cols, mask_n, K, c + 3 * (c == 5), BM, BN, BK, F32)  # fmt: skip
    if CODES & 64:
        if code == 6:
            acc = _mm_fp8(
                amax_ptr, a8_ptr, rows, mask_m, stride_am, wf_ptr, sc_ptr, w_off, s_off, cols, mask_n, K, BM, BN, BK
            )
    if CODES & 128:
        if code == 7:
            acc = _mm_wa_int(
                amax_ptr, a_ptr, rows, mask_m, stride_am, wi_ptr, sc_ptr, w_off, s_off, cols, mask_n, K, 4, BM, BN, BK
            )
    if CODES & 256:
        if code == 8:
            acc = _mm_wa_int(
                amax_ptr, a_ptr, rows, mask_m, stride_am, wi_ptr, sc_ptr, w_off, s_off, cols, mask_n, K, 8, BM, BN, BK
            )
    return acc


@triton.jit
def mx_moe_gemm_kernel(
    a_ptr,
    a_rot_off,
    amax_ptr,
    amax_rot_rows,
    a8_ptr,
    stride_am,
    out_ptr,
    stride_om,
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
    GATE_UP: tl.constexpr,
    CODES: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    F32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BM >= tl.load(num_post_pad_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m)
    ids = tl.load(sorted_ids_ptr + pid_m * BM + tl.arange(0, BM))
    mask_m = ids < num_valid
    rows = tl.where(mask_m, ids // a_div, 0)
    cols = pid_n * BN + tl.arange(0, BN)
    mask_n = cols < N
    meta = meta_ptr + expert * 6
    code = tl.load(meta).to(tl.int32)
    # arena offsets are multiples of 16 elements (build_arena pads): say so, or loads stay scalar
    w_off = tl.multiple_of(tl.load(meta + 1), 16)
    s_off = tl.multiple_of(tl.load(meta + 2), 16)
    z_off = tl.multiple_of(tl.load(meta + 3), 16)
    group = tl.load(meta + 4).to(tl.int32)
    rot = tl.load(meta + 5)  # 1: the expert reads the Hadamard-rotated copy of its input
    a_base = a_ptr + tl.multiple_of(rot * a_rot_off, 16)
    amax_base = amax_ptr + rot * amax_rot_rows
    a8_base = a8_ptr + tl.multiple_of(rot * a_rot_off, 16)
    # GATE_UP: rows [0, N) of the expert's fused weight are gate, [N, 2N) up
    res = _expert_tile(code, a_base, rows, mask_m, stride_am, wi_ptr, wb_ptr, wf_ptr, sc_ptr, zp_ptr,
                       amax_base, a8_base, w_off, s_off, z_off, group, cols, mask_n, K,
                       CODES, BM, BN, BK, F32)  # fmt: skip
    if GATE_UP:
        up = _expert_tile(code, a_base, rows, mask_m, stride_am, wi_ptr, wb_ptr, wf_ptr, sc_ptr, zp_ptr,
                          amax_base, a8_base, w_off, s_off, z_off, group, cols + N, mask_n, K,
                          CODES, BM, BN, BK, F32)  # fmt: skip
        # gate and up are rounded to bf16 first, as an unfused gate_up GEMM stores them (moe.py)
        res = _bf16(res, F32).to(tl.float32)
        up = _bf16(up, F32).to(tl.float32)
        res = res / (1.0 + tl.exp(-res)) * up  # SiLU(gate) * up
    else:
        res = res * tl.load(route_w_ptr + ids, mask=mask_m, other=0.0)[:, None]
    out = out_ptr + ids[:, None] * stride_om + cols[None, :]
    tl.store(out, _bf16(res, F32), mask=mask_m[:, None] & mask_n[None, :])  # both outputs are bf16
