"""What reading fewer expert bytes a decoded token costs in accuracy, at equal average bits (CPU).

At one request a decode step reads each shared expert whole and each routed expert it picks, so its GEMM
time follows those bytes, not the average bits: the default 3.25-bit plans give the always-read shared
experts 4 and 8 bits and read more a token than a uniform 4-bit model (benchmarks/README.md, thirty-ninth
session). This makes plans whose latency term is those bytes alone (the roofline without its per-expert
overhead, which on small shapes outweighs every byte and leaves r almost without effect), for 1-token forwards, at
each r and granularity asked; quantizes each with `mxserve quantize` and measures it with `mxserve eval` on the
held-out text, as the accuracy table does (benchmarks README, fortieth session).

    .venv/bin/python benchmarks/decode_bytes_accuracy.py --profile runs/refmoe-gptq-had.json \
        --model ../shared/models/refmoe-25m --runs layer:1 layer:0.25 layer:0.2 model:0.992 model:0.357 --out OUT

The profile comes from `mxserve calibrate --method gptq-had` on both `*-calib.txt` files (the accuracy table's).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mxserve.costmodel import RooflineCostModel  # noqa: E402
from mxserve.planner import solve_plan  # noqa: E402
from mxserve.profile import CalibrationProfile  # noqa: E402

DEV = [os.path.join(ROOT, "..", "shared", "data", f) for f in ("shakespeare-dev.txt", "python-dev.txt")]


def mxserve(*args: str) -> str:
    cmd = [sys.executable, "-m", "mxserve.cli", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return proc.stdout


def perplexities(out: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"(\S+)-dev\.txt\tppl ([0-9.]+)", out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, help="calibration profile (mxserve calibrate)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--budget", type=float, default=3.25)
    ap.add_argument("--points", type=int, default=24, help="frontier points (planner.solve_plan)")
    ap.add_argument("--runs", nargs="+", default=["layer:1", "layer:0.25", "model:0.357"],
                    help="GRANULARITY:R for each plan")  # fmt: skip
    ap.add_argument("--out", required=True, help="directory for the plans and results")
    ap.add_argument("--work", default="/tmp/decode-bytes-accuracy", help="directory for the checkpoints")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.work, exist_ok=True)
    prof = CalibrationProfile.load(a.profile)
    cost = RooflineCostModel(overhead=0.0)  # time in proportion to the bytes read, nothing else
    rows = []
    for run in a.runs:
        granularity, r = run.split(":")
        res = solve_plan(prof, a.budget, r=float(r), tokens=1, granularity=granularity, cost=cost, points=a.points)
        name = f"{granularity}-r{r}"
        plan = os.path.join(a.out, f"plan-{name}.json")
        ckpt = os.path.join(a.work, f"ckpt-{name}")
        res.plan.save(plan)
        mxserve("quantize", "--model", a.model, "--plan", plan, "--quiet", "--out", ckpt)
        ppl = perplexities(mxserve("eval", "--model", ckpt, "--data", *DEV, "--quiet"))
        s = res.plan.summary
        rows.append({"plan": name, "granularity": granularity, "r": float(r), "avg_bits": s["avg_bits"], "L": s["L"],
                     "decode_mb_per_token": s["decode_mb_per_token"], "decode_mb_shared": s["decode_mb_shared"],
                     "decode_mb_uniform_w4a16g128": s["decode_mb_uniform_w4a16g128"], "schemes": s["schemes"],
                     "ppl": ppl})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    command = "python3 benchmarks/decode_bytes_accuracy.py " + " ".join(sys.argv[1:])
    with open(os.path.join(a.out, "decode_bytes_accuracy.json"), "w") as f:
        json.dump({"command": command, "model": a.model, "profile": a.profile, "budget": a.budget,
                   "eval": "mxserve eval: ctx 512, stride 512, first 32768 tokens of each dev file",
                   "rows": rows}, f, indent=1)  # fmt: skip
    uniform = rows[0]["decode_mb_uniform_w4a16g128"] if rows else 0.0
    lines = [f"Command: `{command}`. Plans at {a.budget} bits whose latency term is the bytes a decoded token reads "
             f"(1-token forwards); a uniform w4a16g128 model reads {uniform:.4g} MB.", "",
             "| plan | avg bits | MB a decoded token reads (shared experts') | L | Shakespeare ppl | Python ppl | "
             "schemes |", "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for x in rows:
        sch = ", ".join(f"{k} {v:.0%}" for k, v in x["schemes"].items())
        mb = f"{x['decode_mb_per_token']:.4g} ({x['decode_mb_shared']:.4g})"
        lines.append(f"| {x['plan']} | {x['avg_bits']:.3f} | {mb} | {x['L']:.4g} | "
                     f"{x['ppl'].get('shakespeare', float('nan')):.2f} | {x['ppl'].get('python', float('nan')):.2f} | "
                     f"{sch} |")  # fmt: skip
    with open(os.path.join(a.out, "decode_bytes_accuracy.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
