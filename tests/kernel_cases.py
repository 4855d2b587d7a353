"""Kernel-vs-reference checks shared by the interpreter tests (CPU) and the GPU tests."""

from __future__ import annotations

import os
from unittest import mock

import torch

from mxkernels.align import extend_routing
from mxkernels.arena import build_arena
from mxkernels.moe import moe_gemms, mx_moe_forward
from mxkernels.reference import moe_reference
from mxserve.quant.families import quantize_activation
from mxserve.quant.gptq import hessian
from mxserve.quant.hadamard import rotate
from mxserve.quant.qlinear import quantize_linear
from mxserve.runtime.moe_layer import QuantizedExpert
from mxserve.schemes import get_scheme

POISON = float("nan")

# launch layouts (moe.Tiles fields) that every scheme must compute right in, whatever pick_tiles picks
LAYOUTS = {
    "prefill": dict(swap=False, scale_after=False, split=1),
    # weight-only tiles dequantized K-major and transposed into the MMA (Tiles.kmajor)
    "prefill-kmajor": dict(swap=False, scale_after=False, split=1, kmajor=True),
    # weight-only experts dequantized into bf16 before the GEMMs (mxkernels/dequant.py)
    "prefill-dequant": dict(swap=False, scale_after=False, split=1, dequant=True),
    # programs taken 3 blocks at a time over every N tile (Tiles.group_m; the last group has fewer blocks)
    "prefill-grouped": dict(swap=False, scale_after=False, split=1, group_m=3, bn=64),
    "swapped": dict(swap=True, scale_after=False, split=1),
    "decode": dict(swap=True, scale_after=True, split=2),
    # K = 128 in BK = 32 tiles over 3 programs: 2, 2 and 0 tiles (an empty split stores zeros)
    "split-uneven": dict(swap=True, scale_after=True, split=3, bk=32),
    "split-unswapped": dict(swap=False, scale_after=True, split=4, bk=32),
    # CUDA-core products (decode: a row per program), unsplit and split
    "fma": dict(swap=True, scale_after=True, fma=True, bm=1, split=1, prefetch=False),
    "fma-split": dict(swap=True, scale_after=True, fma=True, bm=1, split=3, bk=32, prefetch=False),
    # the next K tile loaded before this one's products; split 3 over 4 tiles leaves a split empty
    "fma-prefetch": dict(swap=True, scale_after=True, fma=True, bm=1, split=3, bk=32, prefetch=True),
    # zero points taken off each weight instead of off the sum (no reduction of the activations)
    "fma-fold": dict(swap=True, scale_after=True, fma=True, bm=1, split=2, prefetch=True, fold_zero=True),
}
# the Gluon decode kernel (mxkernels/moe_gemm_gluon.py) and the schemes it runs: groups of whole
# 128s (w8a16, w4a16, w2a16: one group per row)
GLUON = dict(swap=True, scale_after=False, fma=False, gluon=True, maxnreg=None)
GLUON_SCHEMES = ["bf16", "w4a16g128", "w3a16g128", "w2a16g128", "w1a16g128", "w8a16", "w4a16", "w2a16"]
GLUON_BOUND = 2e-2  # the GPU tests' bound: the interpreter rounds fp32 to bf16 by truncation (moe_gemm._bf16)


def make_experts(names: list[str], h: int, i: int, n_experts: int, n_shared: int, method: str, gen, device):
    """Experts cycling through ``names`` (gate/up and down offset, so blocks differ within an expert)."""
    experts = []
    x = torch.randn(256, h, generator=gen)
    for e in range(n_experts + n_shared):
        gu = torch.randn(2 * i, h, generator=gen) * 0.05
        d = torch.randn(h, i, generator=gen) * 0.05
        s1, s2 = get_scheme(names[e % len(names)]), get_scheme(names[(e + 2) % len(names)])
        hh = hessian(x) if method != "rtn" else None
        hd = hessian(torch.randn(256, i, generator=gen)) if method != "rtn" else None
        experts.append(
            QuantizedExpert(
                quantize_linear(gu, s1, method, hh, 1), quantize_linear(d, s2, method, hd, 1), e >= n_experts
            )
        )
    return experts


def route(t: int, n_experts: int, k: int, gen, skew: bool = True):
    """Top-k routing; with skew, only half the experts ever get tokens (some get none)."""
    logits = torch.randn(t, n_experts, generator=gen)
    if skew:
        logits[:, n_experts // 2 :] -= 100.0
    w, ids = torch.topk(torch.softmax(logits, -1), k)
    return ids, w


def _as_kernel(ql, xin: torch.Tensor) -> torch.Tensor:
    """The reference block on what the kernel reads: the rotated input copy is kept in bf16."""
    if ql.hadamard_seed is not None:
        xin = rotate(xin, ql.hadamard_seed).to(torch.bfloat16).float()
    return torch.nn.functional.linear(quantize_activation(xin, ql.scheme), ql.dequantize())


def code_orders_agree(names, t, h, i, n_experts, k, device, seed, **tiles) -> tuple[float, list]:
    """One layer's GEMMs on arenas with the codes tiled where they can be (arena.tile_words) and row by row
    (MXSERVE_TILED_CODES=0), same experts and inputs: the largest difference of their outputs (inf where they
    leave different elements unwritten), and each side's (gate/up, down) ``Arena.tiled``."""
    gen = torch.Generator().manual_seed(seed)
    experts = make_experts(names, h, i, n_experts, 1, "rtn", gen, device)
    x = torch.randn(t, h, generator=gen).to(torch.bfloat16).to(device)
    topk_ids, topk_w = route(t, n_experts, k, gen)
    outs, orders = [], []
    for tiled in ("1", "0"):
        with mock.patch.dict(os.environ, {"MXSERVE_TILED_CODES": tiled}):
            gu = build_arena([e.gate_up for e in experts]).to(device)
            dn = build_arena([e.down for e in experts]).to(device)
        orders.append((gu.tiled, dn.tiled))
        inter, out = moe_gemms(x, topk_ids.to(device), topk_w.to(device), gu, dn, n_experts, poison=True, **tiles)
        outs.append(torch.cat([inter.float().reshape(-1), out.float().reshape(-1)]).cpu())
    a, b = outs
    if not torch.equal(a.isnan(), b.isnan()):  # rows a launch leaves unwritten stay poisoned in both
        return float("inf"), orders
    return (a - b).nan_to_num().abs().max().item(), orders


def layouts_agree(names, t, h, i, n_experts, k, device, seed, a: dict, b: dict) -> float:
    """One layer's GEMMs in two tile settings (``a``, ``b``: moe.Tiles fields), same arenas and inputs: the largest
    difference of their outputs (inf where they leave different elements unwritten)."""
    gen = torch.Generator().manual_seed(seed)
    experts = make_experts(names, h, i, n_experts, 1, "rtn", gen, device)
    x = torch.randn(t, h, generator=gen).to(torch.bfloat16).to(device)
    topk_ids, topk_w = route(t, n_experts, k, gen)
    gu = build_arena([e.gate_up for e in experts]).to(device)
    dn = build_arena([e.down for e in experts]).to(device)
    outs = []
    for tiles in (a, b):
        inter, out = moe_gemms(x, topk_ids.to(device), topk_w.to(device), gu, dn, n_experts, poison=True, **tiles)
        outs.append(torch.cat([inter.float().reshape(-1), out.float().sum(0).reshape(-1)]).cpu())
    u, v = outs
    if not torch.equal(u.isnan(), v.isnan()):
        return float("inf")
    return (u - v).nan_to_num().abs().max().item()


def gemm_errors(names, t, h, i, n_experts, n_shared, k, device, seed, method="rtn", extra_codes=0,
                **tiles) -> dict[str, float]:  # fmt: skip
    """Per scheme: relative error of each GEMM of the kernel against the reference on the same inputs
    (``tiles`` overrides fields of the launch's tiles: moe.Tiles; ``extra_codes``: the arenas' too,
    as a model's code set adds them)."""
    gen = torch.Generator().manual_seed(seed)
    experts = make_experts(names, h, i, n_experts, n_shared, method, gen, device)
    gu = build_arena([e.gate_up for e in experts], extra_codes).to(device)
    dn = build_arena([e.down for e in experts], extra_codes).to(device)
    x = torch.randn(t, h, generator=gen).to(torch.bfloat16)
    topk_ids, topk_w = route(t, n_experts, k, gen)
    x, topk_ids, topk_w = x.to(device), topk_ids.to(device), topk_w.to(device)
    inter, out = moe_gemms(x, topk_ids, topk_w, gu, dn, n_experts, poison=True, **tiles)
    x, topk_ids, topk_w = x.cpu(), topk_ids.cpu(), topk_w.cpu()
    ids, w = extend_routing(topk_ids, topk_w, len(experts), n_experts)
    inter, out = inter.float().cpu(), out.float().sum(0).cpu()  # the split-K partials summed
    slots = ids.shape[1]
    err: dict[str, list[torch.Tensor]] = {}
    for r, e in enumerate(ids.reshape(-1).tolist()):
        ex = experts[e]
        g, u = _as_kernel(ex.gate_up, x[r // slots].float()[None]).to(torch.bfloat16).float().chunk(2, -1)
        ref_i = torch.nn.functional.silu(g) * u  # gate and up are bf16 before the product, as in the kernel
        ref_o = w.reshape(-1)[r] * _as_kernel(ex.down, inter[r].float()[None])
        err.setdefault(ex.gate_up.scheme.name + "/gate_up", []).append(
            torch.stack([(inter[r] - ref_i[0]).norm(), ref_i.norm()])
        )
        err.setdefault(ex.down.scheme.name + "/down", []).append(
            torch.stack([(out[r] - ref_o[0]).norm(), ref_o.norm()])
        )
    assert torch.isfinite(inter).all() and torch.isfinite(out).all()
    res = {}
    for key, pairs in err.items():
        p = torch.stack(pairs)
        res[key] = (p[:, 0].norm() / p[:, 1].norm()).item()
    return res


def _layer_case(names, t, h, i, n_experts, n_shared, k, device, seed):
    """A random layer run by the kernels: (its experts, x, ids, w, shared scale, output on the CPU)."""
    gen = torch.Generator().manual_seed(seed)
    experts = make_experts(names, h, i, n_experts, n_shared, "rtn", gen, device)
    x = torch.randn(t, h, generator=gen).to(torch.bfloat16)
    ids, w = route(t, n_experts, k, gen)
    scale = torch.sigmoid(torch.randn(t, 1, generator=gen))
    gu, dn = build_arena([e.gate_up for e in experts]), build_arena([e.down for e in experts])
    out = mx_moe_forward(
        x.to(device), ids.to(device), w.to(device), gu.to(device), dn.to(device), n_experts, scale.to(device)
    ).cpu()
    assert torch.isfinite(out.float()).all()
    return experts, x, ids, w, scale, out


def layer_error(names, t, h, i, n_experts, n_shared, k, device, seed) -> float:
    """Relative error of the whole layer (one launch per GEMM) against the bf16 torch reference."""
    experts, x, ids, w, scale, out = _layer_case(names, t, h, i, n_experts, n_shared, k, device, seed)
    dense = [(e.gate_up.dequantize(), e.down.dequantize()) for e in experts]
    ref = moe_reference(x.float(), ids, w, [e.linears() for e in experts], dense, n_experts, scale)
    return ((out.float() - ref).norm() / ref.norm()).item()


def unfused_bf16_layer(x, ids, w, dense, n_routed: int, scale: torch.Tensor | None) -> torch.Tensor:
    """An MoE layer as SGLang runs it unquantized, rounding to bf16 where its separate kernels store:
    gate/up, SiLU(gate) * up, each slot's weighted down output, the routed sum, and the final
    ``routed + sigmoid(gate) * shared`` (fp32 math between the stores)."""

    def mlp(xr: torch.Tensor, e: int) -> torch.Tensor:
        wgu, wd = dense[e]
        g, u = (xr.float() @ wgu.float().t()).to(torch.bfloat16).float().chunk(2, -1)
        return ((g / (1 + torch.exp(-g)) * u).to(torch.bfloat16).float() @ wd.float().t()).float()

    t = x.shape[0]
    rows = [(mlp(x[r : r + 1], e) * w[r, j]).to(torch.bfloat16)[0] for r in range(t) for j, e in enumerate(ids[r])]
    slots = torch.stack(rows).view(t, ids.shape[1], -1)
    y = slots.float().sum(1).to(torch.bfloat16)
    if len(dense) > n_routed:
        shared = sum(mlp(x, e).to(torch.bfloat16).float() for e in range(n_routed, len(dense)))
        y = (y.float() + (shared if scale is None else scale.float() * shared)).to(torch.bfloat16)
    return y


def bf16_layer_agreement(t, h, i, n_experts, n_shared, k, device, seed) -> tuple[float, float]:
    """All-bf16 experts: (share of output elements bit-identical to :func:`unfused_bf16_layer`,
    largest difference in bf16 ulps of the value)."""
    experts, x, ids, w, scale, out = _layer_case(["bf16"], t, h, i, n_experts, n_shared, k, device, seed)
    dense = [(e.gate_up.dequantize(), e.down.dequantize()) for e in experts]
    ref = unfused_bf16_layer(x, ids, w, dense, n_experts, scale)
    ulp = ref.float().abs().clamp(min=1e-6) * 2.0**-7  # bf16 keeps 8 significant bits
    return (out == ref).float().mean().item(), ((out.float() - ref.float()).abs() / ulp).max().item()


def slab_swap_case(device, seed: int = 0) -> tuple[float, float]:
    """A layer on a fixed-capacity slab compiled for every scheme: its output against the plain arenas,
    before and after the slab is overwritten in place with another plan. Returns both max differences."""
    from mxkernels.arena import build_slab, copy_slab, kernel_code, slab_capacity

    gen = torch.Generator().manual_seed(seed)
    cands = ["bf16", "w8a16", "w8a8fp8", "w4a16g128", "w3a16g128", "w2a16g128", "w1a16g128", "w4a4"]
    plan_a = make_experts(["w4a16g128", "w2a16g128", "w3a16g128"], 128, 128, 6, 1, "rtn", gen, device)
    plan_b = make_experts(["w1a16g128", "w8a16", "w4a4", "w4a16g128"], 128, 128, 6, 1, "rtn", gen, device)
    codes = 0
    for s in cands:
        codes |= 1 << kernel_code(get_scheme(s))
    linears = [ql for e in plan_a for ql in e.linears()]
    cap = slab_capacity(4.25, linears)
    x = torch.randn(11, 128, generator=gen).to(torch.bfloat16).to(device)
    ids, w = route(11, 6, 2, gen)
    ids, w = ids.to(device), w.to(device)

    # one kernel for both sides: on a GPU the plain arenas of plan_a would take the Gluon kernel, which the
    # slab's candidates (fp8, w4a4) rule out, and the two kernels sum in different orders
    same = {"gluon": False}

    def plain(experts):
        gu, dn = build_arena([e.gate_up for e in experts]), build_arena([e.down for e in experts])
        return mx_moe_forward(x, ids, w, gu.to(device), dn.to(device), 6, **same).float().cpu()

    def slab(experts):
        return build_slab([e.gate_up for e in experts], [e.down for e in experts], cap, codes, None, 128, device)

    served = slab(plan_a)
    before = mx_moe_forward(x, ids, w, *served, 6, **same).float().cpu()
    copy_slab(served, slab(plan_b))  # same buffers, new weights
    after = mx_moe_forward(x, ids, w, *served, 6, **same).float().cpu()
    return (before - plain(plan_a)).abs().max().item(), (after - plain(plan_b)).abs().max().item()


def check_padded_slots_and_shared_gate(device: str) -> None:
    """SGLang's -1 ids (a padded token's slots) route nowhere through the alignment itself, with no
    masking before it; the shared gate given as its weight scales as a scale computed before does."""
    gen = torch.Generator().manual_seed(6)
    experts = make_experts(["w4a16g128", "bf16", "w2a16g128"], 128, 128, 6, 2, "rtn", gen, device)
    gu, dn = (build_arena(list(blocks)).to(device) for blocks in zip(*(e.linears() for e in experts)))
    x = torch.randn(5, 128, generator=gen).to(torch.bfloat16)
    ids, w = route(5, 6, 2, gen)
    ids[3:] = -1
    ids[1, 1] = -1
    masked, w_masked = torch.where(ids >= 0, ids, 0), torch.where(ids >= 0, w, 0)
    scale = torch.sigmoid(torch.randn(5, 1, generator=gen))
    gate = (torch.randn(128, generator=gen) * 0.1).to(torch.bfloat16)
    x, ids, w, masked, w_masked, scale, gate = (v.to(device) for v in (x, ids, w, masked, w_masked, scale, gate))
    padded = mx_moe_forward(x, ids, w, gu, dn, 6, scale)
    assert torch.equal(padded, mx_moe_forward(x, masked, w_masked, gu, dn, 6, scale))
    assert not torch.equal(padded, mx_moe_forward(x, masked, w, gu, dn, 6, scale))  # the slots do count
    by_gate = mx_moe_forward(x, ids, w, gu, dn, 6, shared_gate=gate).float()
    ref = mx_moe_forward(x, ids, w, gu, dn, 6, torch.sigmoid(x.float() @ gate.float())[:, None]).float()
    assert ((by_gate - ref).abs() <= ref.abs() * 2**-7 + 1e-6).all()  # one bf16 rounding apart at most
    ext_ids, ext_w = extend_routing(ids.cpu(), w.cpu(), 8, 6)  # the references' routing: the same rule
    assert (ext_ids >= 0).all() and (ext_w[3:, :2] == 0).all() and ext_w[1, 1] == 0 and (ext_w[:, 2:] == 1).all()


def assert_same_gemms(got, want, close: bool = False) -> None:
    """moe_gemms' (intermediate, outputs) ``got`` against ``want``: every element written (finite), and bit for bit,
    or with ``close`` within 1% (stream-K adds its fp32 sums in any order)."""
    for a, b, name in zip(got, want, ("intermediate", "outputs")):
        assert torch.isfinite(a).all(), name
        if close:
            assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2, name
        else:
            assert torch.equal(a, b), (name, (a.float() - b.float()).abs().max().item())


def shared_apart_case(device: str, t: int, graph: bool = False, early: bool = False, close: bool = False,
                      **tiles) -> None:  # fmt: skip
    """The shared experts in launches of their own (a second stream on a GPU) compute, bit for bit, what
    the one launch of routed and shared experts computes, every output element written (poisoned
    first); with ``graph`` the layer is captured in a CUDA graph and replayed on new inputs. The routing
    counter launched beside them (``on_side``) counts every pass. ``early``: the shared experts are
    launched before the top-k exists (start_shared, as the SGLang plugin's hook on the MoE block does), and
    the forward runs the routed experts into that start's buffers. ``close``: within 1% rather than bit for bit
    (stream-K: its fp32 sums are added in another order)."""
    from mxkernels.moe import start_shared
    from router_stats import ExpertCounter

    counter, want = ExpertCounter(8).to(device), ExpertCounter(8)
    gen = torch.Generator().manual_seed(t)
    experts = make_experts(["w4a16g128", "w2a16g128", "w8a16", "w3a16g128"], 256, 128, 8, 2, "rtn", gen, device)
    gu, dn = (build_arena(list(blocks)).to(device) for blocks in zip(*(e.linears() for e in experts)))

    def draw():
        ids, w = route(t, 8, 2, gen, skew=False)
        ids[-1, -1] = -1  # a padded slot: routes nowhere
        return torch.randn(t, 256, generator=gen).to(torch.bfloat16).to(device), ids.to(device), w.to(device)

    def apart_launches(x, ids, w, poison):
        started = start_shared(x, ids.shape[1], gu, dn, 8, poison=poison, shared_apart=True, **tiles) if early else None
        out = moe_gemms(x, ids, w, gu, dn, 8, poison=poison, shared_apart=True, on_side=lambda: counter.record(ids),
                        started=started, **tiles)  # fmt: skip
        if early:  # the forward took the start: its buffers, which the shared experts wrote
            assert out[0] is started.layout.inter and out[1] is started.layout.out
        return out

    def both(x, ids, w):
        want.record(ids.cpu())
        apart = apart_launches(x, ids, w, True)
        one = moe_gemms(x, ids, w, gu, dn, 8, poison=True, shared_apart=False, **tiles)
        return apart, one

    x, ids, w = draw()
    apart, one = both(x, ids, w)
    if graph:  # captured once, replayed on the next inputs copied into the captured ones
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            captured = apart_launches(x, ids, w, False)
        for _ in range(2):
            nx, nids, nw = draw()
            x.copy_(nx), ids.copy_(nids), w.copy_(nw)
            g.replay()
            want.record(ids.cpu())
            apart, one = captured, moe_gemms(x, ids, w, gu, dn, 8, poison=True, shared_apart=False, **tiles)
    assert_same_gemms(apart, one, close)
    if device == "cuda":
        torch.cuda.synchronize()
    assert counter.snapshot() == want.snapshot()


def fused_router_case(device: str, t: int, renormalize: bool, padded: bool, graph: bool = False, h: int = 256,
                      per_program: int = 1) -> None:  # fmt: skip
    """mxkernels.router.fused_router against torch: the logits (rounded to bf16, within two bf16 steps of a
    product in fp32), the top-k of their softmax (ids exact, weights within 1e-6) and its renormalization;
    tokens from num_token_non_padded on route nowhere; the per-token counters are zero again after a launch,
    so a second launch (with ``graph``, a CUDA-graph replay on new tokens) routes alike. ``h``: the hidden size
    (past 2048 the kernel loops over K); ``per_program``: experts a program (64: one program a token, no counter)."""
    from mxkernels import router

    gen = torch.Generator().manual_seed(t)
    w = (torch.randn(60, h, generator=gen) * 0.1).to(torch.bfloat16).to(device)
    valid = torch.tensor([max(t - 2, 0)], device=device) if padded else None
    fused_router = router.fused_router

    def check(x, got) -> None:
        weights, ids, logits = (g.cpu() for g in got)
        exact = x.float().cpu() @ w.float().cpu().T
        assert ((logits - exact).abs() <= exact.abs() * 2**-7 + 1e-3).all()
        # the top-k of the kernel's own logits, rounded to bf16, so equal logits occur (5 of 33 tokens at
        # t = 33): the lowest index first among equals, as the kernel (a stable sort, where topk has no rule)
        probs = torch.softmax(logits, -1)
        want_w, want_ids = (v[:, :4] for v in torch.sort(probs, stable=True, dim=-1, descending=True))
        if renormalize:
            want_w = want_w / want_w.sum(-1, keepdim=True)
        assert torch.allclose(weights, want_w, atol=1e-6)
        routed = torch.arange(t) < (int(valid) if padded else t)
        assert torch.equal(ids[routed], want_ids[routed].int())
        assert (ids[~routed] == -1).all()
        assert not router._COUNTS[got[0].device].any()  # cuda:0, not the test's 'cuda'

    x = torch.randn(t, h, generator=gen).to(torch.bfloat16).to(device)
    check(x, fused_router(x, w, 4, renormalize, valid, per_program))
    if not graph:
        x2 = torch.randn(t, h, generator=gen).to(torch.bfloat16).to(device)
        check(x2, fused_router(x2, w, 4, renormalize, valid, per_program))
        return
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = fused_router(x, w, 4, renormalize, valid, per_program)
    for _ in range(2):
        x.copy_(torch.randn(t, h, generator=gen).to(torch.bfloat16))
        g.replay()
        torch.cuda.synchronize()
        check(x, captured)
