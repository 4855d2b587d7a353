"""The online loop on the SGLang engine end to end: launch with re-planning, admin routes, swaps under load.

    python3 benchmarks/sglang_online.py --tokenizer DIR --out OUT

A tiny random Qwen2-MoE (hidden 256, 8 experts + 2 shared slices, 2 layers) served by
`mxserve launch --engine sglang --budget 4bit --replan-interval 0` (calibration, plan,
checkpoint and ladder made by the launch itself). While 16 clients stream completions:
an uploaded plan (POST /mxserve/plan on the admin port), a forced re-plan (POST
/mxserve/replan), a corrupt and an over-budget upload; each checked against GET
/mxserve/plan and SGLang's own /metrics. Writes OUT/sglang-online.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import httpx
from procs import stop, wait_up

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SGLANG_ARGS = "--attention-backend triton --sampling-backend pytorch --grammar-backend none --mem-fraction-static 0.5"
CONFIG = {
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 256,
    "intermediate_size": 512, "moe_intermediate_size": 128, "shared_expert_intermediate_size": 256,
    "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": False, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_hidden_layers": 2, "max_position_embeddings": 1024, "vocab_size": 8192,
    "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "dtype": "bfloat16",
}


def rotated(plan: dict, shift: int) -> dict:
    plan = json.loads(json.dumps(plan))
    low = ["w1a16g128", "w2a16g128", "w3a16g128", "w4a16g128"]
    for lay in plan["layers"]:
        for ep in lay["experts"]:
            ep["gate"] = ep["up"] = ep["down"] = low[(ep["expert"] + shift) % len(low)]
    return plan


def main() -> int:
    from mxserve.engines.sglang_swap import _served_plan_id
    from mxserve.online.swap import plan_id
    from mxserve.plan import Plan

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    work = os.path.join(a.out, "work")
    os.makedirs(work, exist_ok=True)
    json.dump(CONFIG, open(os.path.join(work, "config.json"), "w"))
    model = os.path.join(work, "model")
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "random_model.py"), "--config",
                    os.path.join(work, "config.json"), "--tokenizer", a.tokenizer, "--out", model], check=True)
    log = os.path.join(a.out, "launch.log")
    cmd = [sys.executable, "-m", "mxserve.cli", "launch", "--model", model, "--budget", "4bit", "--method", "rtn",
           "--calib-samples", "4", "--engine", "sglang", "--replan-interval", "0", "--replan-min-interval", "0",
           "--port", "30000", "--served-model-name", "m", "--sglang-args", SGLANG_ARGS, "--quiet"]
    env = dict(os.environ, MXSERVE_CACHE=os.path.join(work, "cache"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    base, admin = "http://127.0.0.1:30000", "http://127.0.0.1:30001"
    doc: dict = {"command": "python3 benchmarks/sglang_online.py --tokenizer DIR --out OUT", "launch": cmd[2:]}
    try:
        wait_up(base + "/health", proc, log)
        wait_up(admin + "/mxserve/plan", proc, log)
        halt, results = threading.Event(), []

        def client(i: int) -> None:
            while not halt.is_set():
                body = {"model": "m", "prompt": f"def f{i}(x):", "max_tokens": 48, "stream": True,
                        "ignore_eos": True}
                try:
                    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=300) as r:
                        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
                    results.append(r.status_code == 200 and lines[-1] == "data: [DONE]")
                except Exception:  # noqa: BLE001 - counted
                    results.append(False)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        time.sleep(5)
        p0 = httpx.get(admin + "/mxserve/plan").json()
        steps = []
        for shift in (1, 2):
            new = rotated(p0, shift)
            r = httpx.post(admin + "/mxserve/plan", json=new, timeout=300)
            served = httpx.get(admin + "/mxserve/plan").json()
            metrics_id = _served_plan_id(httpx.get(base + "/metrics").text)
            steps.append({"upload": shift, "status": r.status_code, "outcome": r.json().get("outcome"),
                          "served_is_upload": served["layers"] == new["layers"],
                          "metrics_plan_id_matches": metrics_id == plan_id(Plan.from_json(new))})
            time.sleep(3)
        r = httpx.post(admin + "/mxserve/replan", json={"force": True}, timeout=300)
        steps.append({"replan": r.status_code, **r.json()})
        bad = httpx.post(admin + "/mxserve/plan", json={"layers": 3})
        over = rotated(p0, 0)
        for ep in over["layers"][0]["experts"]:
            ep["gate"] = ep["up"] = ep["down"] = "bf16"
        ob = httpx.post(admin + "/mxserve/plan", json=over)
        steps.append({"corrupt_upload": bad.status_code, "over_budget_upload": ob.status_code})
        stats = httpx.get(admin + "/mxserve/stats").json()
        steps.append({"stats_plan_id": stats["precision"]["plan_id"],
                      "served_plan_id": plan_id(Plan.from_json(httpx.get(admin + "/mxserve/plan").json()))})
        time.sleep(3)
        halt.set()
        for t in threads:
            t.join()
        doc.update({"steps": steps, "requests": len(results), "failed": results.count(False)})
    finally:
        stop(proc)
    json.dump(doc, open(os.path.join(a.out, "sglang-online.json"), "w"), indent=1)
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
