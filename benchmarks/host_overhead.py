"""The host's share of an eager MoE forward: mx_moe_forward's Python with every kernel launch stubbed.

SGLang replays CUDA graphs at decode, so there the host's work is paid once, at capture; an eager pass
(prefill, and every forward of a server without graphs) pays it per layer, and a prefill holds back the
whole decode batch beside it. This times the Python that builds a forward's launches (tiles, buffers, the
launch arguments) with Triton's launch path cut off before its driver call (each launch counted), so it
runs the same on a machine without a GPU; on a GPU host (``--device cuda``) the buffers are the GPU's.
What Triton's own launcher then costs a launch is not in it.

    python3 benchmarks/host_overhead.py --model qwen1.5-moe-a2.7b --small --tokens 1 8 20 64 --out OUT
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import moe_layer  # noqa: E402

from mxkernels import moe  # noqa: E402
from mxkernels.shapes import MODEL_SHAPES  # noqa: E402


@contextlib.contextmanager
def stubbed_launches(counts: dict[str, int]) -> Iterator[None]:
    """Within: every Triton (and Gluon) launch is counted by kernel name in ``counts`` and runs nothing."""
    from triton.runtime.jit import JITFunction

    run = JITFunction.run

    def count(self, *args, **kwargs):
        if kwargs.get("warmup"):  # a compile asked for (stream-K reads its kernel's registers): compiled, not launched
            return run(self, *args, **kwargs)
        counts[self.__name__] = counts.get(self.__name__, 0) + 1

    JITFunction.run = count
    try:
        yield
    finally:
        JITFunction.run = run


def median_us(fn, reps: int) -> float:
    """The median time of ``fn`` in us over ``reps`` calls, after 3 untimed."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return round(statistics.median(times), 1)


def measure(shape: dict[str, int], tokens: list[int], reps: int, dev: torch.device) -> list[dict]:
    """Per token count: the median host time of a forward (us) and its launches, on the mixed plan's layer."""
    gen = torch.Generator(device=dev).manual_seed(0)
    gu, dn = moe_layer.random_experts(shape, dev, gen)
    e, ne, k = shape["experts"], shape["experts"] + shape["shared"], shape["top_k"]
    a_gu, a_dn, bits = moe_layer.layer_arenas(gu, dn, moe_layer.mixed_plan(e, ne, k, True, dev))
    del gu, dn
    rows = []
    for t in tokens:
        x = torch.randn(t, shape["hidden"], generator=gen, device=dev).to(torch.bfloat16)
        ids, w = moe_layer.routing(t, e, k, True, gen, dev)
        counts: dict[str, int] = {}
        with stubbed_launches(counts):
            forward = lambda: moe.mx_moe_forward(x, ids, w, a_gu, a_dn, e)  # noqa: E731
            forward()
            launches = dict(counts)
            # the launches' tiles picked afresh in every forward (as before the forty-third session), then
            # taken from the arena's picks (moe._pick_cached), each the median of ``reps`` forwards
            fresh = median_us(lambda: (a_gu.picks.clear(), forward()), reps)
            kept = median_us(forward, reps)
        rows.append({"tokens": t, "host_us": kept, "host_us_fresh_picks": fresh,
                     "launches": sum(launches.values()), "kernels": launches})  # fmt: skip
    return [{"bits": round(bits, 2), **r} for r in rows]


def markdown(res: dict) -> str:
    lines = [f"# Host time of an eager MoE forward: {res['model']}{' (small)' if res['small'] else ''}", "",
             f"Device: {res['device']} (host: {res['host']}). Command: `{res['command']}`", "",
             "mx_moe_forward's Python with every kernel launch stubbed (counted, not run); the median of "
             f"{res['reps']} forwards. Triton's own launcher's time per launch is not in it. Picks kept: the "
             "launches' tiles taken from the arena's picks for that token count (the default since the "
             "forty-third session); picked afresh: as before, each forward picking them again.", "",
             "| tokens | host us a forward (picks kept) | picked afresh | launches | kernels |",
             "|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in res["rows"]:
        kernels = ", ".join(f"{n} x{c}" for n, c in sorted(r["kernels"].items()))
        lines.append(f"| {r['tokens']} | {r['host_us']} | {r['host_us_fresh_picks']} | {r['launches']} | {kernels} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen1.5-moe-a2.7b", choices=sorted(MODEL_SHAPES))
    ap.add_argument("--small", action="store_true",
                    help="hidden and intermediate 256 (the model's expert counts and top-k kept): fast arenas on a "
                         "CPU; the launches follow the rows per expert, not the widths")  # fmt: skip
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 20, 64])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True, help="folder for host_overhead.json and .md")
    a = ap.parse_args()
    if any(t < 1 for t in a.tokens) or a.reps < 1:
        ap.error("--tokens and --reps take positive numbers")
    dev = torch.device(a.device)
    if dev.type == "cpu":  # the Gluon decode path as on a GPU: its launches are stubbed, so nothing needs one
        moe._runs_gluon = lambda d: True
    shape = dict(MODEL_SHAPES[a.model])
    if a.small:
        shape.update(hidden=256, inter=256)
    name = str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev)
    res = {"model": a.model, "small": a.small, "device": name,
           "host": platform.processor() or platform.machine(), "reps": a.reps,
           "command": "python3 benchmarks/host_overhead.py " + " ".join(sys.argv[1:]),
           "rows": measure(shape, a.tokens, a.reps, dev)}  # fmt: skip
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "host_overhead.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out, "host_overhead.md"), "w") as f:
        f.write(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
