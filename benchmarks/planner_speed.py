"""Re-solve time of the whole-model plan at Qwen1.5-MoE-A2.7B's size: greedy knapsack vs the ILP.

    python3 benchmarks/planner_speed.py --out benchmarks/results/planner-speed.json

A synthetic profile with Qwen1.5-MoE-A2.7B's 24 layers x (60 routed + 4 shared-slice)
experts, 3 blocks and the 8 canonical schemes (synthetic_profile.py), the H100 kernel
profile for the latency term; at r = 1 and r = 0.5 each solver plans at 3.25 bits per
layer, and the objective r*log L + (1-r)*log T of each plan is compared. Runs on the CPU
(the re-planner runs on the serving host's CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mxserve.costmodel import cost_model  # noqa: E402
from mxserve.planner import solve_plan  # noqa: E402
from mxserve.profile import CalibrationProfile  # noqa: E402


def objective(plan, r: float) -> float:
    s = plan.summary
    return r * math.log(s["L"]) + (1 - r) * math.log(s["T"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=3.25)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prof_path = os.path.join(tmp, "qwen15-24l.json")
        subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "synthetic_profile.py"), "--config",
                        os.path.join(ROOT, "benchmarks", "configs", "qwen1.5-moe-a2.7b-4layers.json"), "--layers",
                        "24", "--out", prof_path], check=True, capture_output=True)
        prof = CalibrationProfile.load(prof_path)
    cost = cost_model(os.path.join(ROOT, "benchmarks", "results", "h100-kernel-profile.json"))
    rows = []
    for r in (1.0, 0.5):
        res = {}
        for solver in ("auto", "ilp"):
            t0 = time.perf_counter()
            out = solve_plan(prof, a.budget, r=r, tokens=a.tokens, cost=cost, solver=solver)
            res[solver] = (time.perf_counter() - t0, out.plan)
        (t_fast, p_fast), (t_ilp, p_ilp) = res["auto"], res["ilp"]
        rows.append({
            "r": r, "seconds_auto": round(t_fast, 3), "seconds_ilp": round(t_ilp, 2),
            "objective_auto": objective(p_fast, r), "objective_ilp": objective(p_ilp, r),
            "L_auto": p_fast.summary["L"], "L_ilp": p_ilp.summary["L"],
            "T_auto": p_fast.summary["T"], "T_ilp": p_ilp.summary["T"],
            "avg_bits_auto": p_fast.summary["avg_bits"], "avg_bits_ilp": p_ilp.summary["avg_bits"],
        })
    doc = {"command": "python3 benchmarks/planner_speed.py --out " + a.out, "cpu_threads": os.cpu_count(),
           "layers": 24, "experts_per_layer": 64, "budget_bits": a.budget, "tokens": a.tokens, "rows": rows}
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"{'r':>4} {'greedy+cert (s)':>16} {'ILP (s)':>9} {'obj greedy':>12} {'obj ILP':>12} {'L greedy/ILP':>13}")
    for row in rows:
        print(f"{row['r']:>4} {row['seconds_auto']:>16} {row['seconds_ilp']:>9} {row['objective_auto']:>12.6f} "
              f"{row['objective_ilp']:>12.6f} {row['L_auto'] / row['L_ilp']:>13.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
