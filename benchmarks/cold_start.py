"""Cold start: time to /health of `mxserve launch --engine sglang` against plain SGLang, one run.

The acceptance of issue 10 (item 5): with an empty Triton cache mxserve's launch takes at most
1.2x plain SGLang's time to /health, and a second launch at most 1.1x. Four launches, in this
order, each timed from process start to /health and then checked with one chat completion:

- ``plain-cold``: plain SGLang on the source model (bf16), an empty Triton cache;
- ``mx-cold``: `mxserve launch --engine sglang` on the quantized checkpoint, with an empty
  mxserve cache, so an empty Triton cache (the kernels precompile while SGLang starts);
- ``mx-warm``: the same again, the cache now full;
- ``plain-warm``: plain SGLang again, on its now full Triton cache;
- ``plain-warm-metrics``: and once more with ``--enable-metrics``, which `mxserve launch` always passes
  (its Prometheus series): what SGLang's own metrics add to a start (not part of the target's ratio).

``--warm-rounds N`` starts the warm runs N times, in turn, and the ratios take each run's median: one
start varies by seconds from machine to machine, as much as the 1.1x target leaves.

Each engine has its own empty JIT caches besides Triton's: SGLang's compiled CUDA modules
(``TVM_FFI_CACHE_DIR``) and FlashInfer's (``FLASHINFER_WORKSPACE_BASE``), built with nvcc on first
use, seconds to a minute a module (a fresh H200 machine's first server built SGLang's KV-cache,
rotary and activation modules and FlashInfer's RMSNorm, about 40 s of it, 2026-12-04). Until then
the two engines shared the machine's, so plain SGLang's cold run built the ones both use and
mxserve's cold run found them: a cold mxserve launch looked faster than on a fresh machine.

For mxserve's runs the Triton cache entries are counted when the precompile phase ends and at
/health: entries added in between are kernels SGLang compiled itself (its own, and any that
precompiling missed). Until 2026-12-03 the precompile ran before SGLang started, and the first
count was named for that (``triton_entries_at_sglang_start``).

The checkpoint is made first (`mxserve quantize`, the plan's schemes on the model's weights), so
calibration is not part of either launch.

    python3 benchmarks/random_model.py --config benchmarks/configs/refmoe-25m.json --tokenizer .tok --out /tmp/m
    python3 benchmarks/cold_start.py --model /tmp/m --plan benchmarks/plans/refmoe-3.25bit.json --out $OUT/cold
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.procs import precompile_settled, stop, wait_up  # noqa: E402
from benchmarks.serving import DEFAULT_SGLANG_ARGS, free_port  # noqa: E402
from mxserve.runtime.launch_stamp import STAMPS  # noqa: E402

RUNS = ("plain-cold", "mx-cold", "mx-warm", "plain-warm", "plain-warm-metrics")


def entries(path: str) -> int:
    """Triton's cache entries (not mxserve's stamps of what it precompiled)."""
    return len(set(os.listdir(path)) - {STAMPS}) if os.path.isdir(path) else 0


def jit_caches(root: str) -> dict[str, str]:
    """The environment that puts SGLang's and FlashInfer's JIT-built CUDA modules under ``root``."""
    return {"TVM_FFI_CACHE_DIR": os.path.join(root, "tvm-ffi"), "FLASHINFER_WORKSPACE_BASE": root}


def launch(name: str, cmd: list[str], env: dict, port: int, out: str, triton: str, timeout: float) -> dict:
    """Start one server, time it to /health, check a completion, stop it."""
    import httpx

    log = os.path.join(out, f"{name}.log")
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    at_start = None

    def count_once_precompiled() -> None:
        # the precompile step, beside SGLang's start, logs its end: Triton's entries then. Watched while
        # /health is polled, so a line not recognised costs the count, never the time
        nonlocal at_start
        if name.startswith("mx") and at_start is None and precompile_settled(open(log).read()):
            at_start = entries(triton)

    try:
        wait_up(f"http://127.0.0.1:{port}/health", proc, log, timeout, count_once_precompiled)
        ready = time.time() - t0
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                       json={"model": "m", "messages": [{"role": "user", "content": "def f(x):"}], "max_tokens": 8,
                             "temperature": 0})  # fmt: skip
        r.raise_for_status()
    finally:
        stop(proc)
    row = {"run": name, "seconds_to_health": round(ready, 1), "command": shlex.join(cmd)}
    if at_start is not None:
        row.update(triton_entries_after_precompile=at_start, triton_entries_at_health=entries(triton))
    if (own := launcher_seconds(open(log).read())) is not None:
        row["launcher_seconds"] = own  # mxserve's own share, before SGLang starts
    return row


def launcher_seconds(log_text: str) -> float | None:
    """The seconds `mxserve launch` took before starting SGLang, from its "starting SGLang" line."""
    started = re.search(r"([\d.]+) s after mxserve started\)", log_text)
    return float(started.group(1)) if started else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the source model (plain SGLang serves it)")
    ap.add_argument("--plan", required=True, help="the plan mxserve serves it with")
    ap.add_argument("--sglang-args", default=DEFAULT_SGLANG_ARGS)
    ap.add_argument("--runs", default=",".join(RUNS), help=f"which of {', '.join(RUNS)} (in this order)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--warm-rounds", type=int, default=1,
                    help="start each warm run this many times, in turn; the ratios take the medians")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    runs = [r for r in a.runs.split(",") if r]
    if unknown := set(runs) - set(RUNS):
        raise SystemExit(f"unknown runs {sorted(unknown)}; known: {', '.join(RUNS)}")
    os.makedirs(a.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="cold-start-")
    ckpt, mx_cache, plain_triton = (os.path.join(work, d) for d in ("ckpt", "mxserve-cache", "plain-triton"))
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_CACHE_DIR", "MXSERVE_CACHE")}
    # FlashInfer's prebuilt cubins stay where they were; only its JIT builds move
    base.setdefault("FLASHINFER_CUBIN_DIR", os.path.join(os.path.expanduser("~"), ".cache", "flashinfer", "cubins"))
    t0 = time.time()
    from mxserve.launch import builtin_calibration_text

    # GPTQ's calibration text: the built-in one (the plan's own files are on the machine that made it)
    quantize = [sys.executable, "-m", "mxserve.cli", "quantize", "--model", a.model, "--plan", a.plan, "--device",
                "cuda", "--data", builtin_calibration_text(), "--nsamples", "16", "--quiet", "--out", ckpt]  # fmt: skip
    subprocess.run(quantize, check=True, env=base)
    rows = [{"run": "quantize (not part of a launch)", "seconds": round(time.time() - t0, 1)}]
    info = {"model": a.model, "plan": a.plan, "sglang_args": a.sglang_args,
            "command": "python3 benchmarks/cold_start.py " + shlex.join(sys.argv[1:])}  # fmt: skip
    md = write_results(a.out, rows, info)
    warm = [r for r in runs if "warm" in r]  # repeated, in turn, for --warm-rounds: one start varies by seconds
    for name in runs + [f"{r}#{k}" for k in range(2, a.warm_rounds + 1) for r in warm]:
        port = free_port()
        if name.startswith("plain"):
            cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", a.model, "--port", str(port),
                   "--served-model-name", "m", *shlex.split(a.sglang_args)]  # fmt: skip
            cmd += ["--enable-metrics"] if name.endswith("metrics") else []
            env, triton = dict(base, TRITON_CACHE_DIR=plain_triton), plain_triton
        else:
            cmd = [sys.executable, "-m", "mxserve.cli", "launch", "--engine", "sglang", "--model", ckpt,
                   "--served-model-name", "m", "--port", str(port), "--sglang-args", a.sglang_args]  # fmt: skip
            env, triton = dict(base, MXSERVE_CACHE=mx_cache), os.path.join(mx_cache, "triton")
        env.update(jit_caches(os.path.join(work, name.split("-")[0] + "-jit")))  # one per engine, empty at first
        rows.append(launch(name, cmd, env, port, a.out, triton, a.timeout))
        print(json.dumps(rows[-1]), flush=True)
        # after every run: a device budget that runs out mid-way still leaves the table and the ratios
        md = write_results(a.out, rows, info)
    shutil.rmtree(work, ignore_errors=True)
    print(md)


def write_results(out: str, rows: list[dict], info: dict) -> str:
    """cold_start.json and cold_start.md in ``out`` from the rows so far (the quantize row first); the
    Markdown is returned."""
    times: dict[str, list[float]] = {}
    for r in rows[1:]:
        times.setdefault(r["run"].split("#")[0], []).append(r["seconds_to_health"])
    secs = {run: statistics.median(t) for run, t in times.items()}
    pairs = (("mx-cold", "plain-cold"), ("mx-warm", "plain-warm"), ("mx-warm", "plain-warm-metrics"))
    ratios = {f"{m} / {p}": round(secs[m] / secs[p], 2) for m, p in pairs if m in secs and p in secs}
    result = dict(info, rows=rows, ratios=ratios)
    with open(os.path.join(out, "cold_start.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = [f"`{result['command']}`", "", "| run | seconds to /health | of them, mxserve's before SGLang starts | "
          "Triton entries after precompiling | at /health |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows[1:]:
        cells = (r["seconds_to_health"], r.get("launcher_seconds", ""), r.get("triton_entries_after_precompile", ""),
                 r.get("triton_entries_at_health", ""))  # fmt: skip
        md.append(f"| {r['run']} | " + " | ".join(map(str, cells)) + " |")
    md += ["", f"Quantize first: {rows[0]['seconds']} s. Ratios (of medians where runs repeat): " +
           (", ".join(f"{k} = {v}" for k, v in ratios.items()) or "none")]  # fmt: skip
    with open(os.path.join(out, "cold_start.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    return "\n".join(md)


if __name__ == "__main__":
    main()
