"""Plan swaps on the SGLang engine under load (CUDA graphs on): stall per layer, failed requests.

    python3 benchmarks/swap_stall.py plans --work WORK                           # where pulp is (the CPU host)
    python3 benchmarks/swap_stall.py prepare --work /tmp/swap --tokenizer DIR   # model, checkpoint, ladder
    python3 benchmarks/swap_stall.py run --work /tmp/swap --out OUT              # serve, load, swap, measure

prepare: a random-weight model with Qwen1.5-MoE-A2.7B's expert shapes (2 of its 24
layers; the stall is per layer), three 3.25-bit plans over w2/w3/w4 g128 solved for
different routing (synthetic profile, first plan from its frequencies, the others from
the frequencies reversed and shuffled), the checkpoint of the first plan and the precision
ladder of those schemes (RTN).
run: `mxserve launch --engine sglang` on it with swaps enabled (the ladder), 32 clients
streaming completions one after another, and after a warm-up three swaps (plan 1 -> 2 ->
3 -> 1) through SGLang's pause/update/continue endpoints (engines/sglang_swap.py). It
records every request's outcome, each swap's pause, and the per-layer hold times the
server exports (mxserve_swap_layer_seconds). Writes OUT/swap-stall.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SCHEMES = ["w4a16g128", "w3a16g128", "w2a16g128"]
SGLANG_ARGS = "--attention-backend triton --sampling-backend pytorch --grammar-backend none --mem-fraction-static 0.6"


def _config(work: str) -> str:
    cfg = json.load(open(os.path.join(ROOT, "benchmarks", "configs", "qwen1.5-moe-a2.7b-4layers.json")))
    cfg["num_hidden_layers"] = 2
    path = os.path.join(work, "config.json")
    json.dump(cfg, open(path, "w"))
    return path


def plans(work: str) -> None:
    """The three plans (needs the planner's solver)."""
    from mxserve.planner import solve_plan
    from mxserve.profile import CalibrationProfile

    os.makedirs(work, exist_ok=True)
    prof_path = os.path.join(work, "profile.json")
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "synthetic_profile.py"), "--config",
                    _config(work), "--out", prof_path], check=True)
    prof = CalibrationProfile.load(prof_path)
    rng = random.Random(0)
    for j in range(3):
        freqs = None
        if j:
            freqs = []
            for lay in prof.layers:
                f = [e.freq for e in lay.experts if not e.shared]
                freqs.append(f[::-1] if j == 1 else rng.sample(f, len(f)))
        plan = solve_plan(prof, 3.25, tokens=64, freqs=freqs, schemes=SCHEMES).plan
        plan.save(os.path.join(work, f"plan{j + 1}.json"))


def prepare(work: str, tokenizer: str) -> None:
    """The random model, the first plan's checkpoint and the ladder (where the GPU is; no solver needed)."""
    from mxserve.checkpoint import quantize_to_dir
    from mxserve.models.loading import load_tokenizer
    from mxserve.online.ladder import build_ladder
    from mxserve.plan import Plan

    model = os.path.join(work, "model")
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "random_model.py"), "--config", _config(work),
                    "--tokenizer", tokenizer, "--out", model], check=True)
    t0 = time.time()
    quantize_to_dir(model, Plan.load(os.path.join(work, "plan1.json")), os.path.join(work, "ckpt"), progress=False)
    t1 = time.time()
    build_ladder(model, os.path.join(work, "ladder"), SCHEMES, "rtn", None, load_tokenizer(model), 0,
                 progress=False)
    print(json.dumps({"quantize_s": round(t1 - t0, 1), "ladder_s": round(time.time() - t1, 1),
                      "ladder_bytes": os.path.getsize(os.path.join(work, "ladder", "ladder.safetensors"))}))


def _stream(base: str, i: int, stop: threading.Event, results: list) -> None:
    import httpx

    while not stop.is_set():
        body = {"model": "m", "prompt": f"def f{i}(x):", "max_tokens": 64, "temperature": 0.8, "stream": True,
                "ignore_eos": True}
        t0 = time.monotonic()
        try:
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=300) as r:
                lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
            ok = r.status_code == 200 and lines[-1] == "data: [DONE]" and len(lines) > 2
        except Exception:  # noqa: BLE001 - counted as a failure
            ok = False
        results.append((ok, t0, time.monotonic()))


def run(work: str, out: str, port: int = 30000) -> None:
    import httpx
    from procs import stop, wait_up
    from prometheus_client.parser import text_string_to_metric_families

    from mxserve.engines.sglang_swap import swap_plan
    from mxserve.plan import Plan

    os.makedirs(out, exist_ok=True)
    code = ("import shlex, sys; from mxserve.launch import serve_sglang; from mxserve.server.settings import "
            f"StatsSettings; sys.exit(serve_sglang({os.path.join(work, 'ckpt')!r}, '127.0.0.1', {port}, 'm', None, "
            f"None, (1, 1), shlex.split({SGLANG_ARGS!r}), 'kernel', StatsSettings(), "
            f"{os.path.join(work, 'ladder')!r}))")
    log = open(os.path.join(out, "server.log"), "w")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    base = f"http://127.0.0.1:{port}"
    doc: dict = {"command": "python3 benchmarks/swap_stall.py run --work WORK --out OUT"}
    try:
        doc["startup_seconds"] = round(wait_up(base + "/health", proc, os.path.join(out, "server.log")), 1)
        plans = [Plan.load(os.path.join(work, f"plan{j}.json")) for j in (1, 2, 3, 1)]
        halt, results = threading.Event(), []
        workers = [threading.Thread(target=_stream, args=(base, i, halt, results)) for i in range(32)]
        for w in workers:
            w.start()
        time.sleep(10)
        swaps = []
        for plan in plans[1:]:
            t = time.monotonic()
            s = swap_plan(base, plan)
            s["at"] = t
            swaps.append(s)
            time.sleep(6)
        halt.set()
        for w in workers:
            w.join()
        hold = {}
        for fam in text_string_to_metric_families(httpx.get(base + "/metrics").text):
            for smp in fam.samples:
                if smp.name.startswith("mxserve_swap_layer_seconds") or smp.name.startswith("mxserve_swap_seconds"):
                    hold[smp.name + json.dumps(smp.labels, sort_keys=True)] = smp.value
    finally:
        stop(proc)
    holds_ms = [float(x) for x in _holds(os.path.join(out, "server.log"))]
    doc.update({
        "requests": len(results), "failed": sum(not ok for ok, _, _ in results),
        "swaps": [{k: v for k, v in s.items() if k != "at"} for s in swaps],
        "requests_in_flight_at_swaps": [sum(a < s["at"] < b for _, a, b in results) for s in swaps],
        "longest_layer_hold_ms_per_swap": holds_ms, "metrics": hold,
    })
    count = hold.get('mxserve_swap_layer_seconds_count{}', 0)
    doc["mean_layer_hold_ms"] = 1e3 * hold.get('mxserve_swap_layer_seconds_sum{}', 0) / max(count, 1)
    json.dump(doc, open(os.path.join(out, "swap-stall.json"), "w"), indent=1)
    md = ["# Plan swaps on the SGLang engine under load (CUDA graphs on)", "",
          "Random weights with Qwen1.5-MoE-A2.7B's expert shapes (2 layers, 60 experts + 4 shared slices, "
          "hidden 2048, width 1408), 3.25-bit plans over w2/w3/w4 g128.", "",
          "    python3 benchmarks/swap_stall.py plans --work WORK",
          "    python3 benchmarks/swap_stall.py prepare --work WORK --tokenizer TOKENIZER_DIR",
          "    python3 benchmarks/swap_stall.py run --work WORK --out OUT", "",
          f"- startup to /health: {doc['startup_seconds']} s",
          f"- requests (32 clients streaming 64 tokens each, one after another): {doc['requests']}, failed: "
          f"{doc['failed']}",
          f"- swaps: {[s['outcome'] for s in doc['swaps']]}, in flight at each: {doc['requests_in_flight_at_swaps']}",
          f"- generation paused per swap (pause, update, continue; seconds): "
          f"{[round(s['paused_seconds'], 3) for s in doc['swaps']]}",
          f"- per-layer hold (device sync, host-to-device copy of the layer's slab, sync): mean "
          f"{doc['mean_layer_hold_ms']:.1f} ms over {count:.0f} layer swaps; longest per swap (ms) "
          f"{holds_ms}"]
    open(os.path.join(out, "swap-stall.md"), "w").write("\n".join(md) + "\n")
    print("\n".join(md))


def _holds(log: str) -> list[str]:
    import re

    return re.findall(r"longest hold ([0-9.]+) ms", open(log).read())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=("plans", "prepare", "run"))
    ap.add_argument("--work", required=True)
    ap.add_argument("--tokenizer")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.stage == "plans":
        plans(a.work)
    elif a.stage == "prepare":
        prepare(a.work, a.tokenizer)
    else:
        run(a.work, a.out)


if __name__ == "__main__":
    main()
