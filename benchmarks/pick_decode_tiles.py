"""The decode variant of a moe_layer.py run to serve end to end, as an MXSERVE_DECODE_TILES setting.

    python3 benchmarks/pick_decode_tiles.py RESULTS/moe_layer.json --layer "ours served" --tokens 1 8 16 64

Among the layer's variants ("ours served (LABEL)", LABEL a moe_layer.DECODE_VARIANTS entry of tile fields only), the
one whose times against the picked layout's ("ours served"), cell by cell (routing, tokens) of --model, have the
lowest geometric mean, if that is below --below. Prints its setting (e.g. ``bn=64,early=true``) on stdout, nothing if
none is faster, and every candidate's ratio on stderr. So a GPU session that times the variants serves the winner in
the same run (scripts/device_runs.sh, phase 46).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mxkernels.moe import tile_setting  # noqa: E402


def setting(override: dict) -> str | None:
    """A variant's tile fields as MXSERVE_DECODE_TILES text, or None where it sets anything else (a launch mode,
    or a field decode does not take)."""
    parts = []
    for field, value in override.items():
        if field == "down_tiles" and isinstance(value, dict):
            parts += [f"down_tiles.{f}={'picked' if v is None else str(v).lower()}" for f, v in value.items()]
        elif isinstance(value, (bool, int)):
            parts.append(f"{field}={str(value).lower()}")
        else:
            return None
    try:
        [tile_setting(p) for p in parts]
    except ValueError:
        return None
    return ",".join(parts)


def ratios(rows: list[dict], layer: str, model: str, tokens: list[int]) -> dict[str, float]:
    """Per variant label: the geometric mean over (routing, tokens) cells of its time over the picked layout's,
    only over the cells where both were timed."""
    cell = {(r["variant"], r["routing"], r["tokens"]): r["seconds"] for r in rows if r.get("model") == model
            and r["tokens"] in tokens and r.get("seconds")}  # fmt: skip
    out = {}
    for label in sorted({v for v, _, _ in cell if v.startswith(layer + " (") and v.endswith(")")}):
        logs = [math.log(s / cell[(layer, rt, t)]) for (v, rt, t), s in cell.items()
                if v == label and (layer, rt, t) in cell]  # fmt: skip
        if logs:
            out[label[len(layer) + 2 : -1]] = math.exp(sum(logs) / len(logs))
    return out


def pick(rows: list[dict], variants: dict, layer: str, model: str, tokens: list[int], below: float) -> str:
    """The setting of the fastest variant against the picked layout, if below ``below``; else ""."""
    best, best_r = "", below
    for label, r in sorted(ratios(rows, layer, model, tokens).items(), key=lambda kv: kv[1]):
        text = setting(variants[label]) if label in variants else None
        print(f"{label}: {r:.3f}x the picked layout's time" + ("" if text else " (not a tile setting)"),
              file=sys.stderr)  # fmt: skip
        if text and r < best_r:
            best, best_r = text, r
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="moe_layer.py's moe_layer.json")
    ap.add_argument("--layer", default="ours served", help="the layer whose variants compete (its picked layout's row)")
    ap.add_argument("--model", default="qwen1.5-moe-a2.7b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 16, 64])
    ap.add_argument("--below", type=float, default=0.97, help="take a variant only under this ratio")
    a = ap.parse_args()
    try:
        with open(a.results) as f:
            rows = json.load(f)["results"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{a.results}: not a moe_layer.py result ({e})") from None
    from moe_layer import DECODE_VARIANTS

    print(pick(rows, DECODE_VARIANTS, a.layer, a.model, a.tokens, a.below))
    return 0


if __name__ == "__main__":
    sys.exit(main())
