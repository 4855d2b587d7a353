"""The dequantization pass of prefill on dequantized weights (mxkernels/dequant.py), alone, per program tile.

Times ``dequant.dequantize`` on both arenas of moe_layer.py's mixed layer (Qwen1.5-MoE's shape by
default; CUDA-graph replays) for each (rows per program, warps), with the bytes it moves (codes,
scales and zeros read, bf16 written) per second beside the copy ceiling measured in the same run:

    python3 benchmarks/dequant_tiles.py --out benchmarks/results/dequant_tiles_h200.md
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from moe_layer import bench_graph, layer_arenas, mixed_plan, random_experts  # noqa: E402

from mxkernels import dequant  # noqa: E402
from mxkernels.shapes import MODEL_SHAPES  # noqa: E402

TILES = [(64, 4), (64, 8), (128, 4), (128, 8), (32, 4), (256, 8)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen1.5-moe-a2.7b", choices=list(MODEL_SHAPES))
    ap.add_argument("--out", help="a Markdown table to write")
    a = ap.parse_args()
    m = MODEL_SHAPES[a.model]
    dev = torch.device("cuda")
    gu, dn = random_experts(m, dev, torch.Generator(device=dev).manual_seed(0))
    ag, ad, bits = layer_arenas(gu, dn, mixed_plan(m["experts"], gu.shape[0], m["top_k"], True, dev))
    scratch = torch.empty(max(map(dequant.scratch_elems, (ag, ad))), dtype=torch.bfloat16, device=dev)
    src = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() / bench_graph(lambda: dst.copy_(src))
    moved = ag.nbytes() + ad.nbytes() + 2 * (dequant.scratch_elems(ag) + dequant.scratch_elems(ad))
    lines = [f"Device: {torch.cuda.get_device_name()}; {a.model}, the mixed {bits:.2f}-bit layer's two arenas; "
             f"copy ceiling {copy / 1e9:.0f} GB/s (read + write).", "",
             "Command: `python3 benchmarks/dequant_tiles.py" + (f" --model {a.model}" if a.model != "qwen1.5-moe-a2.7b"
                                                                else "") + "`", "",
             "| rows per program | warps | us (gate/up + down) | GB/s |", "|---:|---:|---:|---:|"]  # fmt: skip
    for bn, warps in TILES:
        sec = bench_graph(lambda bn=bn, warps=warps: [dequant.dequantize(x, scratch, bn=bn, warps=warps)
                                                       for x in (ag, ad)])
        lines.append(f"| {bn} | {warps} | {sec * 1e6:.0f} | {moved / sec / 1e9:.0f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
