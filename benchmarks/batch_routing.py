"""How many experts a decode batch reaches: greedy against sampled decoding, any supported model.

A serving benchmark's MoE cost at a batch of B requests depends on how many distinct experts
their B tokens pick per layer. A random-weight model decoded greedily can fall into repeating
one token (often its EOS, with ``ignore_eos``), and then every request of a batch picks the
same experts, which understates what real traffic reads. This decodes ``--prompts`` prompts one
by one for ``--steps`` tokens, records each decode step's top-k per layer (the model's own
routers, through mxserve's adapters), and reports per step and layer the distinct routed experts
the batch of all prompts reaches, and how many distinct tokens each prompt generated.

    python3 benchmarks/batch_routing.py --config benchmarks/configs/qwen1.5-moe-a2.7b-4layers.json \\
        --tokenizer ../shared/models/refmoe-25m --out benchmarks/results/batch-routing-qwen15-4l.json
    python3 benchmarks/batch_routing.py --model ../shared/models/refmoe-25m --out ...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mxserve.models.adapters import moe_layers  # noqa: E402


def decode_routing(model, tokenizer, prompts: list[str], steps: int, temperature: float,
                   seed: int = 0) -> tuple[list[list[list[set[int]]]], list[list[int]]]:  # fmt: skip
    """Per prompt: per decode step, per MoE layer, the set of routed experts its token picked; and the
    tokens fed at those steps (``temperature`` 0: greedy; no stop at EOS: every prompt runs ``steps``)."""
    views = moe_layers(model)
    current: list[set[int]] = []

    def hook(_module, _inputs, out):
        ids = out[2] if isinstance(out, tuple) else out
        if ids.shape[0] == 1:  # a decode step: one token (the prefill's rows are skipped)
            current.append(set(ids.reshape(-1).tolist()))

    handles = [v.router.register_forward_hook(hook) for v in views]
    routing, tokens = [], []
    gen = torch.Generator().manual_seed(seed)
    try:
        for p in prompts:
            ids = tokenizer(p, return_tensors="pt").input_ids
            current.clear()
            out = model(ids, use_cache=True)  # the prefill (not recorded)
            picked = []
            for _ in range(steps):  # no stop at EOS, as a server with ignore_eos; no logits processor
                logits = out.logits[0, -1].float()
                tok = (torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen) if temperature
                       else logits.argmax().reshape(1))  # fmt: skip
                picked.append(int(tok))
                out = model(tok.reshape(1, 1), cache=out.past_key_values, use_cache=True)
            n = len(views)
            routing.append([current[s * n:(s + 1) * n] for s in range(steps)])
            tokens.append(picked)
    finally:
        for h in handles:
            h.remove()
    return routing, tokens


def spread(routing: list[list[list[set[int]]]]) -> dict:
    """Distinct routed experts the whole batch (every prompt's token at one step) reaches, per layer."""
    steps = min(len(r) for r in routing)
    layers = len(routing[0][0])
    per_layer = []
    for layer in range(layers):
        distinct = [len(set().union(*(r[s][layer] for r in routing))) for s in range(steps)]
        per_layer.append(round(statistics.mean(distinct), 2))
    return {"batch": len(routing), "steps": steps, "distinct_experts_per_layer": per_layer,
            "mean": round(statistics.mean(per_layer), 2)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a model folder")
    src.add_argument("--config", help="a config.json: random weights as benchmarks/random_model.py makes them")
    ap.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts decoded, the batch (default 8)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--out", required=True, help="JSON to write")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if a.config:
        import random_model

        model = random_model.build(a.config, device="cpu")
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer or a.model)
    views = moe_layers(model)
    prompts = [f"Once upon a time {i}" for i in range(a.prompts)]  # serving.py's default prompts
    res = {"source": a.model or a.config, "prompts": prompts, "n_routed": views[0].n_routed,
           "top_k": views[0].top_k, "command": "python3 benchmarks/batch_routing.py " + " ".join(sys.argv[1:]),
           "runs": []}  # fmt: skip
    with torch.inference_mode():
        for temp in a.temperatures:
            routing, tokens = decode_routing(model, tokenizer, prompts, a.steps, temp)
            run = {"temperature": temp, **spread(routing),
                   "distinct_tokens_per_prompt": [len(set(t)) for t in tokens],
                   "same_token_at_a_step": round(statistics.mean(
                       len({t[s] for t in tokens}) == 1 for s in range(a.steps)), 2)}  # fmt: skip
            print(json.dumps(run), flush=True)
            res["runs"].append(run)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
