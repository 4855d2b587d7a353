"""What serving a plan makes Triton compile, through Triton's own launch path, on the CPU (no GPU).

Runs the launch path (mxkernels.moe.mx_moe_forward) of every layer of a plan, random weights in the
plan's schemes, over SGLang's CUDA-graph decode batch sizes and a ladder of prefill token counts,
as a server launches it. Each launch goes through Triton's own `JITFunction.run`: a stand-in
driver answers what run() asks a GPU driver (an sm_90 target, device 0), and each launch only
compiles (warmup), one kernel after the other, as SGLang's CUDA-graph capture meets them. Every
compile lands in an empty Triton cache, so the cache's entries are the compiled variants and the
wall time is their serial compile time on this machine.

``--tree DIR`` measures another checkout's kernels (say, a commit before a change), with this
script: so one machine gives before and after.

    git worktree add /tmp/before e5b5408
    python3 benchmarks/launch_compiles.py --plan benchmarks/plans/refmoe-3.25bit.json --tree /tmp/before \\
        --shape refmoe-25m:hidden=256,inter=256,experts=16,top_k=2,shared=2 --label before --out DIR
    python3 benchmarks/launch_compiles.py --plan benchmarks/plans/refmoe-3.25bit.json \\
        --shape refmoe-25m:hidden=256,inter=256,experts=16,top_k=2,shared=2 --label now --out DIR
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import os
import sys
import tempfile
import time
from unittest import mock

DECODE = [1, 2, 4, 8, *range(16, 257, 8)]  # SGLang's default CUDA-graph batch sizes
PREFILL = [*range(4, 33, 4), *range(48, 257, 16), *range(288, 513, 32), *range(576, 1025, 64),
           *range(1280, 4097, 256), *range(4608, 8193, 512)]  # fmt: skip


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--shape", required=True, help="NAME:hidden=H,inter=I,experts=E,top_k=K,shared=S")
    ap.add_argument("--tree", help="the checkout whose kernels to measure (default: this one)")
    ap.add_argument("--label", default="now")
    ap.add_argument("--out", required=True)
    return ap.parse_args()


def main() -> None:
    a = parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.abspath(a.tree) if a.tree else here)
    cache = tempfile.mkdtemp(prefix="triton-")
    os.environ["TRITON_CACHE_DIR"] = cache  # empty: every variant compiles once

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton_stub import compile_only_launches  # benchmarks/, on the path as this script's folder

    from mxkernels import moe
    from mxkernels.arena import build_arena, kernel_code
    from mxserve.plan import Plan
    from mxserve.quant.qlinear import QuantizedLinear, quantize_linear
    from mxserve.schemes import get_scheme

    name, _, spec = a.shape.partition(":")
    shape = {k: int(v) for k, v in (kv.split("=") for kv in spec.split(","))}
    h, i, e, k = shape["hidden"], shape["inter"], shape["experts"], shape["top_k"]
    target = GPUTarget("cuda", 90, 32)
    plan = Plan.load(a.plan)
    blocks: dict = {}

    # as runtime/precompile._stand_in, written out here: --tree checkouts predate that module
    def block(scheme: str, n: int, kk: int):
        if (scheme, n, kk) not in blocks:
            sc = get_scheme(scheme)
            w = torch.randn(n, kk) * 0.02
            blocks[scheme, n, kk] = QuantizedLinear(sc, n, kk, w.bfloat16()) if sc.family == "none" else \
                quantize_linear(w, sc, "rtn")  # fmt: skip
        return blocks[scheme, n, kk]

    # what this tree's engines do: the model-wide code set where build_arena takes one
    model_codes = 0
    for s in plan.scheme_names():
        model_codes |= 1 << kernel_code(get_scheme(s))
    extra = {"extra_codes": model_codes} if "extra_codes" in inspect.signature(build_arena).parameters else {}
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    with compile_only_launches(target), mock.patch.object(moe, "multiprocessors", lambda d: 132):
        for lay in plan.layers:
            gu = build_arena([block(x.gate, 2 * i, h) for x in lay.experts], **extra)
            dn = build_arena([block(x.down, h, i) for x in lay.experts], **extra)
            for arena, names in ((gu, [x.gate for x in lay.experts]), (dn, [x.down for x in lay.experts])):
                if plan.method == "gptq-had" and any(get_scheme(s).family != "none" for s in names):
                    arena.rotation_seed = plan.hadamard_seed  # some of its blocks read the rotated input
            for t in DECODE + PREFILL:
                ids = torch.randint(0, e, (t, k), generator=gen)
                moe.mx_moe_forward(torch.randn(t, h).bfloat16(), ids, torch.rand(t, k, generator=gen), gu, dn, e,
                                   torch.rand(t, 1) if shape["shared"] else None)  # fmt: skip
    seconds = time.perf_counter() - t0
    per_kernel = collections.Counter()
    for entry in os.listdir(cache):
        for f in os.listdir(os.path.join(cache, entry)):
            if f.endswith(".cubin"):
                per_kernel[f.removesuffix(".cubin")] += 1
    row = {"label": a.label, "tree": a.tree or "this checkout", "variants": sum(per_kernel.values()),
           "per_kernel": dict(per_kernel), "seconds": round(seconds, 1), "triton": triton.__version__,
           "plan": a.plan, "shape": a.shape, "batch_sizes": len(DECODE) + len(PREFILL), "cpus": os.cpu_count(),
           "command": "python3 benchmarks/launch_compiles.py " + " ".join(sys.argv[1:])}  # fmt: skip
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"launch_compiles_{name}.json")
    rows = json.load(open(path)) if os.path.isfile(path) else []
    rows = [r for r in rows if r["label"] != a.label] + [row]
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    kernels = sorted({kn for r in rows for kn in r["per_kernel"]})
    md = [f"Kernel variants Triton compiles serving `{a.plan}` ({name}) over {row['batch_sizes']} batch sizes, through "
          f"its own launch path (sm_90, compile only, serial, {row['cpus']} CPUs, Triton {row['triton']}):", "",
          "| label | tree | variants | " + " | ".join(kernels) + " | serial compile s |",
          "|---|---|---:|" + "---:|" * len(kernels) + "---:|"]  # fmt: skip
    md += [f"| {r['label']} | {r['tree']} | {r['variants']} | " + " | ".join(str(r["per_kernel"].get(kn, 0))
           for kn in kernels) + f" | {r['seconds']} |" for r in rows]  # fmt: skip
    md += ["", "Commands:", ""] + [f"    {r['command']}" for r in rows]
    with open(path.removesuffix(".json") + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
