"""How many waves a served layer's decode launches take on an H100/H200 (CPU; no GPU).

A decode launch whose programs outnumber what the multiprocessors hold at once runs in waves: the last
programs wait for a first one to finish, so a latency-bound launch takes about as many K loops as it has
waves. This records a plan's launches at a few batch sizes as serving makes them (the real launch path,
mxserve.runtime.precompile's recorder, with each launch's grid), compiles each GEMM variant for sm_90
here, reads its registers and shared memory (cuobjdump), and reports programs per multiprocessor that
fit against programs launched:

    python3 benchmarks/decode_waves.py --plan benchmarks/plans/qwen15-24l-3.25bit.json \\
        --shape qwen1.5-moe-a2.7b:hidden=2048,inter=1408,experts=60,top_k=4,shared=4 --tokens 1 2 --out DIR

Registers are Triton's on this machine (the lent GPU's Triton may differ by a few).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from benchmarks.compile_variants import plan_views, write_results  # noqa: E402
from benchmarks.compile_variants import usage as cubin_usage  # noqa: E402
from benchmarks.moe_layer import parse_shape  # noqa: E402
from mxserve.plan import Plan  # noqa: E402
from mxserve.runtime.moe_layer import plan_kernel_codes  # noqa: E402
from mxserve.runtime.precompile import KERNELS, plan_layers, record_variants  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMS = 132  # H100 SXM and H200
# sm_90 limits per multiprocessor (CUDA occupancy calculator): registers, allocated per warp in 256s;
# shared memory, with 1 KB reserved per block; warps and blocks
REGS, REG_UNIT, SMEM, SMEM_RESERVED, WARPS, BLOCKS = 65536, 256, 233472, 1024, 64, 32
GEMMS = ("gemm", "gemm_gluon", "gemm_gluon_fma")


def resident(regs: int, smem: int, warps: int) -> int:
    """Blocks of ``warps`` warps that one sm_90 multiprocessor holds at once."""
    per_warp = -(-regs * 32 // REG_UNIT) * REG_UNIT
    by_regs = (REGS // per_warp) // warps if regs else BLOCKS
    by_smem = SMEM // (smem + SMEM_RESERVED) if smem else BLOCKS
    return min(by_regs, by_smem, WARPS // warps, BLOCKS)


def usage(variant) -> dict:
    """Registers, spills and shared memory of one recorded variant, compiled for sm_90 here."""
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource

    source = GluonASTSource if variant.kernel != "gemm" else ASTSource  # as the kernel's own launch builds it
    c = triton.compile(source(KERNELS[variant.kernel], variant.signature, variant.constexprs, variant.attrs),
                       target=TARGET, options=variant.options)  # fmt: skip
    regs, static_smem, local = cubin_usage(c.asm["cubin"])
    warps = variant.options["num_warps"]
    smem = static_smem + c.metadata.shared
    return {"regs": regs, "spill_bytes": local, "smem": smem, "warps": warps, "resident": resident(regs, smem, warps)}


def constexpr(variant, name: str):
    names = variant.names()
    return variant.constexprs.get((names.index(name),)) if name in names else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--shape", required=True, type=parse_shape,
                    help="NAME:hidden=H,inter=I,experts=E,top_k=K[,shared=S] (the plan's model)")  # fmt: skip
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", help="folder for decode_waves_NAME.json / .md")
    a = ap.parse_args()
    plan = Plan.load(a.plan)
    name, shape = a.shape
    # every layer compiles the model's code set: the first one launches what they all launch
    layer = plan_layers(plan, plan_views(plan, shape))[0]
    codes = plan_kernel_codes(plan)
    rows, seen = [], {}
    for t in a.tokens:
        rec = record_variants([layer], [t], TARGET, SMS, codes)
        variants = {key: v for per in rec.variants.values() for key, v in per.items()}
        for kernel, key, grid in rec.launches:
            if kernel not in GEMMS:
                continue
            v = variants[key]
            if key not in seen:
                seen[key] = usage(v)
            u = seen[key]
            programs = grid[0] * grid[1] * grid[2]
            rows.append({"tokens": t, "kernel": kernel, "gemm": "gate/up" if constexpr(v, "GATE_UP") else "down",
                         "codes": constexpr(v, "CODES"), "grid": list(grid), "programs": programs, **u,
                         "waves": round(programs / (u["resident"] * SMS), 2)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    meta = {"plan": a.plan, "shape": {name: shape}, "triton": triton.__version__, "target": "sm_90", "sms": SMS,
            "command": "python3 benchmarks/decode_waves.py " + " ".join(sys.argv[1:])}  # fmt: skip
    if a.out:
        write_results(a.out, f"decode_waves_{name}", meta, "launches", rows, markdown(meta, rows))


def markdown(meta: dict, rows: list) -> str:
    lines = [f"Decode GEMM launches of one layer of {meta['plan']} ({list(meta['shape'])[0]}), in launch order "
             f"(with the shared experts apart, their launches go first, on a second stream); Triton "
             f"{meta['triton']}, {meta['target']}, {meta['sms']} multiprocessors.", "", f"    {meta['command']}", "",
             "| tokens | kernel | GEMM | codes | grid | programs | registers | shared bytes | warps "
             "| resident per SM | waves |", "|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['kernel']} | {r['gemm']} | {r['codes']:#x} | {tuple(r['grid'])} "
                     f"| {r['programs']} | {r['regs']}{' (spills)' if r['spill_bytes'] else ''} | {r['smem']} "
                     f"| {r['warps']} | {r['resident']} | {r['waves']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
