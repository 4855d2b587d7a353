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

from mxkernels.align import Alignment, align_in_one_program
from mxkernels.count import count_consts, count_in_one_program
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
def _zero_share(zero_ptr, n_zero, ZERO: tl.constexpr):
    """This program's equal share of ``n_zero`` fp32 zeros (stream-K's sums, in place of a fill launch)."""
    progs = tl.num_programs(0) * tl.num_programs(1)
    me = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    share = tl.cdiv(tl.cdiv(n_zero, progs), ZERO) * ZERO
    for z0 in range(me * share, (me + 1) * share, ZERO):
        z = tl.multiple_of(z0, ZERO) + tl.arange(0, ZERO)  # 16-byte stores (n_zero: a multiple of 16, specialized)
        tl.store(zero_ptr + z, tl.zeros([ZERO], dtype=tl.float32), mask=z < n_zero)


@triton.jit
def _shared_gate(x_ptr, g_ptr, scale_ptr, K, BK: tl.constexpr, PDL: tl.constexpr):
    """Qwen2-MoE's shared-expert scale of one token, sigmoid(x . g) in fp32 (as SGLang's fused_gate_sigmoid_mul_add and
    combine's GATE compute it, not rounded to bf16 as the logits are), for the top-k sum to read."""
    acc = tl.zeros([BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        g = tl.load(g_ptr + ks, mask=ks < K, other=0.0)
        if PDL:  # as the experts' programs: the weights before the wait, the token after it
            wait_then_release()
        acc += g.to(tl.float32) * tl.load(x_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
    tl.store(scale_ptr, tl.sigmoid(tl.sum(acc, axis=0)))


@triton.jit
def fused_router_kernel(x_ptr, stride_x, w_ptr, logits_ptr, count_ptr, topk_w_ptr, topk_ids_ptr, valid_ptr,
                        sorted_ptr, block_expert_ptr, npp_ptr, w_out_ptr, cursor_ptr, n_rows, n_routed, cap,
                        zero_ptr, n_zero, cbuf_ptr, cbounds_ptr, chost_ptr, N, K, TOPK: tl.constexpr,
                        KP: tl.constexpr, NP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        RENORMALIZE: tl.constexpr, HAS_VALID: tl.constexpr,
                        ALONE: tl.constexpr, PDL: tl.constexpr = False, ALIGN: tl.constexpr = False,
                        SLOTS: tl.constexpr = 1, E: tl.constexpr = 1, EP: tl.constexpr = 2, BM: tl.constexpr = 1,
                        CHUNK: tl.constexpr = 256, BCHUNK: tl.constexpr = 64, SHARED: tl.constexpr = True,
                        ZERO: tl.constexpr = 0, COUNT: tl.constexpr = False, NB: tl.constexpr = 1,
                        NBP: tl.constexpr = 1, BT: tl.constexpr = 128, MIRROR: tl.constexpr = False,
                        SIZE: tl.constexpr = 1, sgate_ptr=None, scale_ptr=None,
                        SHARED_GATE: tl.constexpr = False):  # fmt: skip
    tok = tl.program_id(0)
    chunk = tl.program_id(1)
    if SHARED_GATE:  # a program more per token: the shared experts' gate, no logit and no part in the top-k
        if chunk == tl.num_programs(1) - 1:
            _shared_gate(x_ptr + tok * stride_x, sgate_ptr, scale_ptr + tok, K, BK, PDL)
            if ZERO:
                _zero_share(zero_ptr, n_zero, ZERO)
            return
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
    if ZERO:  # after the wait: the buffer may be one the launches before still read
        _zero_share(zero_ptr, n_zero, ZERO)
    logit = tl.sum(acc, axis=1).to(tl.bfloat16).to(tl.float32)
    tl.store(logits_ptr + tok * N + rows, logit, mask=rows < N)
    if ALONE:  # every expert's logit is this program's (BN >= NP): the top-k from registers
        _top_k(tl.where(rows < N, logit, float("-inf")), rows, tok, topk_w_ptr, topk_ids_ptr, valid_ptr, TOPK, KP,
               RENORMALIZE, HAS_VALID)  # fmt: skip
        ranked = tok >= 0  # this program ranked its token
    else:
        # release: this program's logits before its count; acquire: the last one then reads every program's
        ranked = tl.atomic_add(count_ptr + tok, 1, sem="acq_rel") == tl.num_programs(1) - 1 - SHARED_GATE
        if ranked:
            tl.store(count_ptr + tok, 0)  # zero again for the next launch (CUDA-graph replays too)
            j = tl.arange(0, NP)
            v = tl.load(logits_ptr + tok * N + j, mask=j < N, other=float("-inf"), volatile=True)
            _top_k(v, j, tok, topk_w_ptr, topk_ids_ptr, valid_ptr, TOPK, KP, RENORMALIZE, HAS_VALID)
    if ALIGN:  # the last token ranked lays out every token's rows for the GEMMs (align.py), in place of its launch
        if ranked:
            t = tl.num_programs(0)
            last = t == 1
            # the top-k's stores, from several lanes (and warps), before other lanes read them back, and before the
            # one lane's release of the second counter
            tl.debug_barrier()
            if t > 1:  # a second counter, past the tokens' (release: this token's top-k; acquire: all of them)
                last = tl.atomic_add(count_ptr + t, 1, sem="acq_rel") == t - 1
            if last:
                if t > 1:
                    tl.store(count_ptr + t, 0)
                align_in_one_program(topk_ids_ptr, topk_w_ptr, sorted_ptr, block_expert_ptr, npp_ptr, w_out_ptr,
                                     cursor_ptr, n_rows, n_routed, cap, TOPK, SLOTS, E, EP, BM, CHUNK, BCHUNK,
                                     SHARED)  # fmt: skip
                if COUNT:  # and counts the routing (router_stats), in place of the counting launch
                    count_in_one_program(topk_ids_ptr, cbuf_ptr, cbounds_ptr, chost_ptr, t, N, TOPK, KP, NB, NBP, BT,
                                         MIRROR, SIZE)  # fmt: skip


def enabled() -> bool:
    """Whether SGLang's engine fuses its MoE blocks' decode routing (engines/sglang_router.py): by default;
    ``MXSERVE_FUSED_ROUTER=0`` keeps SGLang's router. One place, for the plugin and for precompiling."""
    return os.environ.get("MXSERVE_FUSED_ROUTER", "1") != "0"


def aligns() -> bool:
    """Whether SGLang's engine has the fused router's launch also lay out the rows for the grouped GEMMs
    (moe.route_and_lay_out), in place of the alignment's launch: ``MXSERVE_ROUTER_ALIGN=1``, opt-in until timed."""
    return enabled() and os.environ.get("MXSERVE_ROUTER_ALIGN", "0") == "1"


def counters(device: torch.device, tokens: int) -> torch.Tensor:
    """A zeroed int32 counter per token and one more (the alignment's), kept per device: every launch leaves
    them zeroed, so no fill runs before one (made outside CUDA-graph capture by the first, larger eager forward)."""
    counts = _COUNTS.get(device)
    if counts is None or counts.numel() <= tokens:
        counts = _COUNTS[device] = torch.zeros(max(tokens + 1, 4096), dtype=torch.int32, device=device)
    return counts


# fp32 zeros a program writes at most in place of a fill launch (fused_router's ``zero``): with one program a token,
# a program's share of Qwen1.5's stream-K sums (8 slots) would be 156 KB, which one SM stores no faster than a fill
ZERO_MOST = 4096


def zeroes_in_launch(t: int, e: int, experts_per_program: int, n_zero: int) -> bool:
    """Whether the router's launch for ``t`` tokens takes a fill of ``n_zero`` fp32 (fused_router's ``zero``)."""
    programs = t * (1 if experts_per_program >= e else triton.cdiv(e, experts_per_program))
    return triton.cdiv(n_zero, programs) <= ZERO_MOST


def fused_router(
    x: torch.Tensor,
    weight: torch.Tensor,
    top_k: int,
    renormalize: bool,
    num_token_non_padded: torch.Tensor | None = None,
    experts_per_program: int = CHUNK,
    align: Alignment | None = None,
    zero: torch.Tensor | None = None,
    count: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    shared: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax top-k routing of ``x`` [T, H] by the gate ``weight`` [E, H]: (weights [T, k] fp32, ids [T, k]
    int32, logits [T, E] fp32 rounded to bf16), the weights renormalized to sum 1 if ``renormalize``; ids -1
    for tokens from ``num_token_non_padded`` (a one-element tensor) on. ``experts_per_program`` (a power of
    two) splits each token's experts over programs; at E or more one program per token takes them all.
    ``align`` (align.alignment for these T tokens and k): the same launch lays out the rows for the grouped
    GEMMs into its buffers, as align.route would from the returned top-k; ``zero``: an fp32 buffer it fills with
    zeros (stream-K's sums; where :func:`zeroes_in_launch`); ``count`` (with ``align``): router_stats' counter buffer,
    its bucket bounds and its host mirror (None: not written), into which the program that lays out the rows also
    adds the routing, as count.count_routing of the returned ids would (router_stats.ExpertCounter.kernel_args).
    ``shared`` (Qwen2-MoE's shared-expert gate [H], an fp32 [T] out): a program more per token stores
    sigmoid(x . gate) there, the scale the top-k sum then reads in place of computing it."""
    t, h = x.shape
    e = weight.shape[0]
    if weight.shape[1] != h or not 0 < top_k <= e:
        raise ValueError(f"router: gate {tuple(weight.shape)} for tokens of {h} and top-{top_k}")
    bn = experts_per_program
    if bn < 1 or bn & (bn - 1):
        raise ValueError(f"router: {bn} experts a program, not a power of two")
    if count is not None and align is None:
        raise ValueError("router: the routing is counted by the program that lays out the rows (align=)")
    if count is not None and count[0].numel() != e + 3 + count[1].numel():
        raise ValueError(f"router: a counter of {count[0].numel()} for {e} experts and {count[1].numel()} bounds")
    if align is not None and align.rows != t * align.consts["SLOTS"]:
        raise ValueError(f"router: an alignment of {align.rows} rows for {t} tokens of {align.consts['SLOTS']} slots")
    if shared is not None and (shared[0].numel() != h or shared[1].shape != (t,) or shared[1].dtype != torch.float32):
        raise ValueError(f"router: a shared gate of {shared[0].numel()} for tokens of {h}, its scale {shared[1].shape} "
                         f"{shared[1].dtype} for {t} tokens (fp32)")
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
    # the alignment's buffers and constants, or stand-ins its variant never reads
    al_args = align.args() if align is not None else (logits,) * 5 + (0, 0, 0)
    al_consts = {}
    if align is not None:  # its chunk of rows a lane each, at least: one or a few warps here, where route() has 8
        al_consts = {**align.consts, "ALIGN": True,
                     "CHUNK": min(1024, triton.next_power_of_2(max(align.rows, 32 * warps)))}  # fmt: skip
    if zero is not None:
        if not zeroes_in_launch(t, e, experts_per_program, zero.numel()):
            raise ValueError(f"router: {zero.numel()} zeros over too few programs (zeroes_in_launch)")
        al_consts["ZERO"] = 32 * 4 * warps  # one 16-byte store a thread per step
    if count is not None:  # the counting kernel's constants; its tile of ids: a program's lanes, as the alignment's
        consts = count_consts(count[0], count[1], top_k, count[2] is not None)
        al_consts |= {"COUNT": True, **{c: consts[c] for c in ("NB", "NBP", "MIRROR", "SIZE")},
                      "BT": min(128, max(1, 32 * warps // consts["KP"]))}  # fmt: skip
    cargs = (count[0], count[1], count[2] if count[2] is not None else count[0]) if count is not None else (logits,) * 3
    if shared is not None:
        al_consts |= {"SHARED_GATE": True, "sgate_ptr": shared[0].reshape(h).contiguous(), "scale_ptr": shared[1]}
    fused_router_kernel[(t, triton.cdiv(e, bn) + (shared is not None))](
        x, x.stride(0), weight, logits, counters(x.device, t), topk_w, topk_ids, valid if valid is not None else logits,
        *al_args, zero if zero is not None else logits, zero.numel() if zero is not None else 0, *cargs,
        e, h, TOPK=top_k, KP=triton.next_power_of_2(top_k), NP=np_, BN=bn, BK=bk, RENORMALIZE=renormalize,
        HAS_VALID=valid is not None, ALONE=alone, PDL=pdl(x.device), num_warps=warps, **al_consts,
        **launch(x.device),
    )  # fmt: skip
    return topk_w, topk_ids, logits
