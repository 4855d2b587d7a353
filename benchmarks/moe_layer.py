"""MoE-layer forward time on the GPU: mxserve's mixed-precision kernel vs baselines, one run.

For each model's expert shapes, routing (skewed: Zipf prior over experts;
uniform) and token count, times the whole expert computation of one layer
(both GEMMs, routing weights, top-k sum; shared experts as extra experts):

- torch bf16: the per-expert loop transformers runs (eager);
- sglang bf16 / w4a16 (int4, group 128) / fp8 w8a8 (per-channel): SGLang's
  Triton fused_moe (``fused_experts_impl``), same routing;
- marlin w4a16g128: SGLang's Marlin MoE (``fused_marlin_moe``), 4-bit codes with zero points
  and group-128 scales (uint4), the strongest 4-bit peer;
- ours bf16 / w4a16g128 / w8a8fp8 (uniform) and ours mixed: the plan that
  gives the more frequent half of the experts (and the shared ones) w4a16g128
  and the rest w2a16g128 (3.25 average bits when the halves are equal); up to 64 tokens
  also in the prefill layout (moe.py's Tiles), to show what the decode layout buys.

Times are CUDA-graph replays (device time, as a serving engine's decode loop
sees it); eager times with Python launch overhead are kept in the JSON. The
torch loop syncs with the host and runs eager. Ceilings (copy bandwidth, bf16
and fp8 matmul rate) are measured in the same run. Writes moe_layer.json and
moe_layer.md into --out.

    python3 benchmarks/moe_layer.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import zlib
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mxkernels.align import extend_routing  # noqa: E402
from mxkernels.arena import build_arena  # noqa: E402
from mxkernels.moe import expected_active, multiprocessors, mx_moe_forward, pick_tiles  # noqa: E402
from mxkernels.shapes import MODEL_SHAPES, TOKEN_COUNTS  # noqa: E402
from mxserve.errors import MxServeError  # noqa: E402
from mxserve.quant.qlinear import QuantizedLinear, quantize_linear  # noqa: E402
from mxserve.schemes import get_scheme  # noqa: E402


def bench(fn) -> float:
    """Median seconds, host overhead included (eager launches)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e-3


def bench_graph(fn) -> float:
    """Median seconds of CUDA-graph replays: device time without Python launch overhead,
    as a serving engine's decode sees it."""
    import triton.testing

    fn()  # compile outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=25, return_mode="median") * 1e-3


def ceilings(dev) -> dict:
    n = 1 << 28  # 512 MiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_()
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a))
    m = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    t_mm = bench(lambda: m @ m)
    res = {"copy_GBps": 2 * n * 2 / t / 1e9, "bf16_TFLOPs": 2 * 8192**3 / t_mm / 1e12}
    try:
        f = m.to(torch.float8_e4m3fn)
        one = torch.ones((), device=dev)
        t8 = bench(lambda: torch._scaled_mm(f, f.T, one, one, out_dtype=torch.bfloat16))
        res["fp8_TFLOPs"] = 2 * 8192**3 / t8 / 1e12
    except Exception as e:  # noqa: BLE001 - a missing fp8 path is reported, not fatal
        res["fp8_error"] = str(e)[:200]
    return res


def popularity(e: int, dev) -> torch.Tensor:
    """The skewed prior's order of the experts, one per expert count: the tiered plans give the most popular experts
    the first tier, so the routing timed must take the same order whatever the generator's state. (Until the
    thirty-fourth session each draw took its own order: the mixed plan's w4 experts got 41% of the routed rows of a
    4096-token draw, not the 97% of the plan's probe; benchmarks/README.md.)"""
    return torch.randperm(e, generator=torch.Generator(device=dev).manual_seed(7), device=dev)


def cell_generator(model: str, skewed: bool, tokens: int, dev) -> torch.Generator:
    """The generator of one cell's input and routing, seeded by the cell alone: a run of other models or token counts
    draws the same ones (with one generator for the run, Mixtral's 2 experts at 1 token drew other tiers of the served
    plan in two runs of the thirty-fourth session: 65 against 91 us for the same cell)."""
    cell = f"{model}/{'skewed' if skewed else 'uniform'}/{tokens}"
    return torch.Generator(device=dev).manual_seed(zlib.crc32(cell.encode()))


def routing(t: int, e: int, k: int, skewed: bool, gen, dev):
    logits = torch.randn(t, e, generator=gen, device=dev)
    if skewed:  # Zipf(1) prior: expert of rank r is exp(-log r) as likely
        logits = logits + (-torch.log(torch.arange(1, e + 1, device=dev, dtype=torch.float32)))[popularity(e, dev)]
    w, ids = torch.topk(torch.softmax(logits, -1), k)
    return ids, w


def sglang_impl():
    try:
        from sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe import fused_experts_impl
        from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

        # fused_moe reads a few global server settings; outside a server they must be set once.
        set_global_server_args_for_scheduler(ServerArgs(model_path="none"))
        return fused_experts_impl, None
    except Exception as e:  # noqa: BLE001 - reported in the results
        return None, f"{type(e).__name__}: {e}"[:300]


def marlin_impl():
    """SGLang's Marlin MoE (``fused_marlin_moe``, JIT-built with the device's nvcc on first use).

    Importing it standalone pulls in ``flashinfer.comm``, which needs ``cuda.tile`` (absent on the
    lent image); Marlin does not use it, so a stub module stands in when the import fails."""
    name = "sglang.srt.layers.moe.fused_moe_triton.fused_marlin_moe"
    try:
        return __import__(name, fromlist=["fused_marlin_moe"]).fused_marlin_moe, None
    except ImportError as first:
        import types

        def placeholder(attr: str):
            if attr.startswith("__"):  # module protocol (__file__, __path__...): absent, as for a real module
                raise AttributeError(attr)
            return type(attr, (), {})  # any other name: an inert placeholder class

        stub = types.ModuleType("flashinfer.comm")
        stub.__getattr__ = placeholder
        sys.modules["flashinfer.comm"] = stub
        try:
            return __import__(name, fromlist=["fused_marlin_moe"]).fused_marlin_moe, f"stubbed: {first}"[:300]
        except Exception as e:  # noqa: BLE001 - reported in the results
            return None, f"{type(e).__name__}: {e}"[:300]


def marlin_weights(ne: int, h: int, i: int, dev) -> tuple:
    """Random 4-bit weights in Marlin's MoE layout, asymmetric (uint4 with zero points, group 128):
    w1 [E, H/16, 2*2I], w2 [E, I/16, 2H] int32, scales [E, K/128, N] bf16, zeros [E, K/128, N/8]
    int32. Random codes time like real ones; the scales stay small so no value overflows."""

    def rnd(*shape):
        return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, device=dev)

    def scales(*shape):
        return torch.rand(*shape, device=dev, dtype=torch.bfloat16) * 1e-3

    return (rnd(ne, h // 16, 4 * i), rnd(ne, i // 16, 2 * h), scales(ne, h // 128, 2 * i), scales(ne, i // 128, h),
            {"w1_zeros": rnd(ne, h // 128, 2 * i // 8), "w2_zeros": rnd(ne, i // 128, h // 8)})  # fmt: skip


def marlin_bytes(mw: tuple) -> int:
    tensors = [*mw[:4], *mw[4].values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def parse_shape(text: str) -> tuple[str, dict[str, int]]:
    """``NAME:hidden=H,inter=I,experts=E,top_k=K[,shared=S]`` (shared: routed-sized shared slices)."""
    name, _, spec = text.partition(":")
    usage = f"bad --shape {text!r}: want NAME:hidden=H,inter=I,experts=E,top_k=K[,shared=S]"
    try:
        m = {k: int(v) for k, v in (kv.split("=") for kv in spec.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(usage) from None
    m.setdefault("shared", 0)
    if not name or set(m) != {"hidden", "inter", "experts", "top_k", "shared"}:
        raise argparse.ArgumentTypeError(usage)
    return name, m


def random_experts(m: dict, dev, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bf16 weights of a layer of shape ``m`` (MODEL_SHAPES' fields), shared experts included:
    gate/up [E, 2I, H] and down [E, H, I]."""
    h, i, ne = m["hidden"], m["inter"], m["experts"] + m["shared"]
    gu = torch.randn(ne, 2 * i, h, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02
    dn = torch.randn(ne, h, i, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02
    return gu, dn


def layer_arenas(gu: torch.Tensor, dn: torch.Tensor, schemes: list[str]):
    """Both arenas of a layer whose expert x runs ``schemes[x]`` (RTN), and the average bits."""
    bf16 = get_scheme("bf16")
    ne, i2, h = gu.shape
    i = i2 // 2

    def block(w: torch.Tensor, sc: str):
        if sc == "bf16":
            return QuantizedLinear(bf16, w.shape[0], w.shape[1], w)
        return quantize_linear(w.float(), get_scheme(sc), "rtn")

    ag = build_arena([block(gu[x], sc) for x, sc in enumerate(schemes)])
    ad = build_arena([block(dn[x], sc) for x, sc in enumerate(schemes)])
    bits = sum(
        get_scheme(sc).bits_per_weight(kk) * nn * kk for sc in schemes for nn, kk in ((2 * i, h), (h, i))
    ) / (len(schemes) * 3 * i * h)
    return ag.to(gu.device), ad.to(gu.device), bits


def tiered_plan(e: int, ne: int, k: int, skewed: bool, dev, tiers: list[tuple[str, int]]) -> list[str]:
    """A plan by popularity tiers, ``[(scheme, weight), ...]`` most popular first: the routed experts
    in order of popularity take the schemes in proportion to the weights, the shared ones the first."""
    probe_ids, _ = routing(4096, e, k, skewed, torch.Generator(device=dev).manual_seed(7), dev)
    order = torch.bincount(probe_ids.reshape(-1), minlength=e).argsort(descending=True).tolist()
    total = sum(w for _, w in tiers)
    plan = [tiers[0][0]] * ne
    bounds = [round(e * sum(w for _, w in tiers[: j + 1]) / total) for j in range(len(tiers))]
    for rank, x in enumerate(order):
        plan[x] = tiers[next(j for j, b in enumerate(bounds) if rank < b)][0]
    return plan


def mixed_plan(e: int, ne: int, k: int, skewed: bool, dev) -> list[str]:
    """The planner's shape of a 3.25-bit plan for this routing: the more popular half of the routed
    experts (and the shared ones) w4a16g128, the rest w2a16g128."""
    return tiered_plan(e, ne, k, skewed, dev, [("w4a16g128", 1), ("w2a16g128", 1)])


# layout fields that are launch modes, not tile fields: programmatic dependent launches (mxkernels.pdl)
MODES = ("pdl", "shared_early", "zero_early")


def in_modes(fn, modes: dict):
    """``fn`` run in the launch modes ``modes`` asks for: programmatic dependent launches ("pdl", on a GPU that has
    them)."""
    from mxkernels import pdl

    def run():
        pdl.ENABLED = bool(modes.get("pdl"))
        try:
            return fn()
        finally:
            pdl.ENABLED = False

    return run


def early_start(x, top_k: int, gate_up, down, n_routed: int, tiles: dict, modes: dict) -> dict:
    """The forward's ``started`` where ``modes`` asks for the shared experts started early ("shared_early": launched
    before the top-k exists, as the SGLang plugin does under MXSERVE_SHARED_EARLY; mxkernels.moe.start_shared), or
    stream-K's sums zeroed so ("zero_early": one token taking the top-k's rows straight, as the plugin does under
    MXSERVE_TOPK_ROWS; mxkernels.moe.start_zero_fill), in the same graph as the forward."""
    from mxkernels.moe import start_shared, start_zero_fill

    if modes.get("shared_early"):
        return {"started": start_shared(x, top_k, gate_up, down, n_routed, **tiles)}
    if modes.get("zero_early"):
        return {"started": start_zero_fill(x, top_k, gate_up, down, n_routed, **tiles)}
    return {}


def parse_plan(text: str) -> tuple[str, list[tuple[str, int]]]:
    """``LABEL=SCHEME:WEIGHT,SCHEME:WEIGHT,...`` (most popular first) for --plan."""
    try:
        label, spec = text.split("=", 1)
        tiers = [(sc, int(w)) for sc, w in (part.split(":") for part in spec.split(","))]
        for sc, _ in tiers:
            get_scheme(sc)
    except (ValueError, MxServeError) as err:
        raise argparse.ArgumentTypeError(f"--plan LABEL=SCHEME:WEIGHT,...: {err}") from None
    return label, tiers


# the launch layout before the decode path (weights on the MMA's N side, no split, per-weight
# dequantization), kept as a variant so one run shows what the decode layout buys
PREFILL_LAYOUT = {"swap": False, "scale_after": False, "split": 1, "maxnreg": None, "fma": False}
# other decode layouts of the mixed layer, timed beside the picked one: CUDA-core products (one
# row per program), the Triton MMA decode layout and the Gluon kernel, each forced, and variants
DECODE_VARIANTS = {  # the others timed before are in results/moe_layer_h200.json
    "CUDA-core, no prefetch": {"fma": True, "prefetch": False},
    "CUDA-core": {"fma": True, "prefetch": True},
    # zero points off each weight: no reduction of the activations per K tile (2 of its 4 barriers)
    "CUDA-core, zero folded": {"fma": True, "prefetch": True, "fold_zero": True},
    # the CUDA-core products as a Gluon kernel: each lane's 32 k in registers, no barrier in the loop
    "CUDA-core, Gluon": {"fma": True, "gluon": True},
    # and with 1, 2 and 4-bit codes in packed bf16 pairs (fma.rn.bf16x2: a quarter fewer instructions)
    "CUDA-core, Gluon, packed bf16": {"fma": True, "gluon": True, "packed": True},
    # the CUDA-core products with K split other ways than pick_tiles' (about WAVES programs per SM, over
    # the shared and routed launches), and capped at 128 registers (4 programs per SM with 4 warps): where
    # a launch's programs outnumber what the SMs hold, its last ones wait for a first wave to finish
    **{f"CUDA-core, split {s}": {"fma": True, "prefetch": True, "split": s} for s in (1, 2, 4, 6)},
    "CUDA-core, 128 registers": {"fma": True, "prefetch": True, "maxnreg": 128},
    # the layout picked, with K split by waves (moe.wave_split; MXSERVE_DECODE_SPLIT=waves)
    "split by waves": {"split_fit": "waves"},
    "MMA": {"fma": False, "gluon": False},
    "MMA, split x2": "double",
    "Gluon, BM 16": {"fma": False, "gluon": True, "maxnreg": None, "bm": 16},
    "Gluon, BM 8": {"fma": False, "gluon": True, "maxnreg": None, "bm": 8},
    # 16-row blocks held to 3 programs an SM, or on 64-row tiles: uncapped, w4 gate/up holds 178 registers at 16 rows
    # (2 an SM) where 8 rows hold 136 (3) or 128 under stream-K (4); whether that, not the instructions (475 a K tile
    # against 385: 0.62x a row), is what makes 16-row blocks 1.1 to 1.4x the time (thirty-ninth session)
    "Gluon, BM 16, at 168 registers": {"fma": False, "gluon": True, "maxnreg": 168, "bm": 16},
    "Gluon, BM 16, BN 64": {"fma": False, "gluon": True, "maxnreg": None, "bm": 16, "bn": 64},
    "Gluon, BM 8, unsplit": {"fma": False, "gluon": True, "maxnreg": None, "bm": 8, "split": 1},
    "Gluon, BM 8, 80 registers": {"fma": False, "gluon": True, "maxnreg": 80, "bm": 8},
    "Gluon, BM 8, BN 128": {"fma": False, "gluon": True, "maxnreg": None, "bm": 8, "bn": 128},
    "Gluon, BM 8, BN 64": {"fma": False, "gluon": True, "maxnreg": None, "bm": 8, "bn": 64},
    "Gluon, BM 8, BN 64, 80 registers": {"fma": False, "gluon": True, "maxnreg": 80, "bm": 8, "bn": 64},
    # the picked layout, the Gluon MMA kernel's padding slots loading no activations (tenth session: at 8
    # tokens most of a block's 8 slots are padding, and each warp loads the block's activations)
    "Gluon, padding not loaded": {"skip_pad": True},
    # K split in proportion to each expert's bits (twelfth session's ncu: the launch ends with its widest
    # experts' programs), up to 2 and 4 ways for the widest code
    "Gluon, K split by bits, 2": {"split": 2, "split_bits": True},
    "Gluon, K split by bits, 4": {"split": 4, "split_bits": True},
    # the picked layout with the shared experts inside the routed experts' launches (as before the
    # seventh session), not in launches of their own on a second stream
    "shared in the routed launches": {"shared_apart": False},
    # the shared experts' launches apart in the routed experts' block (as before the thirty-seventh session), not in
    # one picked from their own rows, every token's (Tiles.shared_own): at 64 tokens Qwen1.5-MoE's 4 shared slices
    # took 32 blocks of 8 rows, as many as its ~60 routed experts; and so off stream-K (16 tokens)
    "Gluon, shared experts in the layer's block": {"shared_own": False},
    "no stream-K, shared experts in the layer's block": {"stream_k": False, "shared_own": False},
    # the shared experts' rows are every token's, so their blocks have no padding rows: 32 rows (staged) at 64 tokens
    "Gluon, shared experts in 32-row blocks": {"shared_bm": 32},
    # the Gluon kernel on a grid of the programs the SMs hold, each GEMM's K tiles dealt out in equal runs
    # (Tiles.stream_k; the seventeenth session's ncu: few warps per SM, each program as long as its K loop).
    # Picked below moe.STREAM_K_ROWS rows per expert since the eighteenth session: forced here, and the
    # layouts picked before (the unbalanced grid; at one row per expert the CUDA-core products) beside it
    "Gluon, stream-K": {"stream_k": True},
    "no stream-K": {"stream_k": False},
    # one token's rows straight from its top-k, a block a row (MXSERVE_TOPK_ROWS=1 in a server; forty-first session):
    # no alignment launch, and stream-K's programs wait for no row count before their first weights; the sums zeroed
    # before the forward, as the server's MoE block does before its router. At other token counts the same launches
    # as "Gluon, stream-K"
    "stream-K, top-k rows": {"stream_k": True, "topk_rows": True, "zero_early": True},
    # the routed slots straight from the top-k on the grid (MXSERVE_TOPK_GRID=1 in a server; forty-fourth session): a
    # program row per routed slot, the slot that leads a block of its expert's slots finding them in the top-k, so no
    # alignment launch; beside "no stream-K", the same grid aligned
    "grid, top-k rows": {"stream_k": False, "topk_grid": True},
    # ... and on stream-K (its default below moe.STREAM_K_ROWS rows per expert, STREAM_K_ROWS_COSTLY for plans such as
    # the served t1 plan, whose 8 and 16 tokens then take the grid; forty-sixth session): every program finds the
    # blocks that routed slots lead and deals out their K tiles, the shared experts' blocks after them, the sums
    # zeroed before the forward (as the server's MoE block does under MXSERVE_TOPK_GRID=1); beside "Gluon, stream-K",
    # the same launches aligned. With bf16 and w8 experts its gate/up kernel held 174 registers (2 programs an SM) where
    # aligned 168 (3) under Triton 3.9 (this machine's); under 3.6 (the device's) 168 either way, without the spills
    # the cap would cost under 3.9 (forty-seventh session)
    "stream-K, top-k rows beyond one token": {"stream_k": True, "topk_grid": True, "zero_early": True},
    "stream-K, top-k rows beyond one token, gate/up at 168 registers": {
        "stream_k": True, "topk_grid": True, "zero_early": True, "maxnreg": 168, "down_tiles": {"maxnreg": None}},
    # the down GEMM on 128-row tiles where the code set takes 64 (bf16, 3 or 8 bits; forty-first session): at 8
    # requests the served 1-token plan's down launches were 960 programs of 72 registers, 7 an SM (924 at once), and
    # took 21 us against gate/up's 28; at 128 rows 480 programs of 128 registers, 4 an SM (528): one wave
    "down BN 128": {"down_tiles": {"bn": 128}},
    # the down GEMM's K split (forty-second session): at 8 requests the routed down launch took 20 us mean, 0.87x
    # Marlin's routed down, each of its ~1000 programs walking all 11 K tiles one round trip after another; on
    # 128-row tiles (half the programs) it was no faster, so fewer K tiles a program (partial sums in fp32, added by
    # the top-k sum's launch) and more programs in flight
    "down split 2": {"down_tiles": {"split": 2}},
    "down split 3": {"down_tiles": {"split": 3}},
    # ... and gate/up capped at 96 registers, so 5 programs share an SM where its 104 let 4: about 660 then fit at once,
    # the 8-request layer's routed and shared gate/up programs (about 572 and 88); 6 spill instructions in its K loops
    # of about 360 (the served code set, Triton 3.6's ptxas); the down GEMM uncapped as picked
    "gate/up at 96 registers": {"maxnreg": 96, "down_tiles": {"maxnreg": None}},
    "gate/up at 96 registers, down BN 128": {"maxnreg": 96, "down_tiles": {"maxnreg": None, "bn": 128}},
    # stream-K with one and with two MMA tiles of rows per warp, whatever the codes (the picked: two for narrow code
    # sets, one for the others): whether costly layers lose on stream-K for their tiles' width (twenty-first session)
    "stream-K, BN 64": {"stream_k": True, "bn": 64},
    "stream-K, BN 128": {"stream_k": True, "bn": 128},
    # the picked layout with every launch of the layer a programmatic dependent launch (MXSERVE_PDL=1, mxkernels/pdl.py;
    # twenty-second session): the down GEMM's first K tile loaded while the launch before ends
    "PDL": {"pdl": True},
    # the shared experts started before the forward's routing (start_shared; MXSERVE_SHARED_EARLY=1 in a server): on
    # stream-K launches of their own, in blocks of their own rows (Tiles.shared_own: 16 from 13 tokens), where without
    # it they stay in stream-K's one launch per GEMM in the routed experts' block (thirty-seventh session)
    "shared experts started early": {"shared_early": True},
    # (the GEMMs' L2 prefetch, MXSERVE_L2_PREFETCH, twenty-third session: 1.8 to 2x the layer's time on the H200,
    # removed in the twenty-fifth: results/moe_layer_h200_s25_decode.md; the SiLU in stream-K's gate/up launch and
    # the top-k sum in its down launch, MXSERVE_SILU_IN_GEMM and MXSERVE_SUM_IN_GEMM, twenty-third and twenty-fifth
    # sessions: no faster in the layer there, slower end to end, removed in the twenty-sixth)
    # the down GEMM's stream-K grid with more programs an SM (twenty-fifth session): uncapped, ptxas gives its kernel 72
    # to 102 registers (106 to 124 under the cap of 128), so 5 to 7 programs fit an SM where 4 run, each with a K tile
    # of weights in flight (down reached 34% of bandwidth at 8 tokens); and capped at 80 (6 fit; a few spills)
    "stream-K, down uncapped, as many an SM as fit": {"stream_k": True, "down_tiles": {"per_sm": 8, "maxnreg": 255}},
    "stream-K, down at 80 registers, 6 an SM": {"stream_k": True, "down_tiles": {"per_sm": 6, "maxnreg": 80}},
    # stream-K's gate/up capped at 128 registers, so 4 programs share an SM where its uncapped 167 to 178 (w4 and w2,
    # BN 128; sm_90, Triton 3.9) let 2 or 3: 8 bytes of stack, one spill instruction in its K loops and 1 to 3% more
    # instructions there (benchmarks/results/sass_census_s27.md; twenty-seventh session, not yet timed)
    "stream-K, gate/up at 128 registers, 4 an SM": {"stream_k": True, "maxnreg": 128},
    # and one MMA tile of rows a warp (BN 64) at 80 registers, 6 programs an SM: the w4 + w2 gate/up kernel keeps 16
    # bytes of stack and 2 spill instructions in its K loops, 3% more instructions (102 registers uncapped: 4 an SM);
    # the served plan's wide code set spills (78 instructions): this is for narrow sets (the tenth session's cap of 80
    # on the unbalanced grid: faster at 2 tokens on Mixtral, slower where it spilled)
    "stream-K, BN 64, at 80 registers, 6 an SM": {"stream_k": True, "bn": 64, "maxnreg": 80, "per_sm": 6},
    # the next K tile's loads kept before this tile's MMAs (Tiles.early): in the sm_90 code of the picked layout
    # (ptxas 12.8, the lent image's) gate/up issues them after most of its MMAs, 13 to 130 of 360 to 455 instructions
    # before the loop's end, where early leaves 214 to 410; for 222 to 228 registers at BN 128 (2 programs an SM,
    # where 3 run), 128 for w4 + w2 at BN 64 (4 an SM), and 198 for the served plan's code set at BN 64, 164 under a
    # cap of 168 without spills (3 an SM; capped at 168, BN 128 spills)
    # (benchmarks/results/sass_census_s28_ptxas128_*.md; twenty-eighth session, not yet timed)
    "Gluon, loads first": {"early": True},
    "Gluon, BN 64, loads first": {"bn": 64, "early": True},
    "Gluon, BN 64, loads first, at 168 registers": {"bn": 64, "early": True, "maxnreg": 168},
    # 1 and 2-bit codes unpacked 7 or 3 fields a shift, in place, the activations scaled to match (Tiles.place): the
    # w2 K loop's shifts 114 -> 34, its instructions 3 to 7% fewer (same census)
    "Gluon, 2-bit codes in place": {"place": True},
    "Gluon, BN 64, loads first, 2-bit codes in place": {"bn": 64, "early": True, "place": True},
    # the loads kept first at the picked layout's programs an SM (twenty-ninth session's ncu on the H100: with the loads
    # first the warps waited on them 1.31 cycles an instruction against 3.58, but at 228 registers 2 programs an SM ran
    # where 3 had, and the schedulers issued on 40% of cycles either way). Narrow code sets (BN 128) at 168 registers,
    # 3 an SM, as picked: w4 + w2 gate/up keeps 3 spill instructions, 24 stack bytes and its loads first (410 of 504
    # instructions after the last load); the down GEMM kept at stream-K's 128 (4 an SM). Wide ones (BN 64, the served
    # plan's) at 128, 4 an SM, as picked: 21 to 23 spill instructions over its 4 K loops (of 1,400)
    # (sass_census.py --ptxas P table --early --maxnreg 168 / 128: results/sass_census_s29_ptxas128_early_*.md)
    "Gluon, loads first, at 168 registers, down at 128": {"early": True, "maxnreg": 168,
                                                          "down_tiles": {"maxnreg": 128}},
    "Gluon, loads first, at 128 registers": {"early": True, "maxnreg": 128},
    # gate/up alone at BN 64 with its loads first (4 an SM), the down GEMM as picked (None: moe.down_override). In the
    # twenty-ninth session's ncu (H100, 16 tokens) gate/up took 42.9 us so against 44.8 picked, but the down GEMM at
    # BN 64 28.8 against 24.3. Timed in the thirtieth (H200): 1.004x the picked layout's time on the mixed layer
    "Gluon, gate/up at BN 64, loads first, down as picked": {"bn": 64, "early": True,
                                                             "down_tiles": {"bn": None, "early": None}},
    # GROUP_M blocks at a time over every N tile (Tiles.group_m; on stream-K, of its units): an expert's blocks read
    # each N tile's weights at once, the later ones from L2 (with 16-row blocks Mixtral's experts at 64 tokens get 1.43
    # blocks each on average, benchmarks/expert_reads.py). Thirty-second session (H100): 0.98 to 1.05x the picked
    # layout's time; the 64-token launch is not bound by DRAM, and 32-row blocks, which unpack each expert's weights
    # once, took 2.1x the time (thirty-third session; benchmarks/README.md)
    "Gluon, blocks 2 at a time": {"group_m": 2},
    "Gluon, blocks 4 at a time": {"group_m": 4},
    # the activations through shared memory (Tiles.staged), which frees the registers that hold them a tile ahead:
    # blocks of 32 rows (an expert's weights unpacked once for 32 of its rows; gate/up at BN 64 holds 206 registers
    # without spills, where held in registers it takes 254), and the picked layout so staged. Thirty-third session
    # (H100): 32 rows 2.1x the picked layout's time; staged at the picked block 0.85 to 0.98x on Mixtral from 16
    # tokens, up to 1.18x elsewhere, so the default since (moe.STAGED_ROWS); "held" is the picked layout without it
    "Gluon, staged": {"staged": True},
    "Gluon, held": {"staged": False},
    "Gluon, BM 32, staged": {"bm": 32, "staged": True},
    "Gluon, BM 32, BN 64, staged": {"bm": 32, "bn": 64, "staged": True},
    # the products as warpgroup MMAs (Tiles.wgmma, sm_90): one wgmma a 16-deep slice of all the block's tokens and the 4
    # warps' 64 rows, so a block's MMA instructions do not grow with its rows (mma_v2's doubled at 32 rows above), the
    # activations copied once a program into shared memory (every warp loads them all, held); at the picked block, 32
    # and 64 rows
    "Gluon, wgmma": {"wgmma": True, "bn": 64, "staged": False},
    "Gluon, wgmma, BM 32": {"wgmma": True, "bn": 64, "staged": False, "bm": 32},
    "Gluon, wgmma, BM 64": {"wgmma": True, "bn": 64, "staged": False, "bm": 64},
    # capped so 3 programs share an SM (the served code set's gate/up holds 254 uncapped at 16 rows, 2 an SM)
    "Gluon, wgmma, at 168 registers": {"wgmma": True, "bn": 64, "staged": False, "maxnreg": 168},
    "Gluon, wgmma, BM 32, at 168 registers": {"wgmma": True, "bn": 64, "staged": False, "bm": 32, "maxnreg": 168},
    # (the codes' K tiles 2 or 3 ahead through a ring of shared memory, Tiles.ring, thirty-fourth session: stream-K at
    # 1 and 8 tokens and the picked grid at 16 and 64, 1.03 to 1.25x the picked layout's time on the H100; removed)
    # and forced at every token count (at 1 token the picked layout is the CUDA-core one: Mixtral's 2 experts
    # of 14336 x 4096 then spread over the SMs by K tiles)
    "Gluon, BM 8, stream-K": {"fma": False, "gluon": True, "maxnreg": None, "bm": 8, "stream_k": True},
}
DECODE_TOKENS = 64  # variants that only matter at decode are timed up to this many tokens
# prefill layouts of the weight-only layers, timed above DECODE_TOKENS beside the picked (tuned) one: the
# tile dequantized row-major, as before Tiles.kmajor became the default: stored to shared memory 2 bytes at
# a time (128 STS.U16 a thread per K tile for w4 gate/up) where K-major takes 16 STS.128, and the mixed
# code set's gate/up spills more (sm_90 SASS, tests/test_prefill_sass.py)
# Then the weights dequantized in the GEMM's tiles and dequantized first (mxkernels/dequant.py), each forced
# whatever the rows per expert (the picked layout takes the second from moe.DEQUANT_ROWS up)
PREFILL_VARIANTS = {"row-major dequantized tile": {"kmajor": False, "dequant": False},
                    "dequantized in the GEMM": {"dequant": False}, "dequantized first": {"dequant": True},
                    # (twenty-fourth session) the programs taken 8 blocks at a time over every N tile (Tiles.group_m):
                    # the launch's own order reads each block's rows once per N tile, after every other block's
                    # (the down GEMM's input at 4096 tokens, 92 MB in bf16, is past what L2 keeps). The default
                    # since the twenty-fifth session (moe.PREFILL_GROUP_M): the launch's order beside it
                    "launch order": {"group_m": 0},
                    "down GEMM 8 blocks at a time": {"group_m": 0, "down_tiles": {"group_m": 8}}}
# the fp8 layer's prefill variants (twenty-fourth session): the launch order, 16 blocks at a time and the down GEMM
# alone 8 at a time. (The down GEMM's per-token maxima taken by gate/up's launches, its rows quantized as loaded, took
# 1.27 to 1.31x the layer's time on the H200 in the twenty-fifth session and were removed.)
FP8_PREFILL_VARIANTS = {"launch order": {"group_m": 0}, "16 blocks at a time": {"group_m": 16},
                        "down GEMM 8 blocks at a time": {"group_m": 0, "down_tiles": {"group_m": 8}}}


@dataclass(eq=False)  # one job is one job, whatever its fields
class Job:
    """One variant to time at one token count: its forward and what its bandwidth is counted from."""

    variant: str
    fn: object
    w_bytes: float
    bits: float | None
    eager: bool = False  # also timed without a CUDA graph (host overhead included)
    graph: bool = True  # False: eager only (a loop with host syncs cannot be captured)


def time_jobs(jobs: list[Job], rounds: int, record) -> None:
    """Time every job ``rounds`` times, the order rotated by one each round, and record each job's
    median. Timed once each in a fixed order, a layout measured first was up to 8% slower than the
    same layout forced right after it (H200, thirteenth session). The eager timings (host overhead
    included) come after all graph timings: in the seventeenth session every job timed eagerly right
    after its graph replays (the picked layouts) was 3 to 8% slower than a forced copy of it that was
    not. A job that fails is reported and dropped: one experimental layout or baseline must not lose
    the run (one whose eager timing fails keeps its graph time)."""
    times: dict[str, list[float]] = {j.variant: [] for j in jobs}
    eager: dict[str, list[float]] = {j.variant: [] for j in jobs}
    live = list(jobs)

    def rotated(js: list[Job], r: int) -> list[Job]:
        return js[r % len(js):] + js[: r % len(js)] if js else []

    for r in range(rounds):
        for j in rotated(live, r):
            try:
                times[j.variant].append(bench_graph(j.fn) if j.graph else bench(j.fn))
            except Exception as err:  # noqa: BLE001 - see above
                print(f"{j.variant} failed: {str(err)[:300]}", file=sys.stderr)
                live.remove(j)
    for r in range(rounds):
        for j in rotated([j for j in live if j.eager and j.graph], r):
            try:
                eager[j.variant].append(bench(j.fn))
            except Exception as err:  # noqa: BLE001 - see above
                print(f"{j.variant} failed eagerly: {str(err)[:300]}", file=sys.stderr)

    def median(xs: list[float]) -> float | None:
        return sorted(xs)[(len(xs) - 1) // 2] if xs else None

    for j in jobs:
        if j in live and times[j.variant]:
            record(j.variant, median(times[j.variant]), j.w_bytes, j.bits, median(eager[j.variant]))


def run_model(name: str, tokens, dev, gen, sgl, results: list, shapes: dict | None = None, marlin=None,
              plans: dict | None = None, layouts: dict | None = None, ours_only: bool = False, rounds: int = 1) -> None:
    """``plans``: more tiered plans (label -> tiers), timed with ``layouts`` (default DECODE_VARIANTS)
    and the Triton MMA layout; ``ours_only`` leaves out the baselines and the prefill layout; ``rounds``:
    see time_jobs."""
    layouts = DECODE_VARIANTS if layouts is None else layouts
    m = (shapes or MODEL_SHAPES)[name]
    h, i, e, s, k = m["hidden"], m["inter"], m["experts"], m["shared"], m["top_k"]
    ne = e + s
    gu, dn = random_experts(m, dev, gen)

    def arenas(schemes: list[str]):
        return layer_arenas(gu, dn, schemes)

    variants = {f"ours {sc}": arenas([sc] * ne) for sc in ("bf16", "w4a16g128", "w8a8fp8")}
    sgl_w = {}
    if sgl is not None:
        sgl_w["bf16"] = (gu.contiguous(), dn.contiguous())
        sgl_w["int4"] = (
            torch.randint(0, 255, (ne, 2 * i, h // 2), dtype=torch.uint8, device=dev),
            torch.randint(0, 255, (ne, h, i // 2), dtype=torch.uint8, device=dev),
            torch.rand(ne, 2 * i, h // 128, device=dev, dtype=torch.bfloat16) * 0.01,
            torch.rand(ne, h, i // 128, device=dev, dtype=torch.bfloat16) * 0.01,
        )
        sgl_w["fp8"] = (
            gu.to(torch.float8_e4m3fn),
            dn.to(torch.float8_e4m3fn),
            torch.full((ne, 2 * i, 1), 0.01, device=dev),
            torch.full((ne, h, 1), 0.01, device=dev),
        )
    mw = marlin_weights(ne, h, i, dev) if marlin is not None else None
    for skewed in (True, False):
        # The mixed plan follows this routing's expert popularity (what the planner would do).
        variants["ours mixed"] = arenas(mixed_plan(e, ne, k, skewed, dev))
        for label, tiers in (plans or {}).items():
            variants[f"ours {label}"] = arenas(tiered_plan(e, ne, k, skewed, dev, tiers))
        for t in tokens:
            cell = cell_generator(name, skewed, t, dev)
            x = torch.randn(t, h, device=dev, dtype=torch.bfloat16, generator=cell)
            ids, w = routing(t, e, k, skewed, cell, dev)
            ide, we = extend_routing(ids, w, ne, e)
            rows = ide.numel()
            active = torch.unique(ide).numel()
            flops = 6.0 * rows * i * h
            act_bytes = t * h * 2 + rows * i * 4 + rows * h * 8

            def record(variant: str, sec: float, w_bytes: float, bits: float | None, eager: float | None = None):
                results.append(
                    {
                        "model": name,
                        "routing": "skewed" if skewed else "uniform",
                        "tokens": t,
                        "variant": variant,
                        "seconds": sec,
                        "eager_seconds": eager,
                        "avg_bits": bits,
                        "GBps": (w_bytes * active / ne + act_bytes) / sec / 1e9,
                        "TFLOPs": flops / sec / 1e12,
                    }
                )

            jobs: list[Job] = []

            def job(variant: str, fn, w_bytes: float, bits: float | None, eager: bool = False, graph: bool = True):
                jobs.append(Job(variant, fn, w_bytes, bits, eager, graph))

            for vname, (ag, ad, bits) in variants.items():
                fn = lambda ag=ag, ad=ad: mx_moe_forward(x, ids, w, ag, ad, e)  # noqa: E731
                job(vname, fn, ag.nbytes() + ad.nbytes(), bits, eager=True)
                if t <= DECODE_TOKENS and vname != "ours bf16" and not ours_only:
                    fn = lambda ag=ag, ad=ad: mx_moe_forward(x, ids, w, ag, ad, e, **PREFILL_LAYOUT)  # noqa: E731
                    job(vname + " (prefill layout)", fn, ag.nbytes() + ad.nbytes(), bits)
                gluon = {lb: ov for lb, ov in layouts.items() if "Gluon" in lb or "stream-K" in lb}
                # a plan's layer also as one launch per group of codes (moe.code_groups) in the picked layout,
                # and in the layouts asked for (--layouts)
                extra = {"MMA": DECODE_VARIANTS["MMA"], "grouped": {"dispatch": "grouped"}} | layouts \
                    if vname.removeprefix("ours ") in (plans or {}) else {}  # fmt: skip
                timed = {"ours mixed": layouts, "ours w4a16g128": gluon}.get(vname, extra)
                if t > DECODE_TOKENS:  # prefill: the weight-only and fp8 layers' prefill variants
                    timed = {"ours mixed": PREFILL_VARIANTS, "ours w4a16g128": PREFILL_VARIANTS,
                             "ours w8a8fp8": FP8_PREFILL_VARIANTS}.get(vname, {}) if not ours_only else {}  # fmt: skip
                if timed:
                    for label, ov in timed.items():
                        if ov == "double":
                            split = pick_tiles(t * (k + s), expected_active(e, s, t * k), 128, i, h, ag.codes_mask,
                                               multiprocessors(dev), fma=False).split  # fmt: skip
                            ov = {"fma": False, "gluon": False, "split": 2 * split}
                        fn = lambda ag=ag, ad=ad, ov=ov: mx_moe_forward(x, ids, w, ag, ad, e, **ov)  # noqa: E731
                        if any(ov.get(m) for m in MODES):  # not tile fields: the launches' modes, captured and run
                            tiles = {f: v for f, v in ov.items() if f not in MODES}
                            fn = in_modes(lambda ag=ag, ad=ad, tiles=tiles: mx_moe_forward(
                                x, ids, w, ag, ad, e, **tiles, **early_start(x, ids.shape[1], ag, ad, e, tiles, ov)),
                                ov)  # fmt: skip
                        job(f"{vname} ({label})", fn, ag.nbytes() + ad.nbytes(), bits)
            if mw is not None:
                logits = torch.zeros(t, ne, device=dev)  # read for its shape only
                ids32 = ide.to(torch.int32)
                fn = lambda: marlin(x, *mw[:4], logits, we, ids32, num_bits=4, **mw[4])  # noqa: E731
                job("marlin w4a16g128", fn, marlin_bytes(mw), 4 + 20 / 128, eager=True)
            if not ours_only and (t <= 1024 or e <= 16):  # the eager loop at 8192 x 128 experts adds minutes

                def torch_loop():
                    out = torch.zeros(t, h, device=dev, dtype=torch.float32)
                    for ex in torch.unique(ide).tolist():
                        tok, pos = torch.where(ide == ex)
                        g, u = (x[tok] @ gu[ex].T).chunk(2, -1)
                        out.index_add_(
                            0, tok, ((torch.nn.functional.silu(g) * u) @ dn[ex].T).float() * we[tok, pos, None]
                        )
                    return out

                # data-dependent loop (host syncs): no graph; this is what eager transformers pays
                job("torch bf16", torch_loop, (gu.numel() + dn.numel()) * 2, 16.0, graph=False)
            if sgl is not None and not ours_only:
                ids32 = ide.to(torch.int32)
                calls = {
                    "sglang bf16": (lambda: sgl(x, *sgl_w["bf16"], we, ids32), 16.0),
                    "sglang w4a16": (
                        lambda: sgl(
                            x,
                            sgl_w["int4"][0],
                            sgl_w["int4"][1],
                            we,
                            ids32,
                            use_int4_w4a16=True,
                            w1_scale=sgl_w["int4"][2],
                            w2_scale=sgl_w["int4"][3],
                            block_shape=[0, 128],
                        ),
                        4.125,
                    ),
                    "sglang fp8 w8a8": (
                        lambda: sgl(
                            x,
                            sgl_w["fp8"][0],
                            sgl_w["fp8"][1],
                            we,
                            ids32,
                            use_fp8_w8a8=True,
                            per_channel_quant=True,
                            w1_scale=sgl_w["fp8"][2],
                            w2_scale=sgl_w["fp8"][3],
                        ),
                        8.0,
                    ),
                }
                for vname, (fn, bits) in calls.items():
                    job(vname, fn, ne * 3 * i * h * bits / 8, bits, eager=True)
            time_jobs(jobs, rounds, record)
            print(
                f"{name} {'skewed' if skewed else 'uniform'} T={t}: "
                + ", ".join(
                    f"{r['variant']} {r['seconds'] * 1e6:.0f}us"
                    for r in results
                    if r["model"] == name and r["tokens"] == t and r["routing"] == ("skewed" if skewed else "uniform")
                ),
                flush=True,
            )


def _ratio(a: float, b: float, unit: str = "") -> str:
    """a / b, or "-" where either was not timed in this run"""
    return "-" if math.isnan(a) or math.isnan(b) else f"{a / b:.2f}{unit}"


def markdown(results: list, meta: dict) -> str:
    lines = [
        f"Device: {meta['device']}. Ceilings measured in the same run: copy {meta['ceilings']['copy_GBps']:.0f} "
        f"GB/s, bf16 matmul {meta['ceilings']['bf16_TFLOPs']:.0f} TFLOP/s, fp8 matmul "
        f"{meta['ceilings'].get('fp8_TFLOPs', float('nan')):.0f} TFLOP/s.",
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    cols = [
        "torch bf16",
        "sglang bf16",
        "sglang w4a16",
        "sglang fp8 w8a8",
        "marlin w4a16g128",
        "ours bf16",
        "ours w4a16g128",
        "ours w8a8fp8",
        "ours mixed",
        "ours mixed (prefill layout)",
    ]
    for model in dict.fromkeys(r["model"] for r in results):
        for rt in ("skewed", "uniform"):
            rows = [r for r in results if r["model"] == model and r["routing"] == rt]
            if not rows:
                continue
            mixed_bits = next((r["avg_bits"] for r in rows if r["variant"] == "ours mixed"), float("nan"))
            lines += [
                f"### {model}, {rt} routing (time in us; mixed = {mixed_bits:.2f} avg bits)",
                "",
                "| tokens | " + " | ".join(cols) + " | mixed speedup vs marlin | mixed vs best bf16 "
                "| fp8 ours/sglang | mixed GB/s | marlin GB/s |",
                "|---:|" + "---:|" * (len(cols) + 5),
            ]
            for t in sorted({r["tokens"] for r in rows}):
                by = {r["variant"]: r for r in rows if r["tokens"] == t}
                cell = [f"{by[c]['seconds'] * 1e6:.0f}" if c in by else "-" for c in cols]
                sec = {c: by.get(c, {}).get("seconds", math.nan) for c in cols}
                bf = min((sec[c] for c in ("torch bf16", "sglang bf16") if c in by), default=math.nan)
                mx = sec["ours mixed"]
                lines.append(
                    f"| {t} | " + " | ".join(cell)
                    + f" | {_ratio(sec['marlin w4a16g128'], mx, 'x')} | {_ratio(bf, mx, 'x')}"
                    f" | {_ratio(sec['ours w8a8fp8'], sec['sglang fp8 w8a8'])}"
                    f" | {by.get('ours mixed', {}).get('GBps', math.nan):.0f}"
                    f" | {by.get('marlin w4a16g128', {}).get('GBps', math.nan):.0f} |"
                )
            lines.append("")
            # every layer timed in more than one layout: the picked one first, then each forced layout
            bases = dict.fromkeys(r["variant"].split(" (")[0] for r in rows if r["variant"].endswith(")"))
            for base in bases:
                forced = dict.fromkeys(r["variant"] for r in rows if r["variant"].startswith(base + " ("))
                labels = [base, *forced]
                bits = next((r["avg_bits"] for r in rows if r["variant"] == base), math.nan)
                lines += [
                    f"Layouts of {base} ({model}, {rt}, {bits:.2f} avg bits; us):",
                    "",
                    "| tokens | " + " | ".join(v.removeprefix(base).strip(" ()") or "picked" for v in labels) + " |",
                    "|---:|" + "---:|" * len(labels),
                ]
                for t in sorted({r["tokens"] for r in rows if r["variant"] in forced}):
                    by = {r["variant"]: r["seconds"] for r in rows if r["tokens"] == t}
                    lines.append(f"| {t} | " + " | ".join(f"{by[v] * 1e6:.0f}" if v in by else "-" for v in labels)
                                 + " |")  # fmt: skip
                lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--models", nargs="+", default=list(MODEL_SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=list(TOKEN_COUNTS))
    ap.add_argument("--shape", action="append", type=parse_shape, default=[],
                    help="another expert shape, NAME:hidden=H,inter=I,experts=E,top_k=K[,shared=S]; repeatable "
                         "(with --shape only, the listed models are skipped unless named in --models)")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="only combine the moe_layer.json of several invocations (one machine) into --out")
    ap.add_argument("--no-marlin", action="store_true", help="leave SGLang's Marlin MoE out (its JIT build)")
    ap.add_argument("--plan", action="append", type=parse_plan, default=[],
                    help="another layer to time, LABEL=SCHEME:WEIGHT,... by popularity tiers, most popular first "
                         "(e.g. w3=w3a16g128:1); timed in the MMA and Gluon layouts and as one launch per group "
                         "of codes; repeatable")
    ap.add_argument("--layouts", default="", help="regex: time only the decode layouts whose label matches")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every variant this many times, the order rotated each round, and keep the medians")
    ap.add_argument("--ours-only", action="store_true",
                    help="leave out the torch and SGLang fused_moe baselines and the prefill layout (Marlin "
                         "stays unless --no-marlin): for comparing our own layouts")
    ap.add_argument("--warm-marlin", action="store_true",
                    help="only build SGLang's Marlin MoE (its JIT takes minutes on first use) and exit")
    a = ap.parse_args()
    if a.merge:
        runs = [json.load(open(p)) for p in a.merge]
        meta = dict(runs[0]["meta"], command=" ; ".join(r["meta"]["command"] for r in runs),
                    ceilings_per_run=[r["meta"]["ceilings"] for r in runs])  # fmt: skip
        results = [x for r in runs for x in r["results"]]
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "moe_layer.json"), "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        with open(os.path.join(a.out, "moe_layer.md"), "w") as f:
            f.write(markdown(results, meta))
        return
    if a.warm_marlin:
        t0 = time.time()
        sglang_impl()
        marlin, how = marlin_impl()
        dev = torch.device("cuda")
        ids, w = routing(4, 8, 2, False, torch.Generator(device=dev).manual_seed(0), dev)
        mw = marlin_weights(8, 256, 256, dev)
        x = torch.randn(4, 256, device=dev, dtype=torch.bfloat16)
        marlin(x, *mw[:4], torch.zeros(4, 8, device=dev), w, ids.to(torch.int32), num_bits=4, **mw[4])
        torch.cuda.synchronize()
        print(f"marlin built and ran in {time.time() - t0:.0f} s ({how})")
        return
    shapes = dict(MODEL_SHAPES) | dict(a.shape)
    if a.shape and "--models" not in sys.argv:
        a.models = []
    a.models += [n for n, _ in a.shape]
    dev = torch.device("cuda")
    os.makedirs(a.out, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        # the kernel settings in the environment too (MXSERVE_TILED_CODES=0 ...): not the shared data's path, no key
        "command": " ".join([*(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MXSERVE_")
                               and k != "MXSERVE_SHARED" and not k.endswith("_KEY")),
                             "python3 benchmarks/moe_layer.py", *sys.argv[1:]]),  # fmt: skip
        "ceilings": ceilings(dev),
    }
    import triton

    meta["triton"] = triton.__version__
    sgl, sgl_err = sglang_impl()
    meta["sglang"] = sgl_err or __import__("sglang").__version__
    marlin, meta["marlin"] = marlin_impl() if sgl is not None and not a.no_marlin else (None, "left out")
    print(json.dumps(meta), flush=True)
    results: list = []
    gen = torch.Generator(device=dev).manual_seed(0)
    t0 = time.time()
    layouts = {lb: ov for lb, ov in DECODE_VARIANTS.items() if re.search(a.layouts, lb)}
    for model in a.models:
        run_model(model, a.tokens, dev, gen, sgl, results, shapes, marlin, dict(a.plan), layouts, a.ours_only,
                  a.rounds)
        torch.cuda.empty_cache()
        with open(os.path.join(a.out, "moe_layer.json"), "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    meta["seconds"] = time.time() - t0
    with open(os.path.join(a.out, "moe_layer.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    md = markdown(results, meta)
    with open(os.path.join(a.out, "moe_layer.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
