"""How many times a decode launch reads each active expert's weights (CPU; no GPU).

A block of the decode layout holds at most BM of one expert's rows, so an expert routed more rows than that
gets a block per BM rows, and each block's programs read the expert's weights again (unless L2 still holds
them). This takes the expectation over ``benchmarks/moe_layer.py``'s own routing (the same function, uniform
and skewed, drawn here on the CPU), and the shared experts' rows (every token):

    python3 benchmarks/expert_reads.py --models mixtral-8x7b qwen1.5-moe-a2.7b --tokens 16 64 --bm 8 16
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.moe_layer import routing  # noqa: E402
from mxkernels.shapes import MODEL_SHAPES  # noqa: E402


def expected_reads(experts: int, top_k: int, tokens: int, bm: int, skewed: bool, draws: int = 1000,
                   seed: int = 0) -> tuple[float, float]:  # fmt: skip
    """(active routed experts, blocks of them) expected over ``draws`` routings of ``tokens`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    active = blocks = 0
    for _ in range(draws):
        ids, _ = routing(tokens, experts, top_k, skewed, gen, torch.device("cpu"))
        rows = torch.bincount(ids.reshape(-1), minlength=experts)
        active += int((rows > 0).sum())
        blocks += int((-(-rows // bm)).sum())
    return active / draws, blocks / draws


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODEL_SHAPES), choices=list(MODEL_SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=[8, 16, 64])
    ap.add_argument("--bm", nargs="+", type=int, default=[8, 16], help="rows per block")
    ap.add_argument("--draws", type=int, default=1000)
    a = ap.parse_args()
    print("| model | routing | tokens | BM | active routed experts | their blocks | reads per expert | "
          "shared experts' reads |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in a.models:
        m = MODEL_SHAPES[name]
        for skewed in (True, False):
            for t in a.tokens:
                for bm in a.bm:
                    active, blocks = expected_reads(m["experts"], m["top_k"], t, bm, skewed, a.draws)
                    shared = f"{-(-t // bm)}" if m["shared"] else "-"
                    print(f"| {name} | {'skewed' if skewed else 'uniform'} | {t} | {bm} | {active:.2f} | "
                          f"{blocks:.2f} | {blocks / active:.3f} | {shared} |")


if __name__ == "__main__":
    main()
