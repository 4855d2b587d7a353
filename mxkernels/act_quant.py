"""Per-token activation quantization before a grouped GEMM, in one launch.

Experts whose activations are quantized per token (fp8, int8 MMA) need each
row's absolute maximum, and the fp8 ones the row in float8_e4m3fn. In torch
that is five passes over the whole input (abs, amax, a copy to fp32, a divide,
the fp8 cast), which on the H200 took 508 of the 1500 us of kernels of an fp8
layer at 4096 tokens, beside 835 us of GEMMs
(benchmarks/results/profile_fp8_prefill_h200_s12.txt): the down
GEMM's input there is 32768 rows of 1408. Here each row is read once for its
maximum and once more from cache for the codes; the result is the same as
``(a.float() / (amax.clamp(min=1e-8) / 448)).to(float8_e4m3fn)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_MOST_BLOCK = 4096  # elements a program holds at once; longer rows take several passes


@triton.jit
def row_quant_kernel(a_ptr, amax_ptr, a8_ptr, K, stride, FP8: tl.constexpr, BLOCK: tl.constexpr,
                     FP8_LIMIT: tl.constexpr):  # fmt: skip
    r = tl.program_id(0).to(tl.int64)
    row = a_ptr + r * stride
    m = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        m = tl.maximum(m, tl.abs(tl.load(row + k, mask=k < K, other=0.0).to(tl.float32)))
    amax = tl.max(m, 0)
    tl.store(amax_ptr + r, amax)
    if FP8:
        # the torch ops' rounding: an IEEE quotient (Triton's "/" on fp32 is approximate), then
        # round-to-nearest-even into e4m3 (|q| <= 448: nothing to saturate)
        s = tl.math.div_rn(tl.maximum(amax, 1e-8), FP8_LIMIT)
        for k0 in range(0, K, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            x = tl.load(row + k, mask=k < K, other=0.0).to(tl.float32)
            q = _e4m3_grid(tl.math.div_rn(x, tl.zeros_like(x) + s))
            tl.store(a8_ptr + r * stride + k, q.to(tl.float8e4nv), mask=k < K)


@triton.jit
def _e4m3_grid(q):
    """``q`` rounded to the nearest float8_e4m3fn value (ties to even), still in fp32, so that the
    conversion after is exact: Triton's interpreter (CI) drops the carry when rounding into fp8
    (125.7 became 64), and the GPU's cvt gives these same values."""
    a = tl.abs(q)
    bits = a.to(tl.int32, bitcast=True)
    # normal range (from 2**-6): 3 mantissa bits kept, the 20 below rounded off
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    # subnormals are multiples of 2**-9: 2**14 + a rounds a to one in fp32's arithmetic
    sub = (a + 16384.0) - 16384.0
    return tl.where(q < 0, -1.0, 1.0) * tl.where(a < 0.015625, sub, normal)


def row_quant(a: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax [rows] fp32, a8) of ``a`` [rows, K] (rows of unit stride): a8 the rows in float8_e4m3fn,
    same strides as ``a``, when ``fp8``, else an empty placeholder."""
    if a.stride(-1) != 1:
        raise ValueError("row_quant needs rows of unit stride")
    rows, k = a.shape
    amax = torch.empty(rows, dtype=torch.float32, device=a.device)
    a8 = (torch.empty_strided(a.shape, a.stride(), dtype=torch.float8_e4m3fn, device=a.device) if fp8
          else torch.empty(1, dtype=torch.float8_e4m3fn, device=a.device))  # fmt: skip
    if rows:
        block = min(_MOST_BLOCK, triton.next_power_of_2(k))
        row_quant_kernel[(rows,)](a, amax, a8, k, a.stride(0), FP8=fp8, BLOCK=block, FP8_LIMIT=FP8_MAX,
                                  num_warps=4 if block <= 2048 else 8)  # fmt: skip
    return amax, a8
