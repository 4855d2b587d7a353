"""The precision plan: one scheme per (layer, expert, block) (format v1).

JSON form::

    {"format": "mxmoe-plan", "version": 1, "model": ..., "model_type": "qwen2_moe",
     "method": "gptq-had", "hadamard_seed": 0, "budget_bits": 3.25, "r": 1.0,
     "tokens": 64, "granularity": "layer",
     "layers": [{"layer": 0, "experts": [{"expert": 0, "shared": false,
                  "gate": "w4a16g128", "up": "w4a16g128", "down": "w3a16g128"}, ...]}],
     "summary": {"avg_bits": 3.249, "L": 0.0123, "T": 1.2e-4, "schemes": {"w4a16g128": 0.4, ...},
                 "decode_mb_per_token": 929.0, "decode_mb_shared": 610.1, "decode_mb_uniform_w4a16g128": 882.4},
     "data": ["shakespeare-calib.txt", ...]}

The summary is what the planner reports (``decode_mb_*``: planner.decode_reads; absent from plans made
before it). Gate and up always share a scheme: they run as one fused GEMM. Experts are
numbered as in the adapters: routed experts first, then shared-expert slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mxserve.errors import MxServeError
from mxserve.jsonio import Versioned
from mxserve.models.configs import BLOCKS
from mxserve.schemes import Scheme, get_scheme


@dataclass
class ExpertPlan:
    expert: int
    shared: bool
    gate: str
    up: str
    down: str

    def scheme(self, block: str) -> Scheme:
        return get_scheme(getattr(self, block))


@dataclass
class LayerPlan:
    layer: int
    experts: list[ExpertPlan]


@dataclass
class Plan(Versioned):
    model: str
    model_type: str
    method: str
    hadamard_seed: int
    budget_bits: float
    r: float
    tokens: int
    granularity: str
    layers: list[LayerPlan] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    data: list[str] = field(default_factory=list)  # calibration text (GPTQ needs it again to quantize)

    FORMAT = "mxmoe-plan"
    VERSION = 1
    WHAT = "plan"

    @classmethod
    def from_json(cls, obj: dict) -> Plan:
        layers = [LayerPlan(int(lay["layer"]), [ExpertPlan(**e) for e in lay["experts"]]) for lay in obj["layers"]]
        plan = cls(
            model=obj["model"],
            model_type=obj["model_type"],
            method=obj["method"],
            hadamard_seed=int(obj["hadamard_seed"]),
            budget_bits=float(obj["budget_bits"]),
            r=float(obj["r"]),
            tokens=int(obj["tokens"]),
            granularity=obj["granularity"],
            layers=layers,
            summary=dict(obj.get("summary", {})),
            data=list(obj.get("data", [])),
        )
        plan.validate()
        return plan

    def validate(self) -> None:
        if not self.layers:
            raise ValueError("plan has no layers")
        for lay in self.layers:
            for e in lay.experts:
                for b in BLOCKS:
                    e.scheme(b)
                if e.gate != e.up:
                    raise ValueError(f"layer {lay.layer} expert {e.expert}: gate ({e.gate}) and up ({e.up}) differ")

    def layer(self, index: int) -> LayerPlan:
        for lay in self.layers:
            if lay.layer == index:
                return lay
        raise MxServeError(f"plan has no entry for MoE layer {index}")

    def scheme_names(self) -> set[str]:
        return {getattr(e, b) for lay in self.layers for e in lay.experts for b in BLOCKS}

    @classmethod
    def uniform(
        cls,
        model: str,
        model_type: str,
        layout: list[tuple[int, list[bool]]],
        scheme: Scheme,
        method: str,
        hadamard_seed: int = 0,
        data: list[str] | None = None,
    ) -> Plan:
        """Every block of every expert in one scheme; ``layout`` is [(layer, [shared?]*experts)]."""
        layers = [
            LayerPlan(li, [ExpertPlan(e, sh, scheme.name, scheme.name, scheme.name) for e, sh in enumerate(shared)])
            for li, shared in layout
        ]
        return cls(
            model,
            model_type,
            method,
            hadamard_seed,
            scheme.bits_per_weight(),
            1.0,
            0,
            "uniform",
            layers,
            data=list(data or []),
        )
