"""What one routing-statistics fold costs the process it runs in, per model shape (CPU).

Under SGLang the fold (router_stats.service.RouterStats) runs in a thread of the scheduler process every
``--stats-interval`` seconds and writes prometheus_client's multiprocess files; while it runs it holds that
process's GIL, which the scheduler's own loop needs between decode steps. This times folds the way the scheduler
does them: every MoE layer of the model, its experts' counters fed ``--tokens`` routed tokens between folds (busy),
or none (idle), in multiprocess mode.

    python3 benchmarks/stats_fold.py --out benchmarks/results/stats-fold    # writes stats_fold.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mxkernels.shapes import MODEL_SHAPES  # noqa: E402

# MoE layers of each model (their Hugging Face configs: DeepSeek-V2-Lite's first layer is dense)
MOE_LAYERS = {"qwen1.5-moe-a2.7b": 24, "deepseek-v2-lite": 26, "mixtral-8x7b": 32, "qwen3-30b-a3b": 48}


class _Layer:
    """What RouterStats reads of a runtime layer: its index, counter and plan version."""

    def __init__(self, index: int, experts: int):
        from router_stats import ExpertCounter

        self.layer_index, self.counter, self.version, self.experts_q = index, ExpertCounter(experts), 0, []


def time_folds(model: str, tokens: int, folds: int, seed: int = 0) -> dict:
    """Median milliseconds of a busy fold (``tokens`` routed tokens per layer since the last) and an idle one."""
    import torch

    from router_stats import MxMetrics, RouterStats

    shape = MODEL_SHAPES[model]
    layers = [_Layer(i, shape["experts"]) for i in range(MOE_LAYERS[model])]
    stats = RouterStats(lambda: layers, MxMetrics(), interval=1.0)
    gen = torch.Generator().manual_seed(seed)

    def feed() -> None:
        for lay in layers:
            lay.counter.record(torch.randint(0, shape["experts"], (tokens, shape["top_k"]), generator=gen))

    feed()
    stats.fold()  # the first fold creates every series
    busy, idle = [], []
    for _ in range(folds):
        feed()
        t = time.perf_counter()
        stats.fold()
        busy.append(time.perf_counter() - t)
        t = time.perf_counter()
        stats.fold()
        idle.append(time.perf_counter() - t)
    return {"model": model, "layers": len(layers), "experts": shape["experts"], "tokens_between_folds": tokens,
            "busy_ms": round(statistics.median(busy) * 1e3, 2), "idle_ms": round(statistics.median(idle) * 1e3, 2)}


def _one(model: str, tokens: int, folds: int) -> dict:
    """One model in a process of its own, as the scheduler has one metrics registry and multiprocess folder."""
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": d}
        code = (f"import sys, json; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
                f"import stats_fold; print(json.dumps(stats_fold.time_folds({model!r}, {tokens}, {folds})))")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(res: dict) -> str:
    lines = [f"Routing-statistics fold, CPU: {res['cpu']}, commit {res['commit']}. Command: `{res['command']}`.", "",
             "Median of the folds; the share of the process's time at the default fold interval (1 s) is the busy "
             "fold's milliseconds over 1000.", "",
             "| model | MoE layers | experts | tokens between folds | busy fold (ms) | idle fold (ms) |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in res["rows"]:
        cells = (r["model"], r["layers"], r["experts"], r["tokens_between_folds"], r["busy_ms"], r["idle_ms"])
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MOE_LAYERS), choices=list(MOE_LAYERS))
    ap.add_argument("--tokens", type=int, default=64, help="tokens each layer routes between two folds")
    ap.add_argument("--folds", type=int, default=9)
    ap.add_argument("--out", required=True, help="folder for stats_fold.json and stats_fold.md")
    a = ap.parse_args()
    commit = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    res = {"command": " ".join(["python3", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]), "commit": commit,
           "cpu": cpu, "rows": [_one(m, a.tokens, a.folds) for m in a.models]}  # fmt: skip
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "stats_fold.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(res)
    with open(os.path.join(a.out, "stats_fold.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
