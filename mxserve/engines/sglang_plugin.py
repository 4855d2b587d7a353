"""mxserve inside SGLang: the ``mxmoe`` quantization method of FusedMoE.

SGLang (0.5.15 and later 0.5.x) loads the general plugins of the
``sglang.srt.plugins`` entry-point group early in every process it starts:
the HTTP server, the scheduler and its workers. mxserve declares
:func:`register` there (pyproject.toml; ``mxserve launch`` also makes it
visible when mxserve runs from a source tree), and :func:`register` adds
``mxmoe`` to SGLang's quantization registry. A checkpoint whose config says
``quant_method: mxmoe`` then loads with :class:`MxMoEConfig`; no SGLang file
is patched.

Only the MoE experts are ours: FusedMoE gets :class:`MxMoEMethod`, which
holds the layer's :class:`~mxserve.runtime.moe_layer.MixedExperts` (the same
class the embedded engine runs) and calls the mixed-precision kernels.
Shared experts run in that launch as experts that receive every token, so the
launcher tells SGLang the model has no separate shared MLP
(``shared_expert_intermediate_size: 0``). Attention, norms, router and LM head
stay SGLang's own unquantized layers.
"""

from __future__ import annotations

import os
from typing import Any

import torch

# Only SGLang's base classes here: SGLang imports plugins before its own layers,
# and its MoE layer modules must be imported in SGLang's order (they pull in
# flashinfer), so FusedMoE and the linear classes are imported when first needed.
from sglang.srt.layers.quantization.base_config import FusedMoEMethodBase, QuantizationConfig, QuantizeMethodBase

from mxserve.checkpoint import DOWN, FORMAT_VERSION, GATE_UP, SHARED_GATE, expert_param, read_experts
from mxserve.models.loading import QUANT_METHOD
from mxserve.plan import Plan
from mxserve.runtime.moe_layer import MixedExperts

_KINDS = ("qweight", "scales", "zeros")  # what QuantizedLinear.tensors() may name


def register() -> None:
    """The entry point SGLang calls in each of its processes."""
    from sglang.srt.layers import quantization

    quantization.QUANTIZATION_METHODS.setdefault(QUANT_METHOD, MxMoEConfig)


class MxMoEConfig(QuantizationConfig):
    """Reads ``quantization_config`` of an mxserve checkpoint: the plan says each block's scheme."""

    def __init__(self, plan: Plan):
        super().__init__()
        self.plan = plan

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # bf16 tensor cores; fp8 schemes need 89+ (checked by the kernels)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MxMoEConfig:
        if config.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"mxmoe checkpoint format version {config.get('version')!r}; this mxserve reads {FORMAT_VERSION}"
            )
        path = config.get("plan", "")
        if not os.path.isabs(path):
            raise ValueError(
                "mxmoe: quantization_config.plan must be an absolute path here; start the server with "
                "`mxserve launch --engine sglang`, which sets it"
            )
        return cls(Plan.load(path))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from sglang.srt.layers.linear import LinearBase
        from sglang.srt.layers.moe.fused_moe_triton import FusedMoE
        from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

        if isinstance(layer, FusedMoE):
            return MxMoEMethod(self.plan)
        if isinstance(layer, LinearBase):
            return UnquantizedLinearMethod()
        return None

    def get_scaled_act_names(self) -> list[str]:
        return []


class MxMoEMethod(FusedMoEMethodBase):
    """One FusedMoE layer's experts in their planned schemes.

    The packed tensors differ in shape per scheme and are only known once read,
    so each is registered as an empty placeholder whose loader keeps the tensor
    it is given; :meth:`process_weights_after_loading` builds the experts from them.
    """

    def __init__(self, plan: Plan):
        super().__init__()
        self.plan = plan

    def create_weights(
        self,
        layer: torch.nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        if layer.moe_tp_size > 1 or layer.moe_ep_size > 1:
            raise ValueError("mxmoe runs each expert whole on one GPU: tensor/expert parallel MoE is not supported")
        layer_plan = self.plan.layer(layer.layer_id)
        routed = sum(not ep.shared for ep in layer_plan.experts)
        if routed != num_experts:
            raise ValueError(
                f"mxmoe plan has {routed} routed experts in layer {layer.layer_id}, the model {num_experts}"
            )
        layer.mx_hidden = hidden_size
        layer.mx_loaded = {}

        def keep(param: torch.nn.Parameter, loaded_weight: torch.Tensor, *args, **kwargs) -> None:
            layer.mx_loaded[param.mx_name] = loaded_weight

        names = [SHARED_GATE] + [
            expert_param(ep.expert, block) + kind
            for ep in layer_plan.experts
            for block in (GATE_UP, DOWN)
            for kind in _KINDS
        ]
        for name in names:
            p = torch.nn.Parameter(torch.empty(0, dtype=params_dtype), requires_grad=False)
            p.mx_name = name
            p.weight_loader = keep
            layer.register_parameter(name, p)

    def create_moe_runner(self, layer: torch.nn.Module, moe_runner_config) -> None:
        self.moe_runner_config = moe_runner_config

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        loaded = layer.mx_loaded
        experts = read_experts(loaded, self.plan, layer.layer_id, layer.mx_hidden)
        device = torch.device("cuda", torch.cuda.current_device())
        gate = loaded.get(SHARED_GATE)
        layer.mx_gate = None if gate is None else gate.to(device, torch.bfloat16)  # not a Parameter name
        layer.mx = MixedExperts(layer.layer_id, layer.num_experts, experts)
        layer.mx.arenas(device)  # pack once now, before SGLang captures CUDA graphs
        layer.mx_loaded = {}

    def apply(self, layer: torch.nn.Module, dispatch_output) -> Any:
        from sglang.srt.layers.moe.token_dispatcher import StandardCombineInput

        x = dispatch_output.hidden_states
        topk_weights, topk_ids = dispatch_output.topk_output[:2]
        # SGLang marks padded tokens' slots with -1: route them nowhere (weight 0)
        valid = topk_ids >= 0
        topk_ids = torch.where(valid, topk_ids, 0)
        topk_weights = torch.where(valid, topk_weights, 0)
        # the shared gate in fp32, as SGLang's fused_gate_sigmoid_mul_add computes it
        scale = None if layer.mx_gate is None else torch.sigmoid(x.float() @ layer.mx_gate.float().t())
        return StandardCombineInput(hidden_states=layer.mx.forward(x, topk_ids, topk_weights, scale))
