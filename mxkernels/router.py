"""A decode forward's router in one launch: the gate's logits, softmax, top-k and renormalization.

SGLang's Qwen2-MoE block routes with a bf16 GEMV (on the H200 cuBLAS makes it two kernels, and the top-k
a zero fill for its bias) and then a Triton top-k: four launches, 9.6 us from the post-attention norm to
the top-k at 1 request and 11.7 us at 8, where the MoE GEMMs take 23 and 51 (benchmarks/README.md,
twenty-first session). Here each program computes the logits of one token for a chunk of experts; the
last of a token's programs to finish (a counter per token, which it puts back to zero) takes the
softmax and the top-k. It rounds the logits to bf16 first, as SGLang's gate stores them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mxkernels.pdl import launch, pdl, wait_then_release

# tokens per forward up to which the fused router runs: every program reads its chunk of the gate's weights,
# so its reads grow with the tokens, where one GEMM's do not (prefill keeps the engine's router)
FUSED_ROUTER_TOKENS = 64
# experts per program, one warp per expert up to MAX_WARPS: with one, a program's reductions (the logits, then the
# softmax and top-k of the last program) are a warp's shuffles; the sm_90 code has one barrier, at the counter (with 8
# warps: 30). A program that holds every expert needs no counter. On the H200 (Qwen1.5's gate, 60 x 2048, top-4; 24
# launches back to back in a CUDA graph) 4 a program took 3.97 / 4.09 / 5.0 / 7.09 us at 1 / 8 / 32 / 64 tokens
# against 4.27 / 4.76 / 6.0 / 8.91 with one expert a program and 8.48 / 8.6 / 8.73 / 8.86 with one program a token,
# routing every token alike (results/router_h200_s25.md)
CHUNK = 4
MAX_WARPS = 16
# fp32 products a thread holds per pass over K: the K tile shrinks as a program's experts grow
ACC_PER_THREAD = 64
_COUNTS: dict[torch.device, torch.Tensor] = {}


@triton.jit
def _top_k(v, j, tok, topk_w_ptr, topk_ids_ptr, valid_ptr, TOPK: tl.constexpr, KP: tl.constexpr,
           RENORMALIZE: tl.constexpr, HAS_VALID: tl.constexpr):  # fmt: skip
    """Softmax over one token's logits ``v`` (-inf past the experts; ``j`` their indices), its top-k, stored."""
    e = tl.exp(v - tl.max(v, axis=0))
    p = e / tl.sum(e, axis=0)
    slot = tl.arange(0, KP)
    weights = tl.zeros([KP], dtype=tl.float32)
    ids = tl.zeros([KP], dtype=tl.int32)
    for i in tl.static_range(TOPK):  # the largest first; the lowest index among equals, as tl.argmax
        best = tl.argmax(p, axis=0)
        weights = tl.where(slot == i, tl.max(p, axis=0), weights)
        ids = tl.where(slot == i, best.to(tl.int32), ids)
        p = tl.where(j == best, -1.0, p)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, axis=0)
    if HAS_VALID:  # CUDA-graph padding past the real tokens: no expert (SGLang's -1)
        ids = tl.where(tok < tl.load(valid_ptr).to(tl.int32), ids, -1)
    tl.store(topk_w_ptr + tok * TOPK + slot, weights, mask=slot < TOPK)
    tl.store(topk_ids_ptr + tok * TOPK + slot, ids, mask=slot < TOPK)


@triton.jit
def fused_router_kernel(x_ptr, stride_x, w_ptr, logits_ptr, count_ptr, topk_w_ptr, topk_ids_ptr, valid_ptr, N, K,
                        TOPK: tl.constexpr, KP: tl.constexpr, NP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        RENORMALIZE: tl.constexpr, HAS_VALID: tl.constexpr, ALONE: tl.constexpr,
                        PDL: tl.constexpr = False):  # fmt: skip
    tok = tl.program_id(0)
    chunk = tl.program_id(1)
    rows = chunk * BN + tl.arange(0, BN)
    # BK is the whole of K up to 2048 for one expert a program: every load of a program in flight at once (a loop
    # of loads waits on each), and one reduction across the threads at the end
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        w = tl.load(w_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < N) & (ks[None, :] < K), other=0.0)
        if PDL:  # the gate's weights load while the launch before (the norm) ends; its output only after (pdl.py)
            wait_then_release()
        a = tl.load(x_ptr + tok * stride_x + ks, mask=ks < K, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * a[None, :]
    logit = tl.sum(acc, axis=1).to(tl.bfloat16).to(tl.float32)
    tl.store(logits_ptr + tok * N + rows, logit, mask=rows < N)
    if ALONE:  # every expert's logit is this program's (BN >= NP): the top-k from registers
        _top_k(tl.where(rows < N, logit, float("-inf")), rows, tok, topk_w_ptr, topk_ids_ptr, valid_ptr, TOPK, KP,
               RENORMALIZE, HAS_VALID)  # fmt: skip
    else:
        # release: this program's logits before its count; acquire: the last one then reads every program's
        if tl.atomic_add(count_ptr + tok, 1, sem="acq_rel") == tl.num_programs(1) - 1:
            tl.store(count_ptr + tok, 0)  # zero again for the next launch (CUDA-graph replays too)
            j = tl.arange(0, NP)
            v = tl.load(logits_ptr + tok * N + j, mask=j < N, other=float("-inf"), volatile=True)
            _top_k(v, j, tok, topk_w_ptr, topk_ids_ptr, valid_ptr, TOPK, KP, RENORMALIZE, HAS_VALID)


def enabled() -> bool:
    """Whether SGLang's engine fuses its MoE blocks' decode routing (engines/sglang_router.py): by default;
    ``MXSERVE_FUSED_ROUTER=0`` keeps SGLang's router. One place, for the plugin and for precompiling."""
    return os.environ.get("MXSERVE_FUSED_ROUTER", "1") != "0"


def counters(device: torch.device, tokens: int) -> torch.Tensor:
    """A zeroed int32 counter per token, kept per device: every launch leaves
    them zeroed, so no fill runs before one (made outside CUDA-graph capture by the first, larger eager forward)."""
    counts = _COUNTS.get(device)
    if counts is None or counts.numel() <= tokens:
        counts = _COUNTS[device] = torch.zeros(max(tokens + 1, 4096), dtype=torch.int32, device=device)
    return counts


def fused_router(
    x: torch.Tensor,
    weight: torch.Tensor,
    top_k: int,
    renormalize: bool,
    num_token_non_padded: torch.Tensor | None = None,
    experts_per_program: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax top-k routing of ``x`` [T, H] by the gate ``weight`` [E, H]: (weights [T, k] fp32, ids [T, k]
    int32, logits [T, E] fp32 rounded to bf16), the weights renormalized to sum 1 if ``renormalize``; ids -1
    for tokens from ``num_token_non_padded`` (a one-element tensor) on. ``experts_per_program`` (a power of
    two) splits each token's experts over programs; at E or more one program per token takes them all."""
    t, h = x.shape
    e = weight.shape[0]
    if weight.shape[1] != h or not 0 < top_k <= e:
        raise ValueError(f"router: gate {tuple(weight.shape)} for tokens of {h} and top-{top_k}")
    bn = experts_per_program
    if bn < 1 or bn & (bn - 1):
        raise ValueError(f"router: {bn} experts a program, not a power of two")
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight.contiguous()
    logits = torch.empty(t, e, dtype=torch.float32, device=x.device)
    topk_w = torch.empty(t, top_k, dtype=torch.float32, device=x.device)
    topk_ids = torch.empty(t, top_k, dtype=torch.int32, device=x.device)
    if t == 0:
        return topk_w, topk_ids, logits
    valid = num_token_non_padded
    np_ = triton.next_power_of_2(e)
    alone = bn >= e
    bn = np_ if alone else bn
    warps = min(bn, MAX_WARPS)
    bk = max(16, min(triton.next_power_of_2(h), ACC_PER_THREAD * 32 * warps // bn))
    fused_router_kernel[(t, triton.cdiv(e, bn))](
        x, x.stride(0), weight, logits, counters(x.device, t), topk_w, topk_ids, valid if valid is not None else logits,
        e, h, TOPK=top_k, KP=triton.next_power_of_2(top_k), NP=np_, BN=bn, BK=bk, RENORMALIZE=renormalize,
        HAS_VALID=valid is not None, ALONE=alone, PDL=pdl(x.device), num_warps=warps, **launch(x.device),
    )  # fmt: skip
    return topk_w, topk_ids, logits
