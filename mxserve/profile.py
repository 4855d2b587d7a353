"""The calibration profile: per-block sensitivity and routing frequency (format v1).

For every MoE layer, expert and block (gate, up, down) and every candidate
scheme, ``err`` is the mean, over the tokens routed to that expert, of the
squared norm of the change of the MoE layer's output when only that block is
quantized: ||w_t (y'_t - y_t)||^2 with w_t the routing weight. The routing
frequency ``freq`` (share of tokens routed to the expert; shared experts 1) is
kept apart, so the expected per-token error of a layer under any routing
distribution is sum_e freq_e * err_e, and a new distribution re-weights it
without re-running calibration. ``out_energy`` (mean ||y_t||^2 of the layer
output) puts layers on one scale.

JSON form::

    {"format": "mxmoe-calibration", "version": 1, "model": ..., "model_type": ...,
     "method": "gptq-had", "schemes": [...], "tokens": 65536, "seq_len": 512,
     "data": [...], "hadamard_seed": 0,
     "layers": [{"layer": 0, "n_routed": 16, "top_k": 2, "out_energy": 1.2,
                 "experts": [{"expert": 0, "shared": false,
                              "shapes": {"gate": [I, H], "up": [I, H], "down": [H, I]},
                              "freq": 0.12, "routed_tokens": 7864, "calib_tokens": 4096,
                              "err": {"gate": {"w4a16g128": 1e-4, ...}, "up": {...}, "down": {...}}}]}]}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mxserve.jsonio import Versioned
from mxserve.models.configs import BLOCKS


@dataclass
class ExpertStats:
    expert: int
    shared: bool
    shapes: dict[str, list[int]]
    freq: float
    routed_tokens: int
    calib_tokens: int
    err: dict[str, dict[str, float]]

    def params(self, block: str) -> int:
        n, k = self.shapes[block]
        return n * k


@dataclass
class LayerStats:
    layer: int
    n_routed: int
    top_k: int
    out_energy: float
    experts: list[ExpertStats]


@dataclass
class CalibrationProfile(Versioned):
    model: str
    model_type: str
    method: str
    schemes: list[str]
    tokens: int
    seq_len: int
    data: list[str]
    hadamard_seed: int
    layers: list[LayerStats] = field(default_factory=list)

    FORMAT = "mxmoe-calibration"
    VERSION = 1
    WHAT = "calibration profile"

    @classmethod
    def from_json(cls, obj: dict) -> CalibrationProfile:
        layers = [
            LayerStats(
                layer=int(lay["layer"]),
                n_routed=int(lay["n_routed"]),
                top_k=int(lay["top_k"]),
                out_energy=float(lay["out_energy"]),
                experts=[ExpertStats(**e) for e in lay["experts"]],
            )
            for lay in obj["layers"]
        ]
        prof = cls(
            model=obj["model"],
            model_type=obj["model_type"],
            method=obj["method"],
            schemes=list(obj["schemes"]),
            tokens=int(obj["tokens"]),
            seq_len=int(obj["seq_len"]),
            data=list(obj["data"]),
            hadamard_seed=int(obj["hadamard_seed"]),
            layers=layers,
        )
        prof.validate()
        return prof

    def validate(self) -> None:
        if not self.layers:
            raise ValueError("no layers")
        for lay in self.layers:
            for e in lay.experts:
                for b in BLOCKS:
                    if len(e.shapes[b]) != 2:
                        raise ValueError(f"layer {lay.layer} expert {e.expert}: bad shape for {b}")
                    missing = [s for s in self.schemes if s in e.err[b] and e.err[b][s] is None]
                    if missing:
                        raise ValueError(f"layer {lay.layer} expert {e.expert} {b}: no error for {missing}")
