"""A 4-bit GPTQ-format copy of a model: the checkpoint a user would serve on SGLang's Marlin MoE.

The serving baseline of issue 10 is SGLang serving "a 4-bit GPTQ-format copy of the same model on
Marlin". This writes one from a bf16 checkpoint, one decoder layer per safetensors shard:

- the MLP linears (routed experts, shared experts, dense MLPs; not the routers) as GPTQ's v1
  checkpoint format: symmetric 4 bits, groups of 128 along the input, no act order (``qweight``
  [K/8, N] int32, ``scales`` [K/128, N] fp16, ``qzeros`` [K/128, N/8] int32 holding zero - 1,
  ``g_idx`` [K]). SGLang converts such a checkpoint to ``gptq_marlin`` and runs its MoE on
  ``fused_marlin_moe``;
- attention stays unquantized, as in mxserve's checkpoints (a ``dynamic`` rule tells SGLang so),
  unless ``--attention`` quantizes its q/k/v/o projections too;
- in fp16, as GPTQ's exports are (``torch_dtype`` float16): SGLang 0.5.15's Marlin MoE holds the
  scales in fp16 whatever the model's dtype and asserts the activations match, so a bf16 GPTQ
  checkpoint fails at its first forward (``moe_wna16_marlin_gemm assumes hidden_states.dtype
  (torch.bfloat16) == w1_scale.dtype (torch.float16)``, H200, 2026-12-03);
- codes by round to nearest, not GPTQ's error feedback: the copy is a speed baseline (on random
  weights accuracy says nothing); the format is GPTQ's.

``--dequantized DIR`` also writes the fp16 model holding the same dequantized weights. Plain
SGLang's greedy text on it against the GPTQ copy's checks the format on a GPU.

    python3 benchmarks/gptq_copy.py --model /tmp/qwen15 --out /tmp/qwen15-gptq --device cuda
    python3 benchmarks/serving.py --model /tmp/qwen15 --sglang-ckpt gptq=/tmp/qwen15-gptq ...
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mxserve.models.layerwise import CheckpointTensors  # noqa: E402
from mxserve.quant.packing import pack  # noqa: E402

BITS, GROUP = 4, 128
ZERO = 1 << (BITS - 1)  # symmetric: codes 0..15 around 8
DTYPE = torch.float16  # the copies' dtype (the module docstring says why not bf16)
MLP = re.compile(r"\.(mlp|block_sparse_moe)\..*\b(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
ATTENTION = re.compile(r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight$")
LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [N, K] (0..15) and scales [N, K/128] of a [N, K] weight: GPTQ's symmetric grid
    (scale = 2 max|w| / 15, zero 8), rounded to nearest. Not mxserve's w4a16g128 quantizer: that
    one is asymmetric, and SGLang's GPTQ-Marlin path takes symmetric 4 bits only (uint4b8)."""
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    # codes from the scale as stored (fp16), the one they are read with
    scale = (g.abs().amax(dim=-1) * 2 / (2**BITS - 1)).clamp(min=1e-4).half()
    q = torch.clamp(torch.round(g / scale.float()[..., None]) + ZERO, 0, 2**BITS - 1)
    return q.reshape(n, k).to(torch.uint8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    w = (q.float() - ZERO).reshape(n, k // GROUP, GROUP) * scale.float()[..., None]
    return w.reshape(n, k)


def gptq_tensors(prefix: str, q: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """GPTQ's v1 tensors of one linear from codes [N, K] and scales [N, K/128]: along the input
    dimension eight codes per int32 word, code i at bits 4i (as mxserve's own packing, transposed)."""
    n, k = q.shape
    zeros = torch.full((k // GROUP, n), ZERO - 1, dtype=torch.uint8, device=q.device)  # v1 stores zero - 1
    return {
        f"{prefix}.qweight": pack(q, BITS).t().contiguous(),
        f"{prefix}.scales": scale.t().contiguous(),
        f"{prefix}.qzeros": pack(zeros, BITS),
        f"{prefix}.g_idx": torch.arange(k, dtype=torch.int32, device=q.device) // GROUP,
    }


def convert(model: str, out: str, dequantized: str | None, attention: bool, device: str) -> dict:
    src = CheckpointTensors(model)
    targets = [MLP] + ([ATTENTION] if attention else [])
    shards: dict[str, list[str]] = {}
    for name in src.file_of:
        m = LAYER.match(name)
        shards.setdefault(f"layer-{int(m[1]):03d}" if m else "rest", []).append(name)
    dirs = [d for d in (out, dequantized) if d]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    maps: list[dict[str, str]] = [{} for _ in dirs]
    count = 0
    for i, (shard, names) in enumerate(sorted(shards.items())):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        gptq, plain = {}, {}
        for name in names:
            t = src.get(name, device)
            if any(p.search(name) for p in targets):
                n, k = t.shape
                if k % GROUP or n % 32:  # qzeros packs along N (mxserve's packing: words of 32 bits' worth)
                    raise SystemExit(f"{name}: [{n}, {k}]: the input must split into groups of {GROUP}, the "
                                     "output into multiples of 32")  # fmt: skip
                q, scale = quantize(t)
                gptq.update({k_: v.cpu() for k_, v in gptq_tensors(name[: -len(".weight")], q, scale).items()})
                plain[name] = dequantize(q, scale).to(DTYPE).cpu()
                count += 1
            else:
                gptq[name] = plain[name] = (t.to(DTYPE) if t.is_floating_point() else t).cpu()
        for d, state, weight_map in zip(dirs, (gptq, plain), maps):
            save_file(state, os.path.join(d, file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(state, file))
        src.release()
        print(f"{shard}: {len(names)} tensors", flush=True)
    with open(os.path.join(model, "config.json")) as f:
        config = json.load(f)
    quant = {"quant_method": "gptq", "bits": BITS, "group_size": GROUP, "desc_act": False, "sym": True,
             "lm_head": False, "checkpoint_format": "gptq"}  # fmt: skip
    if not attention:
        quant["dynamic"] = {r"-:.*\.self_attn\..*": {}}  # SGLang: these linears stay unquantized
    config.update(dtype="float16", torch_dtype="float16")  # SGLang reads either key
    for d, cfg, weight_map in zip(dirs, (dict(config, quantization_config=quant), config), maps):
        for f in os.listdir(model):  # tokenizer and generation config
            if not f.endswith(".safetensors") and f not in ("config.json", "model.safetensors.index.json"):
                path = os.path.join(model, f)
                if os.path.isfile(path):
                    shutil.copy(path, os.path.join(d, f))
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    return {"quantized_linears": count, "shards": len(shards)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a local bf16 checkpoint (safetensors)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dequantized", help="also write the bf16 model of the same dequantized weights here")
    ap.add_argument("--attention", action="store_true", help="quantize attention's q/k/v/o projections too")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    print(json.dumps(convert(a.model, a.out, a.dequantized, a.attention, a.device)))


if __name__ == "__main__":
    main()
