"""How many kernel variants a served layer makes Triton compile (CPU; no GPU needed).

Distinct launch tiles over SGLang's decode batch sizes and a ladder of prefill token counts,
per model shape, and the distinct per-layer kernel code sets of a plan:

    python3 benchmarks/compile_variants.py --plan benchmarks/plans/refmoe-3.25bit.json
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mxkernels.arena import CODE_BF16, CODE_FP8, CODE_WA_INT, CODE_WONLY  # noqa: E402
from mxkernels.moe import expected_active, pick_tiles  # noqa: E402
from mxserve.plan import Plan  # noqa: E402
from mxserve.schemes import get_scheme  # noqa: E402

SHAPES = {"refmoe-25m": (16, 2, 2, 256, 256), "qwen1.5-moe-a2.7b": (60, 4, 4, 2048, 1408)}  # E, k, shared, H, I
DECODE_BS = [1, 2, 4, 8, *range(16, 257, 8)]
PREFILL = [*range(4, 33, 4), *range(48, 257, 16), *range(288, 513, 32), *range(576, 1025, 64),
           *range(1280, 4097, 256), *range(4608, 8193, 512)]  # fmt: skip


def tiles(e: int, k: int, s: int, h: int, i: int, tokens: list[int], sms: int = 132) -> set:
    out = set()
    for t in tokens:
        rows, act = t * (k + s), expected_active(e, s, t * k)
        for n, kk in ((i, h), (h, i)):
            out.add(pick_tiles(rows, act, 128, n, kk, 0b10000, sms))
    return out


def code(name: str) -> int:
    sc = get_scheme(name)
    if sc.family == "none":
        return CODE_BF16
    if name == "w8a8fp8":
        return CODE_FP8
    return CODE_WA_INT[sc.w_bits] if sc.a_bits < 16 else CODE_WONLY[sc.w_bits]


def mask(schemes) -> int:
    out = 0
    for name in schemes:
        out |= 1 << code(name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", action="append", default=[])
    a = ap.parse_args()
    for name, shape in SHAPES.items():
        d, p = tiles(*shape, DECODE_BS), tiles(*shape, PREFILL)
        print(f"{name}: distinct tiles {len(d)} decode ({len(DECODE_BS)} batch sizes), {len(p)} prefill "
              f"({len(PREFILL)} token counts), {len(d | p)} together")  # fmt: skip
    for path in a.plan:
        plan = Plan.load(path)
        sets = {(mask(e.gate for e in lay.experts), mask(e.down for e in lay.experts)) for lay in plan.layers}
        print(f"{path}: {len(plan.layers)} layers, {len(sets)} distinct (gate_up, down) code sets")


if __name__ == "__main__":
    main()
