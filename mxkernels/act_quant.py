"""Per-token activation quantization before a grouped GEMM, in one launch.

Experts whose activations are quantized per token (fp8, int8 MMA) need each
row's absolute maximum, and the fp8 ones the row in float8_e4m3fn. In torch
that is five passes over the whole input (abs, amax, a copy to fp32, a divide,
the fp8 cast), which on the H200 took 508 of the 1500 us of kernels of an fp8
layer at 4096 tokens, beside 835 us of GEMMs
(benchmarks/results/profile_fp8_prefill_h200_s12.txt): the down
GEMM's input there is 32768 rows of 1408. Here a row up to 4096 wide is read
once and held in registers for both (longer ones twice, the second time from
cache). The codes are ``(a.float() * inv[:, None]).to(float8_e4m3fn)`` with
``inv`` the IEEE quotient 448 / amax.clamp(min=1e-8) of each row (torch's
``448 / t`` rounds twice: ``t.reciprocal() * 448``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mxkernels.moe_gemm import INTERPRET

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_MOST_BLOCK = 4096  # elements of a row a program holds at once; longer rows take several passes
# elements a program holds: a row of the down GEMM's input (1408 wide in Qwen1.5) is too little work for
# a program, so short rows go several to one (on the H200, a program per 1408-row, read twice, took 142 us
# for the two GEMMs of a 4096-token fp8 layer, where its bytes take about 40)
_PROGRAM_ELEMS = 8192


@triton.jit(do_not_specialize=["period", "slots", "first", "count"])
def row_quant_kernel(a_ptr, amax_ptr, a8_ptr, rows, K, stride, period, slots, first, count, FP8: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr, FP8_LIMIT: tl.constexpr,
                     ROUND: tl.constexpr, SOME: tl.constexpr):  # fmt: skip
    r32 = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mask_r = r32 < rows
    if SOME:  # some slots' rows only (row_quant's slots_of); 32-bit remainders: 64-bit ones are long loops
        slot = (r32 % period) % slots - first
        mask_r = mask_r & (slot >= 0) & (slot < count)
    r = r32.to(tl.int64)
    row = a_ptr + r[:, None] * stride
    out = a8_ptr + r[:, None] * stride
    k = tl.arange(0, BLOCK)[None, :]
    if ONE_PASS:  # the rows fit a block: read once, kept in registers for the codes
        mask = mask_r[:, None] & (k < K)
        x = tl.load(row + k, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), 1)
        tl.store(amax_ptr + r, amax, mask=mask_r)
        if FP8:
            tl.store(out + k, _fp8(x, amax, FP8_LIMIT, ROUND), mask=mask)
    else:
        m = tl.zeros([ROWS, BLOCK], tl.float32)
        for k0 in range(0, K, BLOCK):
            mask = mask_r[:, None] & (k0 + k < K)
            m = tl.maximum(m, tl.abs(tl.load(row + k0 + k, mask=mask, other=0.0).to(tl.float32)))
        amax = tl.max(m, 1)
        tl.store(amax_ptr + r, amax, mask=mask_r)
        if FP8:  # the row again, from cache
            for k0 in range(0, K, BLOCK):
                mask = mask_r[:, None] & (k0 + k < K)
                x = tl.load(row + k0 + k, mask=mask, other=0.0).to(tl.float32)
                tl.store(out + k0 + k, _fp8(x, amax, FP8_LIMIT, ROUND), mask=mask)


@triton.jit
def _fp8(x, amax, FP8_LIMIT: tl.constexpr, ROUND: tl.constexpr):
    """``x`` [ROWS, BLOCK] in float8_e4m3fn at the scale amax / FP8_LIMIT of each row: times the row's
    IEEE reciprocal of that scale (Triton's "/" on fp32 is approximate), then rounded to nearest even
    into e4m3 (|q| <= 448: nothing to saturate). A quotient per element (div.rn) took 132 us for the two
    GEMMs of a 4096-token fp8 layer on the H200: a call and a branch per element in the sm_90 SASS."""
    inv = tl.math.div_rn(tl.zeros_like(amax) + FP8_LIMIT, tl.maximum(amax, 1e-8))
    q = x * inv[:, None]
    if ROUND:  # the interpreter: rounded here; the GPU's cvt rounds the same by itself
        q = _e4m3_grid(q)
    return q.to(tl.float8e4nv)


@triton.jit
def _e4m3_grid(q):
    """``q`` rounded to the nearest float8_e4m3fn value (ties to even), still in fp32, so that the
    conversion after is exact: Triton's interpreter (CI) drops the carry when rounding into fp8
    (125.7 became 64); the GPU's cvt gives these same values (tests/test_act_quant.py on the H200)."""
    a = tl.abs(q)
    bits = a.to(tl.int32, bitcast=True)
    # normal range (from 2**-6): 3 mantissa bits kept, the 20 below rounded off
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    # subnormals are multiples of 2**-9: 2**14 + a rounds a to one in fp32's arithmetic
    sub = (a + 16384.0) - 16384.0
    return tl.where(q < 0, -1.0, 1.0) * tl.where(a < 0.015625, sub, normal)


def row_quant(a: torch.Tensor, fp8: bool, slots_of: tuple[int, int, int, int] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(amax [rows] fp32, a8) of ``a`` [rows, K] (rows of unit stride): a8 the rows in float8_e4m3fn,
    same strides as ``a``, when ``fp8``, else an empty placeholder. ``slots_of`` (period, slots, first,
    count): only the rows r whose (r % period) % slots is in first..first+count-1 (the others are left
    unwritten): a GEMM of the shared experts' launches quantizes their rows only, while the routed
    experts' launches on the other stream write the rest of the same buffer."""
    if a.stride(-1) != 1:
        raise ValueError("row_quant needs rows of unit stride")
    rows, k = a.shape
    amax = torch.empty(rows, dtype=torch.float32, device=a.device)
    a8 = (torch.empty_strided(a.shape, a.stride(), dtype=torch.float8_e4m3fn, device=a.device) if fp8
          else torch.empty(1, dtype=torch.float8_e4m3fn, device=a.device))  # fmt: skip
    if rows:
        block = min(_MOST_BLOCK, triton.next_power_of_2(k))
        per = max(1, _PROGRAM_ELEMS // block)
        period, slots, first, count = slots_of or (rows, 1, 0, 1)
        row_quant_kernel[(triton.cdiv(rows, per),)](
            a, amax, a8, rows, k, a.stride(0), period, slots, first, count, FP8=fp8, ROWS=per, BLOCK=block,
            ONE_PASS=block >= k, FP8_LIMIT=FP8_MAX, ROUND=INTERPRET, SOME=slots_of is not None,
            num_warps=8)  # fmt: skip
    return amax, a8
