"""How many kernel variants serving a plan makes Triton compile, and what they cost (CPU; no GPU).

Lists the variants with mxserve.runtime.precompile (the real launch path over SGLang's decode batch
sizes and a ladder of prefill token counts, each launch recorded as its compile key for sm_90, tiles
for an H100's 132 multiprocessors), in three settings:

- ``per-layer``: each layer compiles its own code set, every integer specialized (before the
  cold-start levers);
- ``model codes``: every layer compiles the model-wide code set (Arena.extra_codes);
- ``levers``: model codes and the batch-dependent integers unspecialized (as served now).

``--compile`` then compiles every variant of each setting for sm_90 on this machine (Triton's cache
off, one process; ``--workers N`` as `mxserve launch` does) and reports the seconds, and the
registers and spills of the GEMM variants (cuobjdump), so the levers' cost in registers shows
before any GPU time:

    python3 benchmarks/compile_variants.py --plan benchmarks/plans/refmoe-3.25bit.json \\
        --shape refmoe-25m:hidden=256,inter=256,experts=16,top_k=2,shared=2 --compile --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from benchmarks.moe_layer import parse_shape  # noqa: E402
from mxserve.plan import Plan  # noqa: E402
from mxserve.runtime.moe_layer import plan_kernel_codes  # noqa: E402
from mxserve.runtime.precompile import (  # noqa: E402
    DECODE_BATCHES,
    KERNELS,
    PREFILL_TOKENS,
    compile_variants,
    plan_layers,
    record_variants,
)

SETTINGS = ("per-layer", "model codes", "levers")
TARGET = GPUTarget("cuda", 90, 32)  # the H100/H200
SMS = 132


def usage(cubin: bytes) -> tuple[int, int, int] | None:
    """(registers per thread, static shared-memory bytes, local-memory bytes: spills) of a cubin's kernel."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", res)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def plan_views(plan: Plan, shape: dict) -> list[SimpleNamespace]:
    """The model's MoE layers as plan_layers reads them, from ``shape`` (parse_shape's)."""
    return [SimpleNamespace(index=lay.layer, hidden=shape["hidden"], intermediate=shape["inter"],
                            n_routed=shape["experts"], top_k=shape["top_k"]) for lay in plan.layers]  # fmt: skip


def write_results(out: str, stem: str, meta: dict, key: str, rows: list, md: str) -> None:
    """OUT/STEM.json ({"meta": ..., KEY: rows}) and OUT/STEM.md."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, stem + ".json"), "w") as f:
        json.dump({"meta": meta, key: rows}, f, indent=1)
    with open(os.path.join(out, stem + ".md"), "w") as f:
        f.write(md)


def compiled(rec, workers: int) -> dict:
    """Compile every recorded variant; seconds per kernel, GEMM registers/spills (decode, prefill)."""
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # time the compile, not Triton's on-disk cache
    variants = rec.all()
    t0 = time.perf_counter()
    results = compile_variants(variants, TARGET, workers)
    out = {"wall_seconds": round(time.perf_counter() - t0, 2)}
    for name in KERNELS:
        mine = [(v, r) for v, r in zip(variants, results) if v.kernel == name]
        if not mine:
            continue
        secs = [r[0] for _, r in mine]
        out[name] = {"variants": len(mine), "seconds": round(sum(secs), 2), "max_seconds": round(max(secs), 2)}
        if name == "gemm":
            for part in ("decode", "prefill"):
                regs = [usage(r[1]) for v, r in mine if v.decode == (part == "decode")]
                regs = [u for u in regs if u]
                if regs:
                    out[name][part] = {"max_regs": max(r for r, _, _ in regs), "spilling": sum(s > 0 for *_, s in regs)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--shape", required=True, type=parse_shape,
                    help="NAME:hidden=H,inter=I,experts=E,top_k=K[,shared=S] (the plan's model)")  # fmt: skip
    ap.add_argument("--compile", action="store_true", help="compile every variant for sm_90 here and time it")
    ap.add_argument("--workers", type=int, default=1, help="compile processes (default 1: the serial cost)")
    ap.add_argument("--out", help="folder for compile_variants_NAME.json / .md")
    a = ap.parse_args()
    plan = Plan.load(a.plan)
    name, shape = a.shape
    layers = plan_layers(plan, plan_views(plan, shape))
    rows = []
    for setting in SETTINGS:
        codes = 0 if setting == "per-layer" else plan_kernel_codes(plan)
        row = {"setting": setting}
        for part, tokens in (("decode", DECODE_BATCHES), ("all", DECODE_BATCHES + PREFILL_TOKENS)):
            rec = record_variants(layers, tokens, TARGET, SMS, codes, specialize_all=setting != "levers")
            row[part] = rec.count()
        if a.compile:
            row["compile"] = compiled(rec, a.workers)
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"plan": a.plan, "shape": {name: shape}, "layers": len(plan.layers), "decode_batch_sizes": DECODE_BATCHES,
            "prefill_token_counts": PREFILL_TOKENS, "triton": triton.__version__, "target": "sm_90",
            "workers": a.workers, "cpus": os.cpu_count(),
            "command": "python3 benchmarks/compile_variants.py " + " ".join(sys.argv[1:])}  # fmt: skip
    if a.out:
        write_results(a.out, f"compile_variants_{name}", meta, "rows", rows, markdown(meta, rows))


def markdown(meta: dict, rows: list) -> str:
    kernels = list(KERNELS)
    lines = [f"Kernel variants Triton compiles to serve {meta['plan']} ({meta['layers']} layers, "
             f"{list(meta['shape'])[0]}), Triton {meta['triton']}, {meta['target']}.", "", f"    {meta['command']}", "",
             "| setting | " + " | ".join(f"{k} decode / all" for k in kernels) + " | total all |",
             "|---|" + "---:|" * (len(kernels) + 1)]  # fmt: skip
    for r in rows:
        cells = [f"{r['decode'].get(k, 0)} / {r['all'].get(k, 0)}" for k in kernels]
        lines.append(f"| {r['setting']} | " + " | ".join(cells) + f" | {sum(r['all'].values())} |")
    if any("compile" in r for r in rows):
        lines += ["", f"Compiling every variant (decode and prefill) for sm_90 on this machine ({meta['cpus']} CPUs, "
                  f"{meta['workers']} compile processes, Triton's cache off); GEMM registers per thread and variants "
                  "spilling to local memory:", "",
                  "| setting | variants | wall seconds | compile seconds (sum) | slowest | GEMM decode: max registers, "
                  "spilling | GEMM prefill: max registers, spilling |",
                  "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in rows:
            c = r["compile"]
            per = [v for k, v in c.items() if k in KERNELS]
            g = c.get("gemm", {})
            regs = [f"{g[p]['max_regs']}, {g[p]['spilling']}" if p in g else "" for p in ("decode", "prefill")]
            lines.append(f"| {r['setting']} | {sum(v['variants'] for v in per)} | {c['wall_seconds']:.1f} | "
                         f"{sum(v['seconds'] for v in per):.1f} | {max(v['max_seconds'] for v in per):.2f} | "
                         f"{regs[0]} | {regs[1]} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
