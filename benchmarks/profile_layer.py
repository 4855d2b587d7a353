"""Where one MoE layer's time goes on the GPU: a kernel-by-kernel table, or a loop for ncu.

Runs moe_layer.py's layer (same expert shapes, routing and mixed plan) for one
token count and prints each CUDA kernel's device time per forward (torch
profiler), so launch-bound small kernels and the GEMMs show apart. With
``--loop`` it only runs the forward (under ``ncu``, to read what the GEMM
kernels wait on):

    python3 benchmarks/profile_layer.py --model qwen1.5-moe-a2.7b --tokens 16
    ncu --kernel-name regex:mx_moe --launch-skip 10 --launch-count 2 --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section WarpStateStats \\
        python3 benchmarks/profile_layer.py --model qwen1.5-moe-a2.7b --tokens 16 --loop

``--scheme marlin`` runs SGLang's Marlin MoE (w4a16g128, as moe_layer.py's baseline) on the same shape and routing
instead of ours, so ncu reads both kernels the same way (the kernel name ``marlin_moe``, demangled):

    ncu --kernel-name-base demangled --kernel-name regex:marlin_moe --launch-skip 8 --launch-count 4 \
        --section WarpStateStats python3 benchmarks/profile_layer.py --model mixtral-8x7b --uniform \
        --scheme marlin --loop

``--set FIELD=VALUE`` overrides a field of the launches' tiles (mxkernels.moe.Tiles, e.g. ``group_m=8``), and
``--launches`` lists each launch of a forward in its order, so that a kernel launched twice (gate/up, then
down) shows as two rows:

    python3 benchmarks/profile_layer.py --model deepseek-v2-lite --tokens 4096 --scheme w8a8fp8 --uniform \
        --launches --set group_m=8
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from moe_layer import (  # noqa: E402
    PREFILL_LAYOUT,
    layer_arenas,
    marlin_impl,
    marlin_weights,
    mixed_plan,
    parse_plan,
    random_experts,
    routing,
    tiered_plan,
)

from mxkernels.align import extend_routing  # noqa: E402
from mxkernels.moe import mx_moe_forward, tile_overrides  # noqa: E402
from mxkernels.moe import tile_setting as moe_tile_setting  # noqa: E402
from mxkernels.shapes import MODEL_SHAPES  # noqa: E402


def tile_setting(text: str) -> tuple[str, int | bool | None]:
    """--set's ``FIELD=VALUE`` (mxkernels.moe.tile_setting), refused as an argparse error."""
    try:
        return moe_tile_setting(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--set {e}") from None


def check_args(a: argparse.Namespace) -> None:
    """Refuse what the Marlin baseline has no way to take: it is one kernel with one layout and scheme."""
    if a.scheme == "marlin" and (a.plan or a.set or a.layout != "auto"):
        raise SystemExit("profile_layer.py: --scheme marlin (SGLang's Marlin MoE) takes no --plan, --set or --layout")


def per_launch(events: list[tuple[float, str, float]], reps: int) -> list[tuple[str, float]]:
    """(name, device us) of each launch of one forward, in launch order, averaged over ``reps`` forwards from
    ``events`` (start, name, device us) of all of them: a forward launches the same kernels in the same order."""
    events = sorted(events)
    per = len(events) // reps
    if per * reps != len(events):
        raise ValueError(f"{len(events)} kernel events over {reps} forwards: not the same launches each time")
    return [(events[i][1], sum(events[r * per + i][2] for r in range(reps)) / reps) for i in range(per)]


def marlin_forward(m: dict, tokens: int, skewed: bool, gen, dev) -> tuple:
    """SGLang's Marlin MoE over a layer of shape ``m`` (shared experts as routed slots, as moe_layer.py times it):
    the forward and its bits a weight."""
    fused_marlin_moe, how = marlin_impl()
    if fused_marlin_moe is None:
        raise SystemExit(f"profile_layer.py: SGLang's Marlin MoE did not import ({how})")
    h, e, ne, k = m["hidden"], m["experts"], m["experts"] + m["shared"], m["top_k"]
    random_experts(m, dev, gen)  # the generator's draws as ours take them: the same tokens and routing
    mw = marlin_weights(ne, h, m["inter"], dev)
    x = torch.randn(tokens, h, device=dev, dtype=torch.bfloat16, generator=gen)
    ids, w = routing(tokens, e, k, skewed, gen, dev)
    ide, we = extend_routing(ids, w, ne, e)
    logits = torch.zeros(tokens, ne, device=dev)  # read for its shape only
    ids32 = ide.to(torch.int32)
    return (lambda: fused_marlin_moe(x, *mw[:4], logits, we, ids32, num_bits=4, **mw[4])), 4 + 20 / 128


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen1.5-moe-a2.7b", choices=list(MODEL_SHAPES))
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--scheme", default="mixed", help="mixed, one scheme for every expert, or marlin (SGLang's "
                    "Marlin MoE, w4a16g128)")
    ap.add_argument("--plan", type=parse_plan, help="LABEL=SCHEME:WEIGHT,... popularity tiers, as moe_layer.py's "
                    "--plan (e.g. the served plan's: served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7)")
    ap.add_argument("--layout", choices=("auto", "prefill"), default="auto")
    ap.add_argument("--uniform", action="store_true", help="uniform routing (default: skewed)")
    ap.add_argument("--loop", action="store_true", help="only run the forward 30 times (for ncu)")
    ap.add_argument("--set", type=tile_setting, action="append", default=[], metavar="FIELD=VALUE",
                    help="a field of the launches' tiles (mxkernels.moe.Tiles), e.g. group_m=8; repeatable")
    ap.add_argument("--launches", action="store_true", help="each launch of a forward in order, not per kernel")
    a = ap.parse_args()
    check_args(a)
    m = MODEL_SHAPES[a.model]
    h, e, s, k = m["hidden"], m["experts"], m["shared"], m["top_k"]
    ne = e + s
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    if a.scheme == "marlin":
        fwd, bits = marlin_forward(m, a.tokens, not a.uniform, gen, dev)
    else:
        gu, dn = random_experts(m, dev, gen)
        if a.plan:
            plan = tiered_plan(e, ne, k, not a.uniform, dev, a.plan[1])
        else:
            plan = mixed_plan(e, ne, k, not a.uniform, dev) if a.scheme == "mixed" else [a.scheme] * ne
        ag, ad, bits = layer_arenas(gu, dn, plan)
        x = torch.randn(a.tokens, h, device=dev, dtype=torch.bfloat16, generator=gen)
        ids, w = routing(a.tokens, e, k, not a.uniform, gen, dev)
        override = {**(PREFILL_LAYOUT if a.layout == "prefill" else {}), **tile_overrides(a.set)}

        def fwd():
            return mx_moe_forward(x, ids, w, ag, ad, e, **override)

    for _ in range(3):
        fwd()
    torch.cuda.synchronize()
    if a.loop:
        for _ in range(30):
            fwd()
        torch.cuda.synchronize()
        return
    reps = 20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fwd()
        torch.cuda.synchronize()
    events = [(ev.time_range.start, ev.name[:70], ev.device_time_total) for ev in prof.events()
              if ev.device_type == torch.autograd.DeviceType.CUDA]  # fmt: skip
    rows = {}
    for _, name, t in events:
        n, total = rows.get(name, (0, 0.0))
        rows[name] = (n + 1, total + t)
    total = sum(t for _, t in rows.values()) / reps
    label = a.plan[0] if a.plan else a.scheme
    sets = "".join(f" {f}={v}" for f, v in a.set)
    env = "".join(f" {k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MXSERVE_"))
    print(f"{a.model} T={a.tokens} {label} ({bits:.2f} bits) layout={a.layout}{sets}{env}: {total:.1f} us of kernels "
          f"per forward, {sum(n for n, _ in rows.values()) / reps:.0f} kernels")
    if a.launches:
        for i, (name, t) in enumerate(per_launch(events, reps)):
            print(f"  {t:8.1f} us  #{i + 1:<3d} {name}")
        return
    for name, (n, t) in sorted(rows.items(), key=lambda r: -r[1][1]):
        print(f"  {t / reps:8.1f} us  x{n / reps:4.1f}  {name}")


if __name__ == "__main__":
    main()
