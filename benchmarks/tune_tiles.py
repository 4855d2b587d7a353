"""Tune the prefill launch tiles of the MoE layer on this GPU; write mxkernels/tiles/<gpu>.json.

For each model shape, scheme class and token count, every candidate (BM, BN, BK, warps,
stages) is timed with CUDA graphs against the rules' pick (``pick_tiles``), both GEMMs of
the layer included. A candidate that wins by more than ``--min-gain`` becomes the table's
entry for that (shape, class, rows-per-expert bucket); otherwise the rules stay. Serving
reads the table (mxkernels/tile_table.py); it never tunes.

    python3 benchmarks/tune_tiles.py --models qwen1.5-moe-a2.7b mixtral-8x7b --tokens 256 1024 4096 8192
    python3 benchmarks/tune_tiles.py --shape mine:hidden=2048,inter=1408,experts=60,top_k=4,shared=4
    python3 benchmarks/tune_tiles.py --classes fp8 --grid bm=128 bn=128,256 bk=128 warps=8 stages=3,4 group_m=0,8,16
    python3 benchmarks/tune_tiles.py --classes fp8 --grid bm=128 bn=128 bk=128 stages=3 down_tiles.group_m=0,8,16

Classes: ``weight-only`` (the 3.25-bit w4/w2 mix of moe_layer.py), ``fp8`` (w8a8fp8),
``int-act`` (w4a4). Also writes a Markdown report beside the JSON (``--report``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.moe_layer import (  # noqa: E402
    bench_graph,
    layer_arenas,
    mixed_plan,
    parse_shape,
    random_experts,
    routing,
)
from mxkernels.moe import DOWN_FIELDS, expected_active, mx_moe_forward  # noqa: E402
from mxkernels.shapes import MODEL_SHAPES  # noqa: E402
from mxkernels.tile_table import (  # noqa: E402
    TABLE_DIR,
    TileEntry,
    TileTable,
    gpu_slug,
    rows_bucket,
    tile_table,
)

GRID = {"bm": (32, 64, 128), "bn": (64, 128), "bk": (64, 128), "warps": (4, 8), "stages": (3, 4)}
# Tiles fields a --grid may set besides GRID's: the programs taken this many blocks at a time (moe_gemm.py's GROUP_M);
# and "down_tiles.FIELD" for the down GEMM alone (moe.DOWN_FIELDS: a table entry's "down_tiles")
GRID_EXTRA = ("group_m", *(f"down_tiles.{f}" for f in DOWN_FIELDS))


def parse_grid(items: list[str]) -> dict:
    """``KEY=V,V ...`` (GRID's keys or GRID_EXTRA's, integer values) over GRID: the candidates' values per field."""
    grid = dict(GRID)
    for item in items:
        key, _, vals = item.partition("=")
        if key not in (*GRID, *GRID_EXTRA):
            raise SystemExit(f"--grid {item!r}: the fields are {', '.join((*GRID, *GRID_EXTRA))}")
        try:
            grid[key] = tuple(int(v) for v in vals.split(","))
        except ValueError:
            raise SystemExit(f"--grid {item!r}: integer values, as {key}=1,2") from None
    return grid


PLANS = {"fp8": "w8a8fp8", "int-act": "w4a4"}


def _grid(grid: dict) -> list[dict]:
    """Every combination of the grid's values, as tile overrides (a "down_tiles.FIELD" key under "down_tiles")."""
    out = []
    for vals in itertools.product(*grid.values()):
        ov = {k: v for k, v in zip(grid, vals) if not k.startswith("down_tiles.")}
        down = {k.removeprefix("down_tiles."): v for k, v in zip(grid, vals) if k.startswith("down_tiles.")}
        out.append({**ov, "down_tiles": down} if down else ov)
    return out


def candidates(cls: str, grid: dict | None = None) -> list[dict]:
    """The tiles timed for a scheme class. (Weight-only tiles with the weights as the wgmma's A operand
    were timed too and dropped: 13 to 39% slower than the picked ones at 4096 and 8192 tokens on the
    H200, benchmarks/results/moe_layer_h200_s12_prefill.md.)"""
    return _grid(grid or GRID)


def tune_one(name: str, m: dict, cls: str, t: int, dev, gen, min_gain: float,
             grid: dict | None = None) -> tuple[TileEntry | None, str]:  # fmt: skip
    h, i, e, s, k = m["hidden"], m["inter"], m["experts"], m["shared"], m["top_k"]
    ne = e + s
    gu, dn = random_experts(m, dev, gen)
    plan = mixed_plan(e, ne, k, True, dev) if cls == "weight-only" else [PLANS[cls]] * ne
    ag, ad, _ = layer_arenas(gu, dn, plan)
    x = torch.randn(t, h, device=dev, dtype=torch.bfloat16, generator=gen)
    ids, w = routing(t, e, k, True, gen, dev)
    rules = bench_graph(lambda: mx_moe_forward(x, ids, w, ag, ad, e))
    best, best_t = None, rules
    for ov in candidates(cls, grid):
        try:
            sec = bench_graph(lambda ov=ov: mx_moe_forward(x, ids, w, ag, ad, e, **ov))
        except Exception as err:  # noqa: BLE001 - a config that does not fit (shared memory) is skipped
            print(f"  skip {ov}: {str(err).splitlines()[0][:120]}", file=sys.stderr)
            continue
        if sec < best_t:
            best, best_t = ov, sec
    rows = t * (k + s) / expected_active(e, s, t * k)
    times = f"{rules * 1e6:.0f} | {best_t * 1e6:.0f}"
    line = f"| {name} | {cls} | {t} | {rows_bucket(rows)} | {times} | {best or 'rules'} |"
    print(line, flush=True)
    if best is None or best_t > rules * (1 - min_gain):
        return None, line
    return TileEntry(h, i, cls, rows_bucket(rows), best, best_t), line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODEL_SHAPES))
    ap.add_argument("--shape", action="append", type=parse_shape, default=[],
                    help="NAME:hidden=H,inter=I,experts=E,top_k=K[,shared=S], tuned besides --models")  # fmt: skip
    ap.add_argument("--classes", nargs="+", default=["weight-only", "fp8", "int-act"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[256, 1024, 4096, 8192])
    ap.add_argument("--min-gain", type=float, default=0.03, help="a tuned entry must beat the rules by this share")
    ap.add_argument("--grid", nargs="+", default=[], metavar="KEY=V,V",
                    help=f"candidate values per field in place of {GRID} (also: {', '.join(GRID_EXTRA)})")
    ap.add_argument("--out", help="table JSON (default: mxkernels/tiles/<gpu>.json, merged with what is there)")
    ap.add_argument("--report", help="Markdown report (default: beside --out)")
    a = ap.parse_args()
    grid = parse_grid(a.grid)
    if not torch.cuda.is_available():
        raise SystemExit("tune_tiles.py times kernels: it needs a CUDA GPU")
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    out = a.out or os.path.join(TABLE_DIR, gpu_slug(dev) + ".json")
    table = tile_table(dev) or TileTable(torch.cuda.get_device_name(dev))
    shapes = {n: MODEL_SHAPES[n] for n in a.models} | dict(a.shape)
    lines = [f"Tiles on {table.gpu} (`{' '.join(sys.argv)}`): CUDA-graph median us, skewed routing.", "",
             "| model | class | tokens | rows/expert | rules us | best us | best |",
             "|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for name, m in shapes.items():
        for cls in a.classes:
            for t in a.tokens:
                entry, line = tune_one(name, m, cls, t, dev, gen, a.min_gain, grid)
                lines.append(line)
                if entry is not None:
                    key = (entry.hidden, entry.inter, entry.cls, entry.rows)
                    table.entries = [x for x in table.entries if (x.hidden, x.inter, x.cls, x.rows) != key]
                    table.entries.append(entry)
    table.save(out)
    report = a.report or os.path.splitext(out)[0] + ".md"
    with open(report, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out} ({len(table.entries)} entries) and {report}")


if __name__ == "__main__":
    main()
