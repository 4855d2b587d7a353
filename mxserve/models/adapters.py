"""Where the experts and the router live in each supported architecture.

transformers 5 stores every supported model's routed experts the same way
(``mlp.experts.gate_up_proj`` [E, 2I, H] with gate rows first, ``down_proj``
[E, H, I]) behind a router module ``mlp.gate`` that returns
(logits, top-k weights, top-k ids). What differs is the shared expert, which
an :class:`ArchSpec` names. The router module itself is reused, so routing
(softmax/normalisation, DeepSeek's group-limited top-k and scaling) is exactly
the model's own.

Shared experts are experts that receive every token. One whose intermediate
size is a multiple of the routed one is split into routed-sized slices
(SiLU(gate)*up is elementwise over the intermediate dimension and down sums
over it, so the slices add up to the whole); then every expert of a layer has
the same shape, which is what a grouped GEMM wants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mxserve.errors import MxServeError
from mxserve.models.configs import BLOCKS, ArchSpec, arch_spec, supported_text


@dataclass
class ExpertWeights:
    """The three linear blocks of one (possibly virtual) expert, as [out, in] tensors."""

    gate: torch.Tensor  # [I, H]
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]
    shared: bool = False

    def block(self, name: str) -> torch.Tensor:
        return getattr(self, name)

    def shapes(self) -> dict[str, list[int]]:
        return {b: list(self.block(b).shape) for b in BLOCKS}


def join_shared(gate_ups: list[torch.Tensor], downs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The one shared MLP that :meth:`MoELayerView.experts` sliced: from each slice's gate_up
    [2i, H] (gate rows first) and down [H, i], the whole gate_up [2S, H] and down [H, S]."""
    halves = [w.chunk(2) for w in gate_ups]
    return torch.cat([g for g, _ in halves] + [u for _, u in halves]), torch.cat(downs, dim=1)


def expert_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SiLU(x gate^T) * (x up^T) down^T, the expert MLP of every supported model."""
    return nn.functional.linear(nn.functional.silu(nn.functional.linear(x, gate)) * nn.functional.linear(x, up), down)


class BlockRouter(nn.Module):
    """The router of DeepSeek-V2's block before transformers 5.2x (SGLang 0.5.15 pins 5.12): there
    the gate is a plain Linear and the block itself routes (``route_tokens_to_experts``). This
    holds the same weight (same name, ``gate.weight``) and returns (logits, weights, ids) as the
    routers of later versions do, by the block's own routing."""

    _ROUTING = ("top_k", "topk_method", "num_group", "topk_group", "routed_scaling_factor", "num_experts")

    def __init__(self, block: nn.Module):
        super().__init__()
        self.weight = block.gate.weight
        for name in self._ROUTING:
            setattr(self, name, getattr(block, name, None))
        self._route = type(block).route_tokens_to_experts  # reads the attributes above

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = nn.functional.linear(x.float(), self.weight.float())  # fp32, as the block's forward
        ids, weights = self._route(self, logits[None])
        return logits, weights, ids


class MoELayerView:
    """One MoE block of a model: its router, experts and shared experts."""

    def __init__(self, index: int, module: nn.Module, spec: ArchSpec):
        self.index = index
        self.module = module
        self.spec = spec
        if isinstance(module.gate, nn.Linear) and hasattr(module, "route_tokens_to_experts"):
            module.gate = BlockRouter(module)
        self.router: nn.Module = module.gate
        self.n_routed: int = module.experts.gate_up_proj.shape[0]
        self.top_k: int = int(self.router.top_k)
        self.shared_mlp: nn.Module | None = getattr(module, spec.shared) if spec.shared else None
        self.shared_gate: nn.Module | None = getattr(module, spec.shared_gate) if spec.shared_gate else None

    @property
    def hidden(self) -> int:
        return self.module.experts.gate_up_proj.shape[2]

    @property
    def intermediate(self) -> int:
        return self.module.experts.down_proj.shape[2]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (weights [T, k], ids [T, k]) for tokens x [T, H], by the model's own router."""
        _, weights, ids = self.router(x)
        return weights, ids

    def shared_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-token factor [T, 1] on the shared experts' output (None: 1)."""
        if self.shared_gate is None:
            return None
        return torch.sigmoid(self.shared_gate(x))

    def experts(self) -> list[ExpertWeights]:
        """Routed experts 0..E-1, then the shared-expert slices."""
        ex = self.module.experts
        i = self.intermediate
        out = [
            ExpertWeights(ex.gate_up_proj[e, :i], ex.gate_up_proj[e, i:], ex.down_proj[e]) for e in range(self.n_routed)
        ]
        if self.shared_mlp is not None:
            m = self.shared_mlp
            s = m.gate_proj.weight.shape[0]
            step = i if s % i == 0 else s
            for j in range(0, s, step):
                out.append(
                    ExpertWeights(
                        m.gate_proj.weight[j : j + step],
                        m.up_proj.weight[j : j + step],
                        m.down_proj.weight[:, j : j + step],
                        shared=True,
                    )
                )
        return out

    def n_shared(self) -> int:
        return len(self.experts()) - self.n_routed


def model_type(model: nn.Module) -> str:
    return getattr(model.config, "model_type", "?")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise MxServeError(f"cannot find decoder layers in {type(model).__name__}")
    return layers


def layer_view(index: int, layer: nn.Module, spec: ArchSpec) -> MoELayerView | None:
    """The MoE block of one decoder layer (None for a dense layer)."""
    mlp = getattr(layer, "mlp", None)
    experts = getattr(mlp, "experts", None)
    if experts is not None and hasattr(experts, "gate_up_proj") and hasattr(mlp, "gate"):
        return MoELayerView(index, mlp, spec)
    return None


def moe_layers(model: nn.Module) -> list[MoELayerView]:
    """Every MoE block of a supported model; a clear error for anything else."""
    mt = model_type(model)
    spec = arch_spec(mt)
    views = [v for i, layer in enumerate(decoder_layers(model)) if (v := layer_view(i, layer, spec)) is not None]
    if not views:
        raise MxServeError(f"model ({mt}) has no MoE layer; supported: {supported_text()}")
    return views
