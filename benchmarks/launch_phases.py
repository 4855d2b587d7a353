"""`mxserve launch` end to end on a real-size model: time and peak memory of each phase.

Runs one `mxserve launch` (calibration, planning, quantization, then the server) with an
empty mxserve cache, waits for /health, checks a few chat completions, and writes a table:

- calibrate, quantize, precompile: the `phase` lines the launch logs (mxserve/phases.py: wall time,
  torch's peak GPU allocation, peak resident host memory of the launch process);
- serve: SGLang's start (the precompile runs beside it) to /health, GPU memory in use (nvidia-smi;
  SGLang reserves a fixed fraction of the GPU for its KV cache, so this is that reservation) and the
  server processes' resident host memory, sampled each second.

    python3 benchmarks/random_model.py --config benchmarks/configs/qwen1.5-moe-a2.7b.json \\
        --tokenizer .tok --out /tmp/qwen15
    python3 benchmarks/launch_phases.py --model /tmp/qwen15 --budget 3.25bit --calib-samples 128 --out $OUT/launch
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.procs import stop, wait_up  # noqa: E402
from benchmarks.serving import DEFAULT_SGLANG_ARGS, free_port  # noqa: E402
from mxserve.phases import GIB, parse_phases  # noqa: E402

PROMPTS = ["The history of the", "def fibonacci(n):", "Once upon a time", "import numpy as np\n"]


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (SGLang runs a scheduler process)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,rss="], capture_output=True, text=True).stdout.split()
    rows = [tuple(map(int, out[i : i + 3])) for i in range(0, len(out), 3)]
    keep, total, changed = {pid}, 0, True
    while changed:
        changed = False
        for p, pp, _ in rows:
            if pp in keep and p not in keep:
                keep.add(p)
                changed = True
    for p, _, rss in rows:
        if p in keep:
            total += rss * 1024
    return total


def gpu_used() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout.split()  # fmt: skip
    return int(out[0]) * (1 << 20) if out else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--budget", default="3.25bit")
    ap.add_argument("--method", default="gptq-had")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--sglang-args", default=DEFAULT_SGLANG_ARGS)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--cache", help="mxserve cache to use (default: a new empty one). A run cut off after its "
                    "calibration is resumed by running again with the same --cache and --out: the launch takes the "
                    "cached profile and the table keeps the first run's calibrate line")  # fmt: skip
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    port = free_port()
    cache = a.cache or tempfile.mkdtemp(prefix="mxserve-cache-")  # empty: every phase runs
    os.makedirs(cache, exist_ok=True)
    log = os.path.join(a.out, "launch.log")
    start = os.path.getsize(log) if os.path.isfile(log) else 0  # this run's part of an appended log
    cmd = [sys.executable, "-m", "mxserve.cli", "launch", "--engine", "sglang", "--device", "cuda", "--model", a.model,
           "--budget", a.budget, "--method", a.method, "--calib-samples", str(a.calib_samples),
           "--sglang-args", a.sglang_args, "--port", str(port)]  # fmt: skip
    env = dict(os.environ, MXSERVE_CACHE=cache, PYTHONUNBUFFERED="1")
    t0 = time.time()
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)

    def this_run() -> str:
        with open(log) as f:
            f.seek(start)
            return f.read()
    peaks = {"gpu": 0, "host": 0, "serve_start": None}
    done = threading.Event()

    def sample() -> None:  # once the launch's own phases are over: nvidia-smi and the process tree
        while not done.wait(1.0):
            text = this_run()
            # SGLang starts at this line (the kernels precompile beside its start)
            if peaks["serve_start"] is None and "starting SGLang" in text:
                peaks["serve_start"] = time.time()
            if peaks["serve_start"] is not None:
                peaks["gpu"] = max(peaks["gpu"], gpu_used())
                peaks["host"] = max(peaks["host"], tree_rss(proc.pid))

    threading.Thread(target=sample, daemon=True).start()
    try:
        wait_up(f"http://127.0.0.1:{port}/health", proc, log, a.timeout)
        ready = time.time() - t0
        import httpx

        answers = []
        for p in PROMPTS:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                           json={"model": "m", "messages": [{"role": "user", "content": p}], "max_tokens": 32,
                                 "temperature": 0})  # fmt: skip
            r.raise_for_status()
            answers.append(r.json()["choices"][0]["message"]["content"])
    finally:
        done.set()
        stop(proc)
    phases = parse_phases(open(log).read())
    serve_s = ready - (peaks["serve_start"] or t0) + t0
    rows = [{"phase": r.name, "seconds": round(r.seconds, 1), "peak_gpu_gib": r.peak_gpu_gib,
             "peak_host_gib": round(r.peak_host_gib, 2)} for r in phases.values()]  # fmt: skip
    rows.append({"phase": "serve (to /health; 4 chat completions)", "seconds": round(serve_s, 1),
                 "peak_gpu_gib": round(peaks["gpu"] / GIB, 2),
                 "peak_host_gib": round(peaks["host"] / GIB, 2)})  # fmt: skip
    result = {"command": shlex.join(cmd), "model": a.model, "ready_seconds": round(ready, 1), "phases": rows,
              "resumed": start > 0, "answers": answers}  # fmt: skip
    with open(os.path.join(a.out, "launch_phases.json"), "w") as f:
        json.dump(result, f, indent=2)
    how = "resumed from the cached calibration of an earlier run" if start else "empty mxserve cache"
    md = [f"`{result['command']}` ({how}): /health after {ready:.0f} s.", "",
          "| phase | seconds | peak GPU GiB | peak host GiB |", "|---|---:|---:|---:|"]  # fmt: skip
    md += [f"| {r['phase']} | {r['seconds']} | {r['peak_gpu_gib']} | {r['peak_host_gib']} |" for r in rows]
    with open(os.path.join(a.out, "launch_phases.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
