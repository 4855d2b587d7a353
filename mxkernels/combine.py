"""The top-k sum after the down GEMM, in one launch: each token's slot outputs into its row.

It rounds as SGLang's unquantized MoE does (moe.py): the routed slots are summed in
fp32 and stored as bf16; with shared experts that bf16 sum then gets
``scale * shared`` added in fp32 and is rounded once more. One pass over the slot
outputs (bf16, or the fp32 partial sums of a split-K down GEMM, added here too),
instead of torch ops that each read or write the [T, slots, H] tensor. The shared
experts' gate (Qwen2-MoE's sigmoid of a dot with the token) can be computed here too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mxkernels.moe_gemm import INTERPRET, _bf16
from mxkernels.pdl import launch, pdl, wait_then_release


@triton.jit
def moe_combine_kernel(
    out_ptr,
    y_ptr,
    scale_ptr,
    x_ptr,
    gate_ptr,
    H,
    split_stride,
    SPLIT: tl.constexpr,
    K: tl.constexpr,
    SLOTS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    GATE: tl.constexpr,
    BH: tl.constexpr,
    F32: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:  # the expert outputs are the launch before's (pdl.py)
        wait_then_release()
    t = tl.program_id(0)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    mask = cols < H
    row = out_ptr + t * SLOTS * H + cols
    acc = tl.zeros((BH,), dtype=tl.float32)
    for p in tl.static_range(SPLIT):
        for s in tl.static_range(K):
            acc += tl.load(row + p * split_stride + s * H, mask=mask, other=0.0).to(tl.float32)
    if SLOTS > K:
        shared = tl.zeros((BH,), dtype=tl.float32)
        for p in tl.static_range(SPLIT):
            for s in tl.static_range(K, SLOTS):
                shared += tl.load(row + p * split_stride + s * H, mask=mask, other=0.0).to(tl.float32)
        if GATE:  # sigmoid(x . gate) in fp32, as SGLang's fused_gate_sigmoid_mul_add computes the scale
            dot = tl.zeros((BH,), dtype=tl.float32)
            for h0 in range(0, H, BH):
                hh = h0 + tl.arange(0, BH)
                xv = tl.load(x_ptr + t * H + hh, mask=hh < H, other=0.0).to(tl.float32)
                dot += xv * tl.load(gate_ptr + hh, mask=hh < H, other=0.0).to(tl.float32)
            shared = shared * tl.sigmoid(tl.sum(dot, axis=0))
        elif HAS_SCALE:
            shared = shared * tl.load(scale_ptr + t)
        acc = _bf16(acc, F32).to(tl.float32) + shared  # the routed sum is bf16 before the shared add
    tl.store(y_ptr + t * H + cols, _bf16(acc, F32), mask=mask)


def combine(out: torch.Tensor, k: int, scale: torch.Tensor | None,
            gate: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """y [T, H] bf16 from slot outputs ``out`` [S, T, slots, H] (S partial sums over K; bf16 or
    fp32; the first ``k`` slots routed, the rest shared, scaled by ``scale`` [T] fp32 when given,
    or by sigmoid(x . g) for ``gate`` = (x [T, H] contiguous, g [H]): the shared-expert gate in
    this launch, not in four small ops before it)."""
    split, t, slots, h = out.shape
    y = torch.empty(t, h, dtype=torch.bfloat16, device=out.device)
    if t == 0:
        return y
    bh = min(1024, triton.next_power_of_2(h))
    s = scale if scale is not None else y  # unread placeholder pointers
    x, g = gate if gate is not None else (y, y)
    moe_combine_kernel[(t, triton.cdiv(h, bh))](
        out, y, s, x, g, h, out.stride(0), SPLIT=split, K=k, SLOTS=slots, HAS_SCALE=scale is not None,
        GATE=gate is not None, BH=bh, F32=INTERPRET, PDL=pdl(y.device), **launch(y.device),
    )  # fmt: skip
    return y
