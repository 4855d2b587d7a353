"""Launching the mixed-precision MoE layer: routing alignment, two grouped GEMMs, the top-k sum.

Shared experts are experts that receive every token: they are appended to each
token's top-k as extra slots (ids n_routed.., weight 1), so one launch per GEMM
covers routed and shared experts alike; the shared gate scales their sum after.

Rounding follows the unfused bf16 pipeline SGLang runs for an unquantized MoE
(fused_moe: gate/up to bf16, SiLU(gate) * up to bf16, each slot's weighted down
output to bf16, routed slots summed once; shared MLP to bf16, then one fp32
``routed + sigmoid(gate) * shared``), so an all-bf16 plan reproduces SGLang's
numbers up to the order of fp32 sums inside the GEMMs.
"""

from __future__ import annotations

import torch

from mxkernels.arena import CODE_FP8, Arena
from mxkernels.combine import combine
from mxkernels.moe_gemm import INTERPRET, mx_moe_gemm_kernel

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def align(flat_ids: torch.Tensor, n_experts: int, bm: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort (token, slot) rows by expert, each expert padded to a multiple of ``bm``; no host sync.

    Returns sorted_ids [cap] (row index, or len(flat_ids) for padding), block_expert
    [cap / bm] and num_post_pad [1], with cap = n + E * (bm - 1) rounded up to bm.
    """
    n = flat_ids.numel()
    dev = flat_ids.device
    # index_add_, not bincount: bincount syncs with the host on CUDA, which breaks graph capture
    counts = torch.zeros(n_experts, dtype=torch.int64, device=dev).index_add_(0, flat_ids, torch.ones_like(flat_ids))
    padded = (counts + bm - 1) // bm * bm
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.argsort(flat_ids, stable=True)
    e_sorted = flat_ids[order]
    first = torch.cumsum(counts, 0) - counts
    pos = starts[e_sorted] + torch.arange(n, device=dev) - first[e_sorted]
    cap = (n + n_experts * (bm - 1) + bm - 1) // bm * bm
    sorted_ids = torch.full((cap,), n, dtype=torch.int64, device=dev)
    sorted_ids[pos] = order
    block_starts = torch.arange(0, cap, bm, device=dev)
    block_expert = torch.searchsorted(ends, block_starts, right=True).clamp(max=n_experts - 1)
    return sorted_ids, block_expert, ends[-1:].clone()


def pick_tiles(rows: int, n_experts: int = 1, min_group: int = 128) -> tuple[int, int, int, int]:
    """(BM, BN, BK, num_warps) by the mean rows per expert; BK never exceeds the smallest group
    of the layer, so one K tile of a grouped scheme has one scale and zero per column."""
    per_expert = rows / max(n_experts, 1)
    if per_expert <= 16:
        bm, bn, bk, warps = 16, 64, 128, 4
    elif per_expert <= 128:
        bm, bn, bk, warps = 32, 64, 128, 4
    elif per_expert <= 512:
        bm, bn, bk, warps = 64, 128, 64, 4
    else:
        bm, bn, bk, warps = 128, 128, 64, 8
    return bm, bn, max(32, min(bk, min_group)), warps


def _rotated_input(a: torch.Tensor, arena: Arena) -> tuple[torch.Tensor, int]:
    """Stack a Hadamard-rotated copy under ``a`` when some expert reads rotated input."""
    if arena.rotation_seed is None:
        return a, 0
    from mxserve.quant.hadamard import rotate

    both = torch.cat([a, rotate(a.float(), arena.rotation_seed).to(a.dtype)])
    return both, a.numel()


# kernel codes whose activations are quantized per token (fp8, int8 MMA): they need row amax
_ACT_QUANT_CODES = (1 << 6) | (1 << 7) | (1 << 8)


def _gemm(a, arena: Arena, out, sorted_ids, block_expert, num_post_pad, route_w, num_valid, a_div, gate_up, tiles):
    bm, bn, bk, warps = tiles
    a_all, rot_off = _rotated_input(a, arena)
    amax = torch.ones(1, device=a.device)
    a8 = torch.zeros(1, dtype=torch.float8_e4m3fn, device=a.device)
    if arena.codes_mask & _ACT_QUANT_CODES:
        amax = a_all.abs().amax(dim=-1).float()  # per-token scales, one pass
    if arena.codes_mask & (1 << CODE_FP8):
        # per-token fp8 activations, once per launch; the same ops as the reference's fake quant
        a8 = (a_all.float() / (amax.clamp(min=1e-8) / FP8_MAX)[:, None]).to(torch.float8_e4m3fn)
    n = arena.n // 2 if gate_up else arena.n
    grid = (block_expert.numel(), (n + bn - 1) // bn)
    mx_moe_gemm_kernel[grid](
        a_all,
        rot_off,
        amax,
        a.shape[0],
        a8,
        a.stride(0),
        out,
        out.stride(0),
        sorted_ids,
        block_expert,
        num_post_pad,
        route_w,
        arena.meta,
        arena.wi,
        arena.wb,
        arena.wf,
        arena.sc,
        arena.zp,
        n,
        arena.k,
        num_valid,
        a_div,
        GATE_UP=gate_up,
        CODES=arena.codes_mask,
        BM=bm,
        BN=bn,
        BK=bk,
        F32=INTERPRET,
        num_warps=warps,
    )


def extend_routing(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, n_experts: int, n_routed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the shared experts to every token's top-k, weight 1: ids [T, slots] int64, weights fp32."""
    t = topk_ids.shape[0]
    ids = topk_ids.to(torch.int64)
    w = topk_weights.to(torch.float32)
    n_shared = n_experts - n_routed
    if n_shared:
        dev = ids.device
        ids = torch.cat([ids, torch.arange(n_routed, n_experts, device=dev).expand(t, n_shared)], dim=1)
        w = torch.cat([w, torch.ones(t, n_shared, device=dev)], dim=1)
    return ids, w


def moe_gemms(
    x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, gate_up: Arena, down: Arena, poison: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two grouped GEMMs for routing ``ids``/``w`` [T, slots]; returns the intermediate
    [T*slots, I] and the weighted expert outputs [T*slots, H], both bf16, row = token*slots + slot.
    ``poison`` fills the outputs with NaN first (tests: every element must be written)."""
    alloc = (lambda *s, **kw: torch.full(s, float("nan"), **kw)) if poison else torch.empty
    slots = ids.shape[1]
    flat = ids.reshape(-1)
    rows = flat.numel()
    tiles = pick_tiles(rows, min(gate_up.n_experts, rows), min(gate_up.min_group, down.min_group))
    sorted_ids, block_expert, num_post_pad = align(flat, gate_up.n_experts, tiles[0])
    inter = alloc(rows, gate_up.n // 2, dtype=torch.bfloat16, device=x.device)
    _gemm(x, gate_up, inter, sorted_ids, block_expert, num_post_pad, w, rows, slots, True, tiles)
    out = alloc(rows, down.n, dtype=torch.bfloat16, device=x.device)
    _gemm(inter, down, out, sorted_ids, block_expert, num_post_pad, w.reshape(-1).contiguous(), rows, 1, False, tiles)
    return inter, out


def mx_moe_forward(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: Arena,
    down: Arena,
    n_routed: int,
    shared_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoE output [T, H] (bf16) for x [T, H] with the layer's packed experts; ``shared_scale``
    [T, 1] scales the shared experts' sum (Qwen2-MoE's sigmoid gate; fp32 as SGLang computes it)."""
    t, h = x.shape
    k = topk_ids.shape[1]
    ids, w = extend_routing(topk_ids, topk_weights, gate_up.n_experts, n_routed)
    _, out = moe_gemms(x.to(torch.bfloat16).contiguous(), ids, w, gate_up, down)
    scale = None if shared_scale is None or ids.shape[1] == k else shared_scale.float().reshape(t).contiguous()
    return combine(out.view(t, ids.shape[1], h), k, scale)
