"""Two calibration profiles of one model (say CPU and GPU): routing, block errors, and the plans
they give at a few budgets. Prints a Markdown report.

    python3 benchmarks/calib_parity.py CPU.json GPU.json --budgets 2.25 3.25 4.25
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mxserve.planner import solve_plan  # noqa: E402
from mxserve.profile import CalibrationProfile  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--budgets", nargs="+", type=float, default=[2.25, 3.25, 4.25])
    args = ap.parse_args()
    a, b = CalibrationProfile.load(args.a), CalibrationProfile.load(args.b)
    routed, rel = [], []
    for la, lb in zip(a.layers, b.layers):
        for ea, eb in zip(la.experts, lb.experts):
            if ea.routed_tokens != eb.routed_tokens:
                routed.append(f"layer {la.layer} expert {ea.expert}: {ea.routed_tokens} vs {eb.routed_tokens}")
            rel += [abs(ea.err[k][s] - eb.err[k][s]) / max(ea.err[k][s], 1e-12) for k in ea.err for s in ea.err[k]]
    n_exp = sum(len(la.experts) for la in a.layers)
    print(f"Profiles `{args.a}` and `{args.b}`, {n_exp} experts.\n")
    print(f"- routed tokens differ for {len(routed)} experts" + (f": {'; '.join(routed)}" if routed else ""))
    print(f"- block errors, relative difference: median {statistics.median(rel):.1e}, max {max(rel):.1e}\n")
    print("| budget | avg bits A | avg bits B | experts whose schemes differ |")
    print("|---:|---:|---:|---:|")
    for budget in args.budgets:
        pa, pb = solve_plan(a, budget).plan, solve_plan(b, budget).plan
        ja, jb = pa.to_json()["layers"], pb.to_json()["layers"]
        diff = sum(ea != eb for la, lb in zip(ja, jb) for ea, eb in zip(la["experts"], lb["experts"]))
        print(f"| {budget:g} | {pa.summary['avg_bits']:.4f} | {pb.summary['avg_bits']:.4f} | {diff} of {n_exp} |")


if __name__ == "__main__":
    main()
