"""Checks made before any long work (calibration takes minutes, a real model hours):
each failure is one line on stderr and exit code 2, within a second or two."""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

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
    from mxserve.models.configs import arch_spec, read_config

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


@dataclass(frozen=True)
class Gpus:
    count: int  # the GPUs CUDA shows this process
    free: int  # free bytes on the first of them (0 without one)
    names: tuple[str, ...] = ()  # their models, in CUDA's order


def cuda_order(visible: str | None, uuids: list[str]) -> list[int] | None:
    """The NVML indices of the GPUs CUDA shows, in CUDA's order, for CUDA_VISIBLE_DEVICES ``visible``
    (indices or ``GPU-`` UUID prefixes) over GPUs of these NVML UUIDs; None for MIG instances."""
    if visible is None:
        return list(range(len(uuids)))
    order: list[int] = []
    for entry in visible.split(","):
        entry = entry.strip()
        if entry.startswith("MIG-"):
            return None
        if entry.startswith("GPU-"):
            hits = [i for i, u in enumerate(uuids) if u.startswith(entry)]
            idx = hits[0] if len(hits) == 1 else -1  # an ambiguous prefix is invalid
        else:
            digits = re.match(r"[+-]?\d+", entry)
            idx = int(digits.group()) if digits else -1
            idx = idx if idx < len(uuids) else -1
        if idx < 0:
            break  # CUDA stops at the first invalid entry
        if idx in order:
            return []  # and shows no GPU at all when one repeats
        order.append(idx)
    return order


def nvml_gpus() -> Gpus | None:
    """The GPUs CUDA will show this process, read through NVML (nvidia-ml-py, which SGLang and torch's
    CUDA builds install): no torch import, which took 3 of the launcher's 4 s before SGLang started (H200
    host, 2026-12-04), and no CUDA context, which the launcher would hold (0.5 GB of an H200) as long as
    its server runs. None where NVML cannot say what CUDA will: no NVML, MIG, or GPUs of different models
    that CUDA orders by speed (CUDA_DEVICE_ORDER not PCI_BUS_ID, NVML's order)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no nvidia-ml-py, no driver
        return None
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        if any(_mig_enabled(pynvml, h) for h in handles):
            return None
        names = [_text(pynvml.nvmlDeviceGetName(h)) for h in handles]
        if len(set(names)) > 1 and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
            return None
        uuids = [_text(pynvml.nvmlDeviceGetUUID(h)) for h in handles]
        order = cuda_order(os.environ.get("CUDA_VISIBLE_DEVICES"), uuids)
        if order is None:
            return None
        free = int(pynvml.nvmlDeviceGetMemoryInfo(handles[order[0]]).free) if order else 0
        return Gpus(len(order), free, tuple(names[i] for i in order))
    except Exception:  # noqa: BLE001 - an NVML call this driver lacks: CUDA's answer instead
        return None
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _mig_enabled(pynvml, handle) -> bool:
    try:
        return pynvml.nvmlDeviceGetMigMode(handle)[0] == pynvml.NVML_DEVICE_MIG_ENABLE
    except pynvml.NVMLError:  # not a MIG-capable GPU
        return False


def gpu_count() -> int:
    """How many GPUs CUDA shows this process, through NVML where it can tell, else torch."""
    gpus = nvml_gpus()
    if gpus is not None:
        return gpus.count
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def free_gpu_memory() -> int:
    """Free bytes on the first GPU CUDA shows this process, read through NVML where it can tell
    (nvml_gpus says why); else CUDA's answer, with a context in this process."""
    gpus = nvml_gpus()
    if gpus is not None and gpus.count:
        return gpus.free
    import torch

    return torch.cuda.mem_get_info(0)[0]


def check_gpu_memory(need: int, free: int, what: str) -> None:
    if need > GPU_HEADROOM * free:
        raise MxServeError(f"{what} needs about {need / 2**30:.1f} GiB of weights and the GPU has "
                           f"{free / 2**30:.1f} GiB free: pick a lower budget or a larger GPU")  # fmt: skip
