"""How far greedy decoding of refmoe-25m survives bf16 rounding, on the CPU.

Generates 32 greedy tokens for the serving benchmark's prompts with plain
transformers in fp32 and in bf16, and with mxserve's all-bf16 plan (reference
path) in bf16, and prints where each pair first differs (None: identical).
It tells how much agreement to expect between two correct bf16 MoE
implementations (mxserve on SGLang against plain SGLang).

    .venv/bin/python scripts/bf16_greedy_sensitivity.py
"""

import json
import os

import torch

from mxserve.checkpoint import install_layers, layout, quantize_layers
from mxserve.models.adapters import moe_layers
from mxserve.models.loading import load_model, load_tokenizer
from mxserve.plan import Plan
from mxserve.schemes import get_scheme

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "..", "shared", "models", "refmoe-25m")


def greedy(model, tok, prompts: list[str], dtype: torch.dtype) -> list[list[int]]:
    model = model.to(dtype)
    outs = []
    for p in prompts:
        ids = tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
        outs.append(model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1] :].tolist())
    return outs


def first_diff(x: list[list[int]], y: list[list[int]]) -> list[int | None]:
    return [next((i for i, (p, q) in enumerate(zip(u, v)) if p != q), None) for u, v in zip(x, y)]


def main() -> None:
    prompts = json.load(open(os.path.join(ROOT, "benchmarks", "results", "serving-refmoe.json")))["prompts"]
    tok = load_tokenizer(MODEL)
    hf = load_model(MODEL)
    hf32, hf16 = greedy(hf, tok, prompts, torch.float32), greedy(hf, tok, prompts, torch.bfloat16)
    mx = load_model(MODEL)
    plan = Plan.uniform("refmoe-25m", "qwen2_moe", layout(moe_layers(mx)), get_scheme("bf16"), "rtn")
    install_layers(mx, quantize_layers(mx, plan, progress=False))
    mx16 = greedy(mx, tok, prompts, torch.bfloat16)
    print("first differing token of 32 (None: identical), per prompt:")
    print("transformers fp32 vs transformers bf16:", first_diff(hf32, hf16))
    print("transformers bf16 vs mxserve bf16 plan:", first_diff(hf16, mx16))


if __name__ == "__main__":
    main()
