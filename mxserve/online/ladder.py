"""The precision ladder: every expert block pre-quantized in every candidate scheme, on disk.

A swap to a new plan is then a read, not a quantization: no calibration pass
and no GPTQ at swap time. Blocks are quantized by the same code as the offline
quantizer (checkpoint.layerwise_blocks / quantize_experts, same calibration
windows and Hessians, one decoder layer at a time), so a block read from the
ladder is the tensor `mxserve quantize` writes for that scheme. The file is
memory-mapped: a swap reads only the blocks whose scheme changes.

On disk, a directory (format v1)::

    ladder.json          {"format": "mxmoe-ladder", "version": 1, "model_type", "method",
                          "hadamard_seed", "schemes": [...], "data": [...], "nsamples",
                          "layers": [{"layer": 0, "shared": [false, ..., true]}]}
    ladder.safetensors   "{layer}/{scheme}/mx{e}_{gate_up|down}_{qweight|scales|zeros}"

Cost: every block is stored once per scheme, so the ladder takes the sum of
the schemes' bits per weight (about 47 bits with the 8 canonical schemes, bf16
included) over all expert weights; see the README's arithmetic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mxserve.checkpoint import DOWN, GATE_UP, expert_param, layerwise_blocks, quantize_experts, rotation_seed
from mxserve.errors import MxServeError
from mxserve.jsonio import Versioned
from mxserve.models.layerwise import LayerwiseModel
from mxserve.plan import LayerPlan
from mxserve.quant.qlinear import QuantizedLinear, check_method
from mxserve.runtime.moe_layer import QuantizedExpert
from mxserve.schemes import get_scheme

META_FILE = "ladder.json"
TENSOR_FILE = "ladder.safetensors"


@dataclass
class LadderMeta(Versioned):
    model_type: str
    method: str
    hadamard_seed: int
    schemes: list[str]
    data: list[str]
    nsamples: int
    layers: list[dict] = field(default_factory=list)  # [{"layer": i, "shared": [bool per expert]}]

    FORMAT = "mxmoe-ladder"
    VERSION = 1
    WHAT = "precision ladder"

    @classmethod
    def from_json(cls, obj: dict) -> LadderMeta:
        return cls(str(obj["model_type"]), str(obj["method"]), int(obj["hadamard_seed"]), list(obj["schemes"]),
                   list(obj["data"]), int(obj["nsamples"]), list(obj["layers"]))


def _name(layer: int, scheme: str, expert: int, block: str) -> str:
    return f"{layer}/{scheme}/{expert_param(expert, block)}"


def build_ladder(model_path: str, out_dir: str, schemes: list[str], method: str, data: list[str] | None, tokenizer,
                 nsamples: int, hadamard_seed: int = 0, progress: bool = True, device: str = "cpu") -> LadderMeta:
    """Quantize every block of the model at ``model_path`` in every scheme into ``out_dir``
    (written atomically), one decoder layer at a time on ``device`` as `mxserve quantize` does."""
    check_method(method)
    sch = [get_scheme(s) for s in schemes]
    run = LayerwiseModel(model_path, device)
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for i, _, _, blocks in layerwise_blocks(run, method, data, tokenizer, nsamples, progress=progress, desc="ladder"):
        if blocks is None:
            continue
        layers.append({"layer": i, "shared": [b[0].shared for b in blocks]})
        for s in sch:
            idx = [e for e, b in enumerate(blocks) if s.supports(b[1].shape[1]) and s.supports(b[2].shape[1])]
            qes = quantize_experts([blocks[e] for e in idx], [s] * len(idx), [s] * len(idx), method, hadamard_seed)
            for e, qe in zip(idx, qes):
                tensors.update(qe.gate_up.tensors(_name(i, s.name, e, GATE_UP)))
                tensors.update(qe.down.tensors(_name(i, s.name, e, DOWN)))
        del blocks  # before the next layer loads
    meta = LadderMeta(run.model_type, method, hadamard_seed, [s.name for s in sch], list(data or []), nsamples,
                      layers)
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, TENSOR_FILE + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, TENSOR_FILE))
    meta.save(os.path.join(out_dir, META_FILE))  # last: its presence marks a complete ladder
    return meta


class Ladder:
    """A built ladder, memory-mapped; hands out a layer's experts for a layer plan."""

    def __init__(self, path: str):
        meta_path = os.path.join(path, META_FILE)
        if not os.path.isfile(meta_path):
            raise MxServeError(f"{path} holds no precision ladder ({META_FILE} missing)")
        self.path = path
        self.meta = LadderMeta.load(meta_path)
        self._file = safe_open(os.path.join(path, TENSOR_FILE), framework="pt")
        self._names = set(self._file.keys())
        self._shared = {lay["layer"]: lay["shared"] for lay in self.meta.layers}

    @property
    def schemes(self) -> list[str]:
        return self.meta.schemes

    def has(self, layer: int, scheme: str, expert: int) -> bool:
        return _name(layer, scheme, expert, GATE_UP) + "qweight" in self._names

    def _linear(self, layer: int, scheme: str, expert: int, block: str, n: int, k: int) -> QuantizedLinear:
        prefix = _name(layer, scheme, expert, block)
        sc = get_scheme(scheme)
        tensors = {prefix + kind: self._file.get_tensor(prefix + kind) for kind in ("qweight", "scales", "zeros")
                   if prefix + kind in self._names}
        return QuantizedLinear.from_tensors(sc, n, k, tensors, prefix,
                                            rotation_seed(self.meta.method, sc, self.meta.hadamard_seed))

    def experts(self, layer_plan: LayerPlan, hidden: int) -> list[QuantizedExpert]:
        """The layer's experts in the plan's schemes (read from disk; raises MxServeError if absent)."""
        shared = self._shared.get(layer_plan.layer)
        if shared is None or len(shared) != len(layer_plan.experts):
            raise MxServeError(f"the ladder has no layer {layer_plan.layer} with {len(layer_plan.experts)} experts")
        out = []
        for ep in layer_plan.experts:
            s_gu, s_d = ep.gate, ep.down
            for s in (s_gu, s_d):
                if not self.has(layer_plan.layer, s, ep.expert):
                    raise MxServeError(f"the ladder has no {s} for layer {layer_plan.layer} expert {ep.expert}")
            two_i = self._file.get_slice(_name(layer_plan.layer, s_gu, ep.expert, GATE_UP) + "qweight").get_shape()[0]
            out.append(QuantizedExpert(
                self._linear(layer_plan.layer, s_gu, ep.expert, GATE_UP, two_i, hidden),
                self._linear(layer_plan.layer, s_d, ep.expert, DOWN, hidden, two_i // 2),
                shared[ep.expert],
            ))
        return out

    def gate_up_rows(self, layer: int, expert: int) -> int:
        """Rows of an expert's fused gate/up block (2 x its width), read from the file's header."""
        for s in self.schemes:
            name = _name(layer, s, expert, GATE_UP) + "qweight"
            if name in self._names:
                return self._file.get_slice(name).get_shape()[0]
        raise MxServeError(f"the ladder has no layer {layer} expert {expert}")

    def nbytes(self) -> int:
        return os.path.getsize(os.path.join(self.path, TENSOR_FILE))
