"""Where a warm `mxserve launch --engine sglang` spends the seconds plain SGLang does not.

Two measurements, each in fresh processes (cold_start.py times the whole launch):

- the launcher, from its start to the moment it would start SGLang (``run_sglang`` is replaced by a
  stop), under cProfile: wall time and the functions that take it;
- the plugin's imports in SGLang's processes: SGLang loads its plugins in every process it starts
  (``sglang.srt.plugins.load_plugins``), the HTTP server's before it parses its arguments, so what
  importing ``mxserve.engines.sglang_plugin`` adds beyond what that process imports anyway is
  startup time plain SGLang does not pay.

    python3 benchmarks/startup_profile.py --ckpt CHECKPOINT --out $OUT/startup
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what each SGLang process imports on its own before or while it starts (sglang 0.5.15)
PROCESSES = {
    # the HTTP server's own module, up to its load_plugins(): what the plugin adds here comes before
    # SGLang parses its arguments and starts its scheduler, on the launch's critical path
    "launch_server (its module, then the plugins)": ("sglang.launch_server",),
    "http server (main)": ("sglang.srt.server_args", "sglang.srt.entrypoints.http_server",
                           "sglang.srt.configs.model_config"),  # fmt: skip
    "scheduler": ("sglang.srt.managers.scheduler",),
    "detokenizer": ("sglang.srt.managers.detokenizer_manager",),
}
PLUGIN = "mxserve.engines.sglang_plugin"

_IMPORTS = """
import importlib, sys, time
t0 = time.perf_counter()
for m in {base!r}:
    __import__(m)
t1 = time.perf_counter()
print("---plugin---", file=sys.stderr, flush=True)
importlib.import_module({plugin!r}).register()
print({{"base_s": t1 - t0, "plugin_s": time.perf_counter() - t1}})
"""

_LAUNCHER = """
import cProfile, io, pstats, sys, time
t0 = time.perf_counter()
prof = cProfile.Profile()
if {profile!r}:
    prof.enable()
import mxserve.engines.sglang_launch as sl
from mxserve import cli

class Stop(Exception):
    pass

def stop(*a, **k):
    raise Stop

sl.run_sglang = stop
try:
    cli.main(["launch", "--engine", "sglang", "--model", {ckpt!r}, "--quiet"])
except Stop:
    pass
prof.disable()
wall = time.perf_counter() - t0
s = io.StringIO()
if {profile!r}:
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(40)
print(repr({{"wall_s": wall, "profile": s.getvalue()}}))
"""


# what the launcher asks before it starts SGLang, step by step in a fresh process (each step's
# seconds; later steps reuse what earlier ones set up, as in the launcher)
_STEPS = """
import time
steps, t = [], time.perf_counter()
def step(name):
    global t
    now = time.perf_counter()
    steps.append((name, round(now - t, 3)))
    t = now
import torch; step("import torch")
torch.cuda.is_available(); step("torch.cuda.is_available()")
torch.cuda.device_count(); step("torch.cuda.device_count()")
torch.cuda.device_memory_used(0); step("torch.cuda.device_memory_used(0) (NVML)")
torch.cuda.get_device_properties(0); step("torch.cuda.get_device_properties(0)")
import mxserve.launch; step("import mxserve.launch")
import transformers; step("import transformers")
print(repr(steps))
"""


def slowest_imports(stderr: str, after: str = "---plugin---", top: int = 15) -> list[tuple[float, str]]:
    """-X importtime's modules first imported after the marker, by cumulative time (s), slowest first."""
    rows = []
    for line in stderr.split(after, 1)[-1].splitlines():
        parts = line.split("|")
        if line.startswith("import time:") and len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]) / 1e6, parts[2].rstrip()))
    return sorted(rows, reverse=True)[:top]


def run_py(code: str, *flags: str) -> tuple[str, str]:
    p = subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    if p.returncode:
        raise SystemExit(f"failed:\n{p.stderr[-3000:]}")
    return p.stdout.strip().splitlines()[-1], p.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a quantized checkpoint (mxserve quantize)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    import ast

    result: dict = {"command": "python3 benchmarks/startup_profile.py " + " ".join(sys.argv[1:])}
    ckpt = os.path.abspath(a.ckpt)
    walls = [ast.literal_eval(run_py(_LAUNCHER.format(ckpt=ckpt, profile=False))[0])["wall_s"] for _ in range(2)]
    result["launcher_to_sglang_start_s"] = round(walls[-1], 2)  # the first warms the page cache
    launcher = ast.literal_eval(run_py(_LAUNCHER.format(ckpt=ckpt, profile=True))[0])
    result["launcher_profiled_s"] = round(launcher["wall_s"], 2)
    with open(os.path.join(a.out, "launcher_profile.txt"), "w") as f:
        f.write(launcher["profile"])
    result["launcher_steps_s"] = ast.literal_eval(run_py(_STEPS)[0])
    result["plugin_import"] = {}
    for name, base in PROCESSES.items():
        out, err = run_py(_IMPORTS.format(base=base, plugin=PLUGIN), "-X", "importtime")
        times = ast.literal_eval(out)
        result["plugin_import"][name] = {"process_imports_s": round(times["base_s"], 2),
                                         "plugin_adds_s": round(times["plugin_s"], 2),
                                         "slowest_new_modules": slowest_imports(err)}  # fmt: skip
    with open(os.path.join(a.out, "startup_profile.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
