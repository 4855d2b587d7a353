"""Drift demonstration: the plan follows the traffic from Shakespeare to Python and back (refmoe-25m, CPU).

    python3 benchmarks/drift.py --model ../shared/models/refmoe-25m --data ../shared/data --out OUT

1. `mxserve launch` (embedded engine) with a 3.25-bit plan calibrated on Shakespeare only,
   re-planning on (every 2 s, 5 s minimum between swaps, margin 1%).
2. Traffic: Shakespeare, then Python, then Shakespeare again (the *-calib.txt texts, so the
   held-out *-dev.txt files stay unseen); after each phase, what /metrics says (layer-0 load
   shares of the busiest experts, re-plans by outcome, plan changes) and the served plan.
3. Held-out perplexity (the *-dev.txt files, first 16384 tokens, fp32 on the CPU) of each
   served plan, its blocks read from the server's precision ladder (the tensors it served):
   the static Shakespeare plan against the plan re-planned for Python (on python-dev) and
   the plan after drifting back (on shakespeare-dev).

Writes OUT/drift.json and OUT/drift.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import httpx
from procs import stop, wait_up
from prometheus_client.parser import text_string_to_metric_families

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def scrape(base: str) -> dict:
    out: dict = {}
    for fam in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=30).text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def summary(m: dict) -> dict:
    share = {int(dict(k)["expert"]): v for k, v in m["mxserve_expert_load_share"].items()
             if dict(k)["layer"] == "0" and dict(k)["window"] == "ewma"}
    top = sorted(share, key=share.get, reverse=True)[:3]
    return {
        "layer0_top_experts_ewma": {e: round(share[e], 3) for e in top},
        "replans": {dict(k)["outcome"]: v for k, v in m["mxserve_replans_total"].items() if v},
        "plan_changes": m["mxserve_plan_changes_total"][()],
        "avg_bits": round(m["mxserve_plan_avg_bits"][()], 4),
        "plan_id": next(dict(k)["plan_id"] for k, v in m["mxserve_plan_info"].items() if v == 1),
    }


def traffic(base: str, path: str, n: int, chars: int = 400) -> None:
    text = open(path).read()
    step = len(text) // (n + 1)
    for i in range(n):
        r = httpx.post(base + "/v1/completions", timeout=300, json={
            "model": "refmoe-25m", "prompt": text[i * step: i * step + chars], "max_tokens": 8, "temperature": 0})
        r.raise_for_status()


def wait_for_change(base: str, changes: float, timeout: float = 120) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if scrape(base)["mxserve_plan_changes_total"][()] > changes:
            return True
        time.sleep(1)
    return False


def perplexity(model_path: str, ladder_path: str, plan_json: dict, data: str) -> float:
    from mxserve.checkpoint import install_layers
    from mxserve.evaluate import perplexity as ppl
    from mxserve.models.adapters import moe_layers
    from mxserve.models.loading import load_model, load_tokenizer
    from mxserve.online.ladder import Ladder
    from mxserve.plan import Plan

    plan = Plan.from_json(plan_json)
    model = load_model(model_path)
    ladder = Ladder(ladder_path)
    install_layers(model, [ladder.experts(plan.layer(v.index), v.hidden) for v in moe_layers(model)])
    return ppl(model.float().eval(), load_tokenizer(model_path), data, ctx=512, max_tokens=16384, progress=False)[0]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--samples", type=int, default=32, help="calibration windows")
    ap.add_argument("--prompts", type=int, default=24, help="requests per traffic phase")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    cache = os.path.join(a.out, "cache")
    env = dict(os.environ, MXSERVE_CACHE=cache, PYTHONUNBUFFERED="1")
    shake, python = (os.path.join(a.data, f"{d}-calib.txt") for d in ("shakespeare", "python"))
    cmd = [sys.executable, "-m", "mxserve.cli", "launch", "--model", a.model, "--budget", "3.25bit",
           "--calib-data", shake, "--method", "gptq-had", "--calib-samples", str(a.samples), "--port", str(a.port),
           "--replan-interval", "2", "--replan-min-interval", "5", "--replan-margin", "0.01",
           "--stats-window", "10", "--stats-halflife", "5", "--quiet"]
    log = open(os.path.join(a.out, "server.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{a.port}"
    doc: dict = {"command": "python3 benchmarks/drift.py " + " ".join(sys.argv[1:]), "launch": " ".join(cmd[2:])}
    try:
        doc["startup_seconds"] = round(wait_up(base + "/health", proc, os.path.join(a.out, "server.log")), 1)
        plans = {"static (Shakespeare calibration)": httpx.get(base + "/mxserve/plan").json()}
        phases = []
        for name, path, key in (("Shakespeare", shake, None), ("Python", python, "re-planned for Python"),
                                ("Shakespeare again", shake, "after drifting back")):
            changes = scrape(base)["mxserve_plan_changes_total"][()]
            traffic(base, path, a.prompts)
            changed = wait_for_change(base, changes, timeout=60 if key else 15)
            phases.append({"phase": name, "plan_changed": changed, **summary(scrape(base))})
            if key:
                plans[key] = httpx.get(base + "/mxserve/plan").json()
    finally:
        stop(proc)
    ladder = next(os.path.join(cache, d) for d in os.listdir(cache) if d.startswith("ladder-"))
    dev = {d: os.path.join(a.data, f"{d}-dev.txt") for d in ("shakespeare", "python")}
    rows = []
    for label, p in plans.items():
        rows.append({"plan": label, "avg_bits": round(p["summary"]["avg_bits"], 4),
                     **{f"ppl_{d}": round(perplexity(a.model, ladder, p, path), 3) for d, path in dev.items()}})
    doc["phases"], doc["plans"] = phases, rows
    with open(os.path.join(a.out, "drift.json"), "w") as f:
        json.dump(doc, f, indent=1)
    md = ["# Drift demonstration (refmoe-25m, embedded engine, CPU)", "", f"`{doc['command']}`", "",
          "Traffic phases (what /metrics said after each):", "",
          "| phase | plan changed | layer-0 busiest experts (EWMA share) | re-plans by outcome | plan changes | "
          "avg bits |", "|---|---|---|---|---:|---:|"]
    for p in phases:
        md.append(f"| {p['phase']} | {p['plan_changed']} | {p['layer0_top_experts_ewma']} | {p['replans']} | "
                  f"{p['plan_changes']:.0f} | {p['avg_bits']} |")
    md += ["", "Held-out perplexity of each served plan (first 16384 tokens of each *-dev.txt):", "",
           "| plan | avg bits | Shakespeare dev ppl | Python dev ppl |", "|---|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['plan']} | {r['avg_bits']} | {r['ppl_shakespeare']} | {r['ppl_python']} |")
    with open(os.path.join(a.out, "drift.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
