"""What one routing-statistics fold costs the process it runs in, per model shape (CPU).

Under SGLang the fold ran in a thread of the scheduler process (router_stats.service.RouterStats, now
``MXSERVE_STATS_FOLD=thread``) every ``--stats-interval`` seconds and wrote prometheus_client's multiprocess files;
while it ran it held that process's GIL, which the scheduler's own loop needs between decode steps. Since the
fiftieth session a fold process does that work (router_stats.apart) and the scheduler only publishes the counters.
This times folds the way the scheduler did them: every MoE layer of the model, its experts' counters fed
``--tokens`` routed tokens between folds (busy), or none (idle), in multiprocess mode; with ``--stall-seconds``, a
stand-in for the scheduler's loop beside folds held, yielding and apart.

    python3 benchmarks/stats_fold.py --out benchmarks/results/stats-fold    # writes stats_fold.{json,md}
    python3 benchmarks/stats_fold.py --models qwen1.5-moe-a2.7b --stall-seconds 12 --out OUT   # and the stalls
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

    import router_stats.metrics as rm
    from router_stats import MxMetrics, RouterStats

    rm.yield_gil = lambda: None  # the fold's own work, with the GIL held: not its sleeps, when the GIL is free
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


# the scheduler's loop as the stall measurement stands it in: Python between decode steps, then a wait on the GPU
# (the GIL let go), about a decode step at 1 request on the H100 (1.9 ms)
STEP_PYTHON_S, STEP_WAIT_S = 0.0003, 0.0016


def scheduler_stalls(model: str, tokens: int, seconds: float, folding: bool, yields: bool = True,
                     apart: bool = False) -> dict:  # fmt: skip
    """What folds every second cost a loop of decode steps in the same process: the milliseconds a second by which
    steps ran late (longer than the median by more than 0.5 ms; the median second, and the mean), and the longest
    step. ``folding`` False: the loop alone (its own jitter); ``yields`` False: the fold keeps the GIL through its
    writes (before the forty-third session); ``apart``: this process only publishes the counters to a fold process
    (router_stats.apart, the default under SGLang since the fiftieth session). The counts each fold reads are added
    to the host mirrors directly, as the GPU's counting kernel does."""
    import threading

    import torch

    import router_stats.metrics as rm
    from router_stats import MxMetrics, RouterStats

    if not yields:
        rm.yield_gil = lambda: None
    shape = MODEL_SHAPES[model]
    layers = [_Layer(i, shape["experts"]) for i in range(MOE_LAYERS[model])]
    if apart:
        from router_stats.apart import FoldApart

        stats = FoldApart(lambda: layers, lambda: (0.0, ""), interval=3600).start()  # published by the loop below
        fold = stats.publish
    else:
        stats = RouterStats(lambda: layers, MxMetrics(), interval=1.0)
        fold = stats.fold
    gen = torch.Generator().manual_seed(0)
    deltas = []
    for _ in layers:  # one interval's routing per layer, counted as the counter does
        probe = _Layer(0, shape["experts"]).counter
        probe.record(torch.randint(0, shape["experts"], (tokens, shape["top_k"]), generator=gen))
        deltas.append(probe.buf.clone())
    stop = threading.Event()

    def fold_every_second() -> None:
        while not stop.wait(1.0):
            for lay, d in zip(layers, deltas):
                lay.counter.buf.add_(d)
            fold()

    fold()
    folder = threading.Thread(target=fold_every_second, daemon=True)
    if folding:
        folder.start()
    start = last = time.perf_counter()
    periods, ends = [], []
    while last < start + seconds:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < STEP_PYTHON_S:
            pass
        time.sleep(STEP_WAIT_S)
        now = time.perf_counter()
        periods.append(now - last)
        ends.append(now - start)
        last = now
    stop.set()
    if folding:  # joined: a daemon thread cut at exit inside torch's C++ aborts the process
        folder.join()
    if apart:
        stats.stop()
    mid = statistics.median(periods)
    late = [0.0] * int(seconds + 1)  # per second of the loop: a rare pause (the cycle collector) stays in its second
    for p, at in zip(periods, ends):
        if p > mid + 5e-4:
            late[min(int(at), len(late) - 1)] += p - mid
    return {"stalled_ms_per_s": round(statistics.median(late[: int(seconds)] or late) * 1e3, 2),
            "stalled_ms_per_s_mean": round(sum(late) * 1e3 / seconds, 2),
            "longest_step_ms": round(max(periods) * 1e3, 2), "median_step_ms": round(mid * 1e3, 3)}


def _in_process(call: str) -> dict:
    """``stats_fold.CALL`` in a process of its own, as the scheduler has one metrics registry and multiprocess
    folder."""
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": d}
        code = (f"import sys, json; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
                f"import stats_fold; print(json.dumps(stats_fold.{call}))")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _one(model: str, tokens: int, folds: int, stall_s: float) -> dict:
    row = _in_process(f"time_folds({model!r}, {tokens}, {folds})")
    if stall_s > 0:  # the loop alone; beside folds that keep the GIL, that let it go after each layer, that run apart
        for key, args in (("alone", "False"), ("held", "True, False"), ("yielding", "True, True"),
                          ("apart", "True, True, True")):  # fmt: skip
            row[f"stall_{key}"] = _in_process(f"scheduler_stalls({model!r}, {tokens}, {stall_s}, {args})")
    return row


def markdown(res: dict) -> str:
    lines = [f"Routing-statistics fold, CPU: {res['cpu']}, commit {res['commit']}. Command: `{res['command']}`.", "",
             "Median of the folds; the share of the process's time at the default fold interval (1 s) is the busy "
             "fold's milliseconds over 1000.", "",
             "| model | MoE layers | experts | tokens between folds | busy fold (ms) | idle fold (ms) |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in res["rows"]:
        cells = (r["model"], r["layers"], r["experts"], r["tokens_between_folds"], r["busy_ms"], r["idle_ms"])
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    stalled = [r for r in res["rows"] if "stall_alone" in r]
    if stalled:
        lines += ["", f"A loop of decode steps in the same process ({STEP_PYTHON_S * 1e3:g} ms of Python, then "
                  f"{STEP_WAIT_S * 1e3:g} ms waiting with the GIL let go), {res['stall_s']:g} s, a busy fold every "
                  "second beside it: the milliseconds its steps ran late (over the median by more than 0.5 ms) in the "
                  "median second of the loop, and its longest step. Held: the fold keeps the GIL through its writes "
                  "(before the forty-third session); yielding: it lets the GIL go after each layer "
                  "(router_stats.metrics.yield_gil); apart: the loop's process only publishes the counters, a fold "
                  "process folds and writes (router_stats.apart).", "",
                  "| model | loop alone: late ms/s | folds held: late ms/s | longest step ms | folds yielding: late "
                  "ms/s | longest step ms | folds apart: late ms/s | longest step ms |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in stalled:
            a, h, y = r["stall_alone"], r["stall_held"], r["stall_yielding"]
            p = r.get("stall_apart", {})
            lines.append(f"| {r['model']} | {a['stalled_ms_per_s']} | {h['stalled_ms_per_s']} | {h['longest_step_ms']} "
                         f"| {y['stalled_ms_per_s']} | {y['longest_step_ms']} | {p.get('stalled_ms_per_s', '-')} "
                         f"| {p.get('longest_step_ms', '-')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MOE_LAYERS), choices=list(MOE_LAYERS))
    ap.add_argument("--tokens", type=int, default=64, help="tokens each layer routes between two folds")
    ap.add_argument("--folds", type=int, default=9)
    ap.add_argument("--stall-seconds", type=float, default=0.0,
                    help="also time a loop of decode steps beside folds every second, this long per case (0: not)")
    ap.add_argument("--out", required=True, help="folder for stats_fold.json and stats_fold.md")
    a = ap.parse_args()
    commit = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    res = {"command": " ".join(["python3", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]), "commit": commit,
           "cpu": cpu, "stall_s": a.stall_seconds,
           "rows": [_one(m, a.tokens, a.folds, a.stall_seconds) for m in a.models]}  # fmt: skip
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
