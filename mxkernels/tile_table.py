"""Tuned launch tiles per GPU, layer shape, scheme class and rows per expert (prefill path).

Chosen on the GPU by ``benchmarks/tune_tiles.py`` and committed as JSON under
``mxkernels/tiles/<gpu>.json``, as SGLang commits its fused_moe configs. Serving
looks them up and never tunes on the hot path. A key the table lacks (or a GPU
without a table) falls back to ``pick_tiles``' rules. The decode layout (up to
DECODE_ROWS rows per expert) is not tuned here: its tiles follow from the split
that fills the GPU.

Both GEMMs of a layer share the entry: they share the routing's row blocks (BM).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from mxkernels.arena import CODE_FP8, CODE_WA_INT

VERSION = 1
REACH = 1  # powers of two of rows per expert over which a tuned entry stands for its neighbours
TABLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiles")
CLASSES = ("weight-only", "fp8", "int-act")  # all-bf16 layers keep their rules: their rounding matches SGLang's
_INT_ACT = sum(1 << c for c in CODE_WA_INT.values())  # w4a4, w8a8: int8 MMA on quantized activations


def codes_class(codes_mask: int) -> str | None:
    """The scheme class a layer's kernel codes fall in (None: all bf16, not tuned)."""
    if codes_mask & _INT_ACT:
        return "int-act"
    if codes_mask & (1 << CODE_FP8):
        return "fp8"
    return None if codes_mask == 1 else "weight-only"


def rows_bucket(rows_per_expert: float) -> int:
    """Power of two at or above the rows per active expert."""
    return 1 << max(0, math.ceil(math.log2(max(rows_per_expert, 1.0))))


@dataclass
class TileEntry:
    hidden: int
    inter: int
    cls: str
    rows: int  # bucket of rows per active expert
    tiles: dict  # Tiles fields: bm, bn, bk, warps, stages, group_m (absent: 0); down_tiles: the down GEMM's own
    seconds: float | None = None  # the winner's measured time (for the record)


@dataclass
class TileTable:
    gpu: str
    entries: list[TileEntry] = field(default_factory=list)
    version: int = VERSION

    def lookup(self, hidden: int, inter: int, cls: str | None, rows_per_expert: float) -> dict | None:
        """The entry's tiles for this layer and class at the nearest tuned bucket (log scale), if
        that is at most REACH powers of two away: a tile tuned for 128 rows per expert is no guide
        at 16 (the rules then pick)."""
        if cls is None:
            return None
        want = math.log2(rows_bucket(rows_per_expert))
        same = [e for e in self.entries if (e.hidden, e.inter, e.cls) == (hidden, inter, cls)
                and abs(math.log2(e.rows) - want) <= REACH]  # fmt: skip
        if not same:
            return None
        return dict(min(same, key=lambda e: (abs(math.log2(e.rows) - want), e.rows)).tiles)

    def to_json(self) -> dict:
        return {"version": self.version, "gpu": self.gpu, "entries": [dataclasses.asdict(e) for e in self.entries]}

    @classmethod
    def from_json(cls, d: dict) -> TileTable:
        if d.get("version") != VERSION:
            raise ValueError(f"tile table version {d.get('version')!r}; this mxkernels reads version {VERSION}")
        return cls(d["gpu"], [TileEntry(**e) for e in d["entries"]], d["version"])

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)


def gpu_slug(device: torch.device) -> str:
    """File name of a GPU's table: its name, lower case, non-alphanumerics as dashes."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "interpreter"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.lru_cache(maxsize=8)
def tile_table(device: torch.device) -> TileTable | None:
    """The committed table of this GPU, or None."""
    path = os.path.join(TABLE_DIR, gpu_slug(device) + ".json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return TileTable.from_json(json.load(f))
