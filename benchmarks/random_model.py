"""A random-weight model from a config.json, for speed runs at real layer shapes.

Qwen1.5-MoE-A2.7B's layers with 4 of its 24 decoder layers
(configs/qwen1.5-moe-a2.7b-4layers.json): every matrix has the real shape, so
per-layer speed is the real model's. Weights are random (normal, std 0.02;
the router std 0.5 so routing is skewed and input-dependent); the tokenizer
is borrowed from refmoe-25m (its ids are a subset of the vocabulary).

    python3 benchmarks/random_model.py --config benchmarks/configs/qwen1.5-moe-a2.7b-4layers.json \\
        --tokenizer ../shared/models/refmoe-25m --out /tmp/qwen15-4l
"""

from __future__ import annotations

import argparse
import os
import shutil

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def build(config: str, seed: int = 0, device: str | None = None):
    """The random-weight model of ``config`` (a config.json path), bf16, on ``device`` (the GPU if any)."""
    torch.manual_seed(seed)
    cfg = AutoConfig.from_pretrained(config)
    with torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            torch.nn.init.normal_(p, std=0.5)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--tokenizer", required=True, help="folder with tokenizer.json to copy")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    model = build(a.config, a.seed)
    cfg = model.config
    model.save_pretrained(a.out)
    for f in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(a.tokenizer, f)):
            shutil.copy(os.path.join(a.tokenizer, f), os.path.join(a.out, f))
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {a.out}: {n / 1e9:.2f} B parameters ({cfg.num_hidden_layers} layers)")


if __name__ == "__main__":
    main()
