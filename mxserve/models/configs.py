"""What a model directory says of itself before any weight is loaded: its config.json, whether it
is an mxserve checkpoint, and where its architecture keeps the experts (:class:`ArchSpec`).

No torch here: `mxserve launch` reads these before it starts SGLang, and importing torch took 3 of
the launcher's 4 s there (H200 host, 2026-12-04, benchmarks/startup_profile.py).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from mxserve.errors import MxServeError

QUANT_METHOD = "mxmoe"  # quantization_config.quant_method of an mxserve checkpoint
FORMAT_VERSION = 2  # its layout; v2: expert tensors under mlp.experts (v1: mlp.mx)
PLAN_FILE = "mxmoe_plan.json"  # the plan it was quantized to, beside config.json


def read_config(path: str) -> dict:
    """config.json of a local model directory as a dict (MxServeError if absent or corrupt)."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise MxServeError(f"{path}: no config.json here; --model takes a model directory or a Hugging Face id")
    try:
        with open(cfg_file) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise MxServeError(f"{cfg_file}: cannot read config ({e})") from None


def is_quantized_checkpoint(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    qc = read_config(path).get("quantization_config") or {}
    return qc.get("quant_method") == QUANT_METHOD


BLOCKS = ("gate", "up", "down")


@dataclass(frozen=True)
class ArchSpec:
    shared: str | None = None  # attribute of the MoE block holding the shared MLP
    shared_gate: str | None = None  # attribute of a Linear(H, 1) whose sigmoid scales it
    # the MoE block's name in checkpoints and in SGLang's model (transformers 5 calls it mlp)
    stored_block: str = "mlp"


ARCHS: dict[str, ArchSpec] = {
    "qwen2_moe": ArchSpec(shared="shared_expert", shared_gate="shared_expert_gate"),
    "qwen3_moe": ArchSpec(),
    "mixtral": ArchSpec(stored_block="block_sparse_moe"),
    "olmoe": ArchSpec(),
    "deepseek_v2": ArchSpec(shared="shared_experts"),
}


def supported_text() -> str:
    return "Qwen2-MoE (qwen2_moe), Qwen3-MoE (qwen3_moe), Mixtral (mixtral), OLMoE (olmoe), DeepSeek-V2 (deepseek_v2)"


_MODULE_BLOCK = re.compile(r"^(model\.layers\.\d+\.)mlp\.")
_STORED_BLOCK = re.compile(r"^(model\.layers\.\d+\.)block_sparse_moe\.")


def stored_name(name: str, spec: ArchSpec) -> str:
    """A transformers 5 tensor name as checkpoints (and SGLang) name it: Mixtral's MoE block
    is ``block_sparse_moe``."""
    return _MODULE_BLOCK.sub(rf"\g<1>{spec.stored_block}.", name) if spec.stored_block != "mlp" else name


def module_name(name: str) -> str:
    """A checkpoint tensor name as transformers 5 names the module's tensor."""
    return _STORED_BLOCK.sub(r"\g<1>mlp.", name)


def arch_spec(model_type: str) -> ArchSpec:
    if model_type not in ARCHS:
        raise MxServeError(f"unsupported architecture {model_type!r}; supported: {supported_text()}")
    return ARCHS[model_type]
