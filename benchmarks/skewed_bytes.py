"""The weight bytes that a skewed cell of ``benchmarks/moe_layer.py`` reads under its tiered plans (CPU; no GPU).

Until the thirty-fourth session, moe_layer.py's skewed routing drew its order of expert popularity anew at every
draw, while its tiered plans (the mixed plan: the popular half w4, the rest w2; ``--plan`` tiers) ranked the experts
by a probe with an order of its own: the timed draws' popular experts were a random mix of tiers. The routing now takes
one order per expert count (``moe_layer.popularity``). This counts, over draws, the bytes of the experts a launch
reads (active routed experts and the shared ones, codes with their scales) under both, to say how far the skewed cells
measured before the fix undercount:

    python3 benchmarks/skewed_bytes.py --tokens 1 16 64 --draws 8
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.moe_layer import mixed_plan, parse_plan, routing, tiered_plan  # noqa: E402
from mxkernels.shapes import MODEL_SHAPES  # noqa: E402
from mxserve.schemes import get_scheme  # noqa: E402

SERVED = "served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7"  # scripts/device_runs.sh's --plan


def draw_before_fix(t: int, e: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """moe_layer.routing's skewed draw as it was before the fix: its order of popularity from ``gen``."""
    logits = torch.randn(t, e, generator=gen)
    logits = logits + (-torch.log(torch.arange(1, e + 1, dtype=torch.float32)))[torch.randperm(e, generator=gen)]
    return torch.topk(torch.softmax(logits, -1), k)[1]


def layer_bytes(plan: list[str], ids: torch.Tensor, e: int, h: int, i: int) -> float:
    """Bytes of the weights a launch reads: every active routed expert and every shared one, gate/up and down."""
    read = torch.unique(ids).tolist() + list(range(e, len(plan)))
    return sum((get_scheme(plan[x]).bits_per_weight(h) * 2 * i * h + get_scheme(plan[x]).bits_per_weight(i) * h * i)
               / 8 for x in read)  # fmt: skip


def ratio(shape: dict, plan: list[str], tokens: int, draws: int) -> float:
    """Bytes read under the fixed routing over those read under the routing before the fix, summed over ``draws``
    draws of ``tokens`` tokens (the same generator seeds for both)."""
    h, i, e, k = shape["hidden"], shape["inter"], shape["experts"], shape["top_k"]
    fixed = before = 0.0
    for seed in range(draws):
        fixed += layer_bytes(plan, routing(tokens, e, k, True, torch.Generator().manual_seed(seed), "cpu")[0], e, h, i)
        before += layer_bytes(plan, draw_before_fix(tokens, e, k, torch.Generator().manual_seed(seed)), e, h, i)
    return fixed / before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODEL_SHAPES), choices=list(MODEL_SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--plan", type=parse_plan, default=SERVED,
                    help="tiers as moe_layer.py's --plan takes them (default: the device phases' served plan)")
    a = ap.parse_args()
    label, tiers = a.plan
    print(f"| shape | tokens | mixed: bytes fixed / before | {label}: bytes fixed / before |\n|---|---:|---:|---:|")
    for name in a.models:
        m = MODEL_SHAPES[name]
        e, ne, k = m["experts"], m["experts"] + m["shared"], m["top_k"]
        plans = (mixed_plan(e, ne, k, True, "cpu"), tiered_plan(e, ne, k, True, "cpu", tiers))
        for t in a.tokens:
            print(f"| {name} | {t} | " + " | ".join(f"{ratio(m, p, t, a.draws):.3f}" for p in plans) + " |")


if __name__ == "__main__":
    main()
