"""Dev perplexity of refmoe-25m: bf16, uniform RTN/GPTQ/GPTQ-had, and MxMoE plans.

Runs the `mxserve` CLI exactly as a user would (every command is recorded next
to its result) and writes results/accuracy-refmoe.{json,md}.

    .venv/bin/python scripts/accuracy_table.py [--budgets 2.25 2.5 3.25 4.25]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = "../shared/models/refmoe-25m"
CALIB = ["../shared/data/shakespeare-calib.txt", "../shared/data/python-calib.txt"]
DEV = ["../shared/data/shakespeare-dev.txt", "../shared/data/python-dev.txt"]
MX = str(ROOT / ".venv" / "bin" / "mxserve")


def sh(args: list[str]) -> tuple[str, float]:
    cmd = " ".join(shlex.quote(a) for a in ["mxserve", *args])
    print(f"$ {cmd}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([MX, *args], cwd=ROOT, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {cmd}\n{proc.stderr}")
    print(proc.stdout, end="", flush=True)
    return proc.stdout, dt


def ppl_of(out: str) -> dict[str, float]:
    res = {}
    for line in out.splitlines():
        m = re.match(r"(\S+)-dev\.txt\tppl ([0-9.]+)", line)
        if m:
            res[m.group(1)] = float(m.group(2))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", nargs="+", default=["2.25", "2.5", "3.25", "4.25"])
    ap.add_argument("--method", default="gptq-had")
    a = ap.parse_args()
    runs = ROOT / "runs"
    runs.mkdir(exist_ok=True)
    rows = []

    def record(name: str, bits: float, cmds: list[str], out: str, **extra) -> None:
        rows.append({"config": name, "bits": bits, "ppl": ppl_of(out), "commands": cmds, **extra})

    out, _ = sh(["eval", "--model", MODEL, "--data", *DEV, "--quiet"])
    record("bf16", 16.0, ["mxserve eval --model {M} --data {DEV}"], out)
    for scheme, bits in (("w4a16g128", 4.25), ("w3a16g128", 3.25), ("w2a16g128", 2.25)):
        for method in ("rtn", "gptq", "gptq-had"):
            args = ["eval", "--model", MODEL, "--uniform", scheme, "--method", method, "--data", *DEV, "--quiet"]
            if method != "rtn":
                args += ["--calib-data", *CALIB]
            out, _ = sh(args)
            cmd = f"mxserve eval --model {{M}} --uniform {scheme} --method {method} --data {{DEV}}"
            record(
                f"uniform {method} {scheme}", bits, [cmd + (" --calib-data {CALIB}" if method != "rtn" else "")], out
            )
    prof = runs / f"refmoe-{a.method}.json"
    _, cal_s = sh(
        ["calibrate", "--model", MODEL, "--data", *CALIB, "--method", a.method, "--quiet", "--out", str(prof)]
    )
    for b in a.budgets:
        plan = runs / f"plan-{b}.json"
        ckpt = runs / f"refmoe-mx{b}"
        pout, plan_s = sh(["plan", "--profile", str(prof), "--budget", f"{b}bit", "--r", "1", "--out", str(plan)])
        sh(["quantize", "--model", MODEL, "--plan", str(plan), "--quiet", "--out", str(ckpt)])
        out, _ = sh(["eval", "--model", str(ckpt), "--data", *DEV, "--quiet"])
        summary = json.loads(plan.read_text())["summary"]
        solve = float(re.search(r"solved in ([0-9.]+) s", pout).group(1))
        record(
            f"MxMoE {b}bit (r=1)",
            summary["avg_bits"],
            [
                f"mxserve calibrate --model {{M}} --data {{CALIB}} --method {a.method} --out {prof.name}",
                f"mxserve plan --profile {prof.name} --budget {b}bit --r 1 --out {plan.name}",
                f"mxserve quantize --model {{M}} --plan {plan.name} --out {ckpt.name}",
                f"mxserve eval --model {ckpt.name} --data {{DEV}}",
            ],
            out,
            schemes=summary["schemes"],
            solve_seconds=solve,
            plan_command_seconds=round(plan_s, 2),
        )
    results = ROOT / "results"
    results.mkdir(exist_ok=True)
    meta = {
        "model": MODEL,
        "dev": DEV,
        "calib": CALIB,
        "eval": "ctx 512, stride 512, first 32768 tokens per file",
        "calibrate_seconds": round(cal_s, 1),
        "rows": rows,
    }
    (results / "accuracy-refmoe.json").write_text(json.dumps(meta, indent=1) + "\n")
    lines = [
        "| config | avg bits | Shakespeare ppl | Python ppl | schemes (share of expert weights) |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        sch = ", ".join(f"{k} {v:.0%}" for k, v in r.get("schemes", {}).items())
        lines.append(
            f"| {r['config']} | {r['bits']:.3f} | {r['ppl'].get('shakespeare', float('nan')):.2f} | "
            f"{r['ppl'].get('python', float('nan')):.2f} | {sch} |"
        )
    (results / "accuracy-refmoe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
