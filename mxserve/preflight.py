"""Checks made before any long work (calibration takes minutes, a real model hours):
each failure is one line on stderr and exit code 2, within a second or two."""

from __future__ import annotations

import glob
import os
import re

from mxserve.errors import MxServeError

# a Hugging Face repo id: "name" or "org/name" (letters, digits, '-', '_', '.'; no leading dot)
_REPO_ID = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[A-Za-z0-9_][\w.-]*)?$")
GPU_HEADROOM = 0.9  # the weights must leave a tenth of the free memory (KV cache, activations)


def check_model_path(model: str) -> None:
    """A local path that does not exist is named as such, not passed on to the hub (whose
    message would be about a malformed repo id)."""
    if os.path.isdir(model):
        return
    if os.path.exists(model):
        raise MxServeError(f"{model} is a file; --model takes a model directory or a Hugging Face id")
    if not _REPO_ID.match(model) or model.startswith((".", "~")):
        raise MxServeError(f"model directory {model} does not exist")


def check_architecture(model: str) -> None:
    """A local model of an architecture mxserve does not quantize is refused from its config."""
    from mxserve.models.adapters import arch_spec
    from mxserve.models.loading import read_config

    if os.path.isdir(model):
        arch_spec(read_config(model).get("model_type"))


def check_budget(budget: float, schemes: list) -> None:
    """A budget under the cheapest candidate scheme (scales and zeros counted) cannot be met by
    any plan; said before calibrating for it."""
    cheapest = min(schemes, key=lambda s: s.bits_per_weight())
    low = cheapest.bits_per_weight()
    if budget < low:
        raise MxServeError(f"budget {budget:g} bits is below the cheapest candidate scheme ({cheapest.name}, "
                           f"{low:g} bits per weight): no plan fits; the lowest budget is {low:g}bit")  # fmt: skip


_EXPERT = re.compile(r"\.(experts|shared_experts?)\.")  # routed and shared experts (not the shared gate)


def _is_expert(name: str) -> bool:
    return bool(_EXPERT.search(name))


def weight_params(model_dir: str) -> tuple[int, int]:
    """(expert, other) parameter counts of a local model, from its safetensors headers only."""
    from safetensors import safe_open

    experts = other = 0
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                numel = 1
                for d in f.get_slice(name).get_shape():
                    numel *= d
                if _is_expert(name):
                    experts += numel
                else:
                    other += numel
    return experts, other


def served_bytes(model_dir: str, bits: float | None) -> int:
    """Bytes of weights the server will hold: a quantized checkpoint's files as they are; for a
    model still to quantize, its experts at ``bits`` per weight and everything else in bf16."""
    if bits is None:
        return sum(os.path.getsize(p) for p in glob.glob(os.path.join(model_dir, "*.safetensors")))
    experts, other = weight_params(model_dir)
    return int(experts * bits / 8 + other * 2)


def free_gpu_memory(device: int = 0) -> int:
    """Free bytes on a GPU, read through NVML where it is there: asking CUDA makes a context in this
    process, and `mxserve launch` would hold it (0.5 GB on an H200, gone from SGLang's KV cache) as
    long as the server it starts runs."""
    import torch

    try:
        used = torch.cuda.device_memory_used(device)
    except Exception:  # noqa: BLE001 - no NVML (nvidia-ml-py) here: CUDA's answer, with its context
        return torch.cuda.mem_get_info(device)[0]
    return torch.cuda.get_device_properties(device).total_memory - used


def check_gpu_memory(need: int, free: int, what: str) -> None:
    if need > GPU_HEADROOM * free:
        raise MxServeError(f"{what} needs about {need / 2**30:.1f} GiB of weights and the GPU has "
                           f"{free / 2**30:.1f} GiB free: pick a lower budget or a larger GPU")  # fmt: skip
