"""A calibration profile for a model too large to calibrate here, for speed runs only.

Routing is Zipf-skewed (exponent 1, shuffled per layer); a block's error under a
scheme follows the round-to-nearest law err ~ sensitivity * 4^-bits (bits: the
weight bits, fewer for schemes that also quantize activations), with a
log-normal sensitivity per block. The planner then makes a real mixed plan
with the right layer shapes; its accuracy means nothing (the weights are random).

    python3 benchmarks/synthetic_profile.py --config CONFIG.json --layers 4 --out PROFILE.json
    mxserve plan --profile PROFILE.json --budget 3.25bit --out PLAN.json
"""

from __future__ import annotations

import argparse
import json
import random

from mxserve.profile import CalibrationProfile, ExpertStats, LayerStats
from mxserve.schemes import CANONICAL, get_scheme

EFFECTIVE_BITS = {"w8a8fp8": 6.0, "w4a4": 3.0}  # activation quantization costs about a weight bit or two


def scheme_error(name: str) -> float:
    s = get_scheme(name)
    if s.family == "none":
        return 0.0
    return 4.0 ** -EFFECTIVE_BITS.get(name, float(s.w_bits))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the model's config.json (qwen2_moe or qwen3_moe)")
    ap.add_argument("--layers", type=int, help="MoE layers (default: the config's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    cfg = json.load(open(a.config))
    h, i, e = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"]
    shared = cfg.get("shared_expert_intermediate_size", 0)
    n_shared = shared // i if shared and shared % i == 0 else (1 if shared else 0)
    rng = random.Random(a.seed)
    layers = []
    for li in range(a.layers or cfg["num_hidden_layers"]):
        weights = [1.0 / (r + 1) for r in range(e)]
        rng.shuffle(weights)
        total = sum(weights)
        experts = []
        for ex in range(e + n_shared):
            is_shared = ex >= e
            ish = shared if is_shared and n_shared == 1 else i
            freq = 1.0 if is_shared else cfg["num_experts_per_tok"] * weights[ex] / total
            sens = {b: rng.lognormvariate(0.0, 0.5) * (2.0 if b == "down" else 1.0) for b in ("gate", "up", "down")}
            experts.append(
                ExpertStats(
                    expert=ex,
                    shared=is_shared,
                    shapes={"gate": [ish, h], "up": [ish, h], "down": [h, ish]},
                    freq=freq,
                    routed_tokens=int(freq * 65536),
                    calib_tokens=max(128, int(freq * 65536)),
                    err={b: {s: sens[b] * scheme_error(s) for s in CANONICAL} for b in sens},
                )
            )
        layers.append(LayerStats(li, e, cfg["num_experts_per_tok"], 1.0, experts))
    prof = CalibrationProfile(
        "synthetic:" + cfg.get("model_type", "?"), cfg["model_type"], "rtn", list(CANONICAL), 65536, 512, [], 0, layers
    )
    prof.validate()
    prof.save(a.out)
    print(f"wrote {a.out}: {len(layers)} layers x {e} routed + {n_shared} shared experts")


if __name__ == "__main__":
    main()
