"""mxserve inside SGLang: the ``mxmoe`` quantization method of FusedMoE.

SGLang (0.5.15 and later 0.5.x) loads the general plugins of the
``sglang.srt.plugins`` entry-point group early in every process it starts:
the HTTP server, the scheduler and its workers. mxserve declares
:func:`register` there (pyproject.toml; ``mxserve launch`` also makes it
visible when mxserve runs from a source tree), and :func:`register` adds
``mxmoe`` to SGLang's quantization registry. A checkpoint whose config says
``quant_method: mxmoe`` then loads with :class:`MxMoEConfig`; no SGLang file
is patched.

Routing counts and the precision of every block reach SGLang's own
``/metrics``: each layer is attached to the scheduler process's RouterStats
(router_stats.service), which writes prometheus_client's multiprocess files
that SGLang's metrics endpoint reads (``--enable-metrics``, set by
``mxserve launch``); the series are the embedded engine's.

Over several GPUs (SGLang's tensor and expert parallel) every rank reads the
whole layer and keeps its part (parallel/sharding.rank_experts); SGLang's
all-reduce adds the ranks' outputs. Rank 0 of the layer's MoE group exports the
whole layer's statistics (parallel/stats.py).

Only the MoE experts are ours: FusedMoE gets :class:`MxMoEMethod`, which
holds the layer's :class:`~mxserve.runtime.moe_layer.MixedExperts` (the same
class the embedded engine runs) and calls the mixed-precision kernels.
Shared experts run in that launch as experts that receive every token, so the
launcher tells SGLang that Qwen2-MoE has no separate shared MLP
(``shared_expert_intermediate_size: 0``); DeepSeek-V2's shared MLP cannot be
left out of SGLang's model, so its linears get :class:`SharedInLaunch`, which
holds no weights and adds zeros. Attention, norms, router and LM head stay SGLang's own
unquantized layers. A routed scaling factor (DeepSeek-V2) is applied where
SGLang's own fused MoE applies it: to the routed experts' sum, not the shared
experts' output.

A layer the plan leaves wholly in bf16 (every block of every expert, shared
ones included) has nothing to gain from a mixed-precision kernel. By default
(``bf16_layers: sglang`` in the quantization config) it runs the way SGLang
runs an unquantized Qwen2-MoE layer, as SGLang's own quantization methods hand
their skipped layers to ``UnquantizedFusedMoEMethod``: SGLang's fused MoE for
the routed experts; its unquantized linears, ``SiluAndMul`` and
``fused_gate_sigmoid_mul_add`` for the shared expert. An all-bf16 plan then
computes exactly what plain SGLang computes. ``bf16_layers: kernel`` sends such
layers through the mixed-precision kernel as well (to measure that kernel).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

# Only SGLang's base classes here: SGLang imports plugins before its own layers,
# and its MoE layer modules must be imported in SGLang's order (they pull in
# flashinfer), so FusedMoE and the linear classes are imported when first needed.
from sglang.srt.layers.quantization.base_config import (
    FusedMoEMethodBase,
    LinearMethodBase,
    QuantizationConfig,
    QuantizeMethodBase,
)

from mxkernels.moe import topk_grid_on, topk_rows_on
from mxkernels.pdl import pdl
from mxkernels.router import enabled as router_fused
from mxserve.checkpoint import DOWN, GATE_UP, SHARED_GATE, expert_param, read_experts
from mxserve.engines import BF16_LAYERS, sglang_swap
from mxserve.engines.block_hooks import BlockHooks
from mxserve.models.adapters import join_shared
from mxserve.models.configs import FORMAT_VERSION, QUANT_METHOD
from mxserve.parallel.sharding import rank_experts
from mxserve.parallel.stats import CountingDispatcher, WholeLayer
from mxserve.plan import LayerPlan, Plan
from mxserve.runtime.moe_layer import MixedExperts, QuantizedExpert, plan_kernel_codes
from router_stats import process_stats

log = logging.getLogger(__name__)
_KINDS = ("qweight", "scales", "zeros")  # what QuantizedLinear.tensors() may name


def register() -> None:
    """The entry point SGLang calls in each of its processes."""
    from sglang.srt.layers import quantization

    quantization.QUANTIZATION_METHODS.setdefault(QUANT_METHOD, MxMoEConfig)


class MxMoEConfig(QuantizationConfig):
    """Reads ``quantization_config`` of an mxserve checkpoint: the plan says each block's scheme."""

    def __init__(self, plan: Plan, bf16_layers: str = "sglang"):
        super().__init__()
        if bf16_layers not in BF16_LAYERS:
            raise ValueError(f"mxmoe: bf16_layers is {bf16_layers!r}; one of {', '.join(BF16_LAYERS)}")
        self.plan = plan
        self.bf16_layers = bf16_layers

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
        return cls(Plan.load(path), config.get("bf16_layers", "sglang"))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from sglang.srt.layers.linear import LinearBase
        from sglang.srt.layers.moe.fused_moe_triton import FusedMoE
        from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

        if isinstance(layer, FusedMoE):
            return MxMoEMethod(self.plan, self.bf16_layers == "sglang")
        if isinstance(layer, LinearBase):
            return SharedInLaunch() if SHARED_MLP_PREFIX in prefix else UnquantizedLinearMethod()
        return None

    def get_scaled_act_names(self) -> list[str]:
        return []


SHARED_MLP_PREFIX = ".shared_experts."  # DeepSeek-V2's separate shared MLP (Qwen2-MoE's is "shared_expert")
# Work on entry to the MoE blocks (block_hooks.py): the router fused into one launch on a block's first entry
# (sglang_router.py; the default since the twenty-second session's end-to-end run beside SGLang's router: 4% more
# tokens/s at 1 request, 2.5% at 8; benchmarks/README.md; MXSERVE_FUSED_ROUTER=0 keeps SGLang's router), and on
# every entry what needs no routing (_start_early)
_BLOCKS = BlockHooks()
_SAID: set[str] = set()  # what the log said is on (once per process)


def _say(what: str, line: str) -> None:
    if what not in _SAID:
        _SAID.add(what)
        log.warning("mxserve: %s", line)


def _fuse_router(layer: torch.nn.Module) -> None:
    """Have ``layer``'s MoE block route small forwards in one launch (sglang_router.fuse_router), from its
    first forward on (an eager one: SGLang warms up before capturing)."""
    from mxserve.engines.sglang_router import fuse_router

    _say("router", "MoE routers fused into one launch at decode (MXSERVE_FUSED_ROUTER=0: SGLang's)")
    _BLOCKS.on_first(layer, fuse_router)


def _start_early(layer: torch.nn.Module, shared: bool) -> None:
    """Have ``layer``'s MoE block, as soon as it is entered, launch what needs no routing: for a forward taking the
    top-k's rows straight on stream-K (one token: MXSERVE_TOPK_ROWS; more: MXSERVE_TOPK_GRID), stream-K's zero
    fill, beside the router; else, with ``shared``
    (MXSERVE_SHARED_EARLY=1), its shared experts, on their own stream, beside the router's product, its top-k and
    the alignment, as SGLang runs its own shared MLP (MixedExperts.start_early). CUDA-graph captures hold the early
    launches.

    MXSERVE_SHARED_EARLY stays opt-in: its one timed round lost at 8 and 32 requests while its traced steps ran
    faster (benchmarks/README.md, eleventh session), and from 2 tokens at 8 requests it served 0.98x the default
    with the same decode rate (forty-third session)."""
    if shared:
        _say("shared", "the shared experts launch early (MXSERVE_SHARED_EARLY=1), as their MoE block starts "
             "(one token: the top-k's rows, where they apply)")  # fmt: skip
    else:
        said = ["one-token forwards take the top-k's rows straight, with no alignment launch (MXSERVE_TOPK_ROWS=0: "
                "aligned)"] if topk_rows_on() else []  # fmt: skip
        if topk_grid_on():
            said.append("decode forwards of more tokens take the routed slots straight from the top-k "
                        "(MXSERVE_TOPK_GRID=0: aligned)")  # fmt: skip
        _say("topk", "; ".join(said))

    def start(block: torch.nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
            x = args[0]  # the block's hidden states, which its experts get (the same memory, as [T, H])
            layer.mx.start_early(x.reshape(-1, x.shape[-1]), layer.top_k, shared)

    _BLOCKS.on_each(layer, start)


class SharedInLaunch(LinearMethodBase):
    """A linear of DeepSeek-V2's shared-experts MLP, whose experts run in the MoE launch instead.

    SGLang 0.5.15's DeepseekV2MoE calls that MLP whenever it has not fused the shared experts
    into its own MoE kernel (it fuses them only for DeepSeek-V3's 256 experts), even when told
    the model has none; so the MLP stays, holds no weights, and adds zeros."""

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        # SGLang reads the dtype of ``weight``; empty, so nothing is kept or loaded
        layer.register_parameter("weight", torch.nn.Parameter(torch.empty(0, dtype=params_dtype), requires_grad=False))
        layer.mx_out = sum(output_partition_sizes)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], layer.mx_out)


def _wholly_bf16(layer_plan: LayerPlan) -> bool:
    return all(ep.scheme(block).family == "none" for ep in layer_plan.experts for block in ("gate", "up", "down"))


class MxMoEMethod(FusedMoEMethodBase):
    """One FusedMoE layer's experts in their planned schemes.

    The packed tensors differ in shape per scheme and are only known once read,
    so each is registered as an empty placeholder whose loader keeps the tensor
    it is given; :meth:`process_weights_after_loading` builds the experts from them.
    With ``sglang_for_bf16`` a wholly-bf16 layer runs SGLang's unquantized method
    (``self.unquant``) on weights copied from those tensors.
    """

    def __init__(self, plan: Plan, sglang_for_bf16: bool = True):
        super().__init__()
        self.plan = plan
        self.sglang_for_bf16 = sglang_for_bf16
        self.unquant = None  # SGLang's UnquantizedFusedMoEMethod, for a wholly-bf16 layer
        self.shared_mlp = None

    def create_weights(
        self,
        layer: torch.nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        layer_plan = self.plan.layer(layer.layer_id)
        routed = sum(not ep.shared for ep in layer_plan.experts)
        if routed != num_experts * layer.moe_ep_size:  # SGLang passes this rank's routed experts
            raise ValueError(f"mxmoe plan has {routed} routed experts in layer {layer.layer_id}, the model "
                             f"{num_experts * layer.moe_ep_size}")  # fmt: skip
        layer.mx_hidden = hidden_size
        layer.mx_loaded = {}
        layer.mx_has_shared = routed < len(layer_plan.experts)

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
        if self.sglang_for_bf16 and _wholly_bf16(layer_plan) and sglang_swap.ladder() is None:
            from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod

            # built as FusedMoE builds it for a layer without quantization
            self.unquant = UnquantizedFusedMoEMethod(
                layer.use_triton_kernels, layer.use_flashinfer_trtllm_moe, layer.use_deep_gemm
            )
            self.unquant.create_weights(
                layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **extra_weight_attrs
            )

    def create_moe_runner(self, layer: torch.nn.Module, moe_runner_config) -> None:
        self.moe_runner_config = moe_runner_config
        if self.unquant is not None:
            if layer.mx_has_shared:
                # as SGLang's Qwen2-MoE block: its shared-expert gate reads the hidden states after the experts
                moe_runner_config.inplace = False
            self.unquant.create_moe_runner(layer, moe_runner_config)
            self.runner = self.unquant.runner

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        loaded = layer.mx_loaded
        whole = read_experts(loaded, self.plan, layer.layer_id, layer.mx_hidden)
        n_routed = sum(not e.shared for e in whole)
        # every rank reads the whole layer and keeps its part: its experts (EP), its slice of each (TP)
        experts, n_local = rank_experts(whole, n_routed, layer.layer_id, layer.moe_ep_rank, layer.moe_ep_size,
                                        layer.moe_tp_rank, layer.moe_tp_size)  # fmt: skip
        device = torch.device("cuda", torch.cuda.current_device())
        gate = loaded.get(SHARED_GATE)
        layer.mx_gate = None if gate is None else gate.to(device, torch.bfloat16)  # not a Parameter name
        layer.mx = MixedExperts(layer.layer_id, n_local, experts, plan_kernel_codes(self.plan))  # one variant/model
        layer.mx.counter.to(device)  # on the GPU before SGLang captures CUDA graphs, which then count
        ranks = (layer.moe_ep_rank, layer.moe_ep_size, layer.moe_tp_rank, layer.moe_tp_size)
        view = None
        if ranks[1] == ranks[3] == 1:
            process_stats(layer.mx, self.plan.budget_bits, self.plan.method)  # export through SGLang's /metrics
        else:
            # over several GPUs the whole layer's blocks (for swaps), and one rank exports for the
            # layer, counting the router's global ids as they enter SGLang's dispatcher (parallel/stats.py)
            view = WholeLayer(layer.layer_id, n_routed, whole)
            layer.mx.counting = False  # this rank's own ids are not the layer's
            if layer.moe_ep_rank == layer.moe_tp_rank == 0:
                view.counter.to(device)
                layer.dispatcher = CountingDispatcher(layer.dispatcher, view.counter)
                process_stats(view, self.plan.budget_bits, self.plan.method)
        lad = sglang_swap.ladder()
        if lad is not None:  # re-planning on: a fixed slab, so swaps copy in place under CUDA graphs
            seed = self.plan.hadamard_seed if self.plan.method == "gptq-had" else None
            layer.mx.fix_capacity(self.plan.budget_bits, lad.schemes, seed)
            sglang_swap.register_layer(layer.mx, self.plan, view, ranks if view is not None else None)
        if self.unquant is not None:
            routed = [e for e in experts if not e.shared]
            # bf16 blocks store the plain weight [N, K]; gate_up holds gate rows, then up rows
            gate_up = torch.stack([e.gate_up.qweight for e in routed])
            if self.unquant.load_up_proj_weight_first:  # FlashInfer CUTLASS wants up first
                gate_up = torch.cat(gate_up.chunk(2, dim=1)[::-1], dim=1)
            _copy_weight(layer.w13_weight, gate_up)
            _copy_weight(layer.w2_weight, torch.stack([e.down.qweight for e in routed]))
            self.unquant.process_weights_after_loading(layer)
            shared = [e for e in experts if e.shared]
            if shared:
                self.shared_mlp = _SharedMLP(shared, device)
                if layer.mx_gate is not None:
                    layer.mx_gate = layer.mx_gate.reshape(-1).contiguous()  # [H], as the fused gate op takes it
        else:
            layer.mx.arenas(device)  # pack once now, before SGLang captures CUDA graphs
            if layer.mx_has_shared and ranks[1] == ranks[3] == 1 and os.environ.get("MXSERVE_SHARED_EARLY") == "1":
                _start_early(layer, True)
            elif ranks[1] == ranks[3] == 1 and (topk_rows_on() or topk_grid_on()):
                _start_early(layer, False)
            if router_fused():
                _fuse_router(layer)
            if pdl(device):
                _say("pdl", "decode MoE launches are programmatic dependent launches (MXSERVE_PDL=1)")
        layer.mx_loaded = {}

    def apply(self, layer: torch.nn.Module, dispatch_output) -> Any:
        from sglang.srt.layers.moe.token_dispatcher import StandardCombineInput

        x = dispatch_output.hidden_states
        topk_weights, topk_ids = dispatch_output.topk_output[:2]
        if self.unquant is not None:
            return self._apply_unquantized(layer, dispatch_output, x, topk_ids)
        factor = self.moe_runner_config.routed_scaling_factor
        if factor is not None and factor != 1.0:  # SGLang's runner scales the routed sum; the topk left it to us
            topk_weights = topk_weights * factor
        # the shared gate in fp32 inside the top-k sum, as SGLang's fused_gate_sigmoid_mul_add computes it
        out = layer.mx.forward(x, topk_ids, topk_weights, shared_gate=layer.mx_gate)
        return StandardCombineInput(hidden_states=out)

    def _apply_unquantized(
        self, layer: torch.nn.Module, dispatch_output, x: torch.Tensor, topk_ids: torch.Tensor
    ) -> Any:
        """SGLang's Qwen2-MoE block, op for op: shared MLP, routed experts, fused sigmoid-gate add."""
        from sglang.srt.layers.elementwise import fused_gate_sigmoid_mul_add

        layer.mx.record(topk_ids)
        shared = None if self.shared_mlp is None else self.shared_mlp(x)
        out = self.unquant.apply(layer, dispatch_output)
        if shared is not None and layer.mx_gate is not None:
            fused_gate_sigmoid_mul_add(x, layer.mx_gate, shared, out.hidden_states)
        elif shared is not None:
            out.hidden_states.add_(shared)
        return out


def _copy_weight(param: torch.nn.Parameter, w: torch.Tensor) -> None:
    """Experts' weights [E, N, K] into SGLang's parameter, which the triton_kernels backend holds as [E, K, N]."""
    param.data.copy_(w if param.shape == w.shape else w.transpose(1, 2))


class _SharedMLP:
    """A bf16 shared expert on SGLang's own layers: its unquantized linear method and SiluAndMul.

    The plan holds the shared MLP as slices of the routed experts' width; they
    are joined back into the one MLP SGLang runs.
    """

    def __init__(self, slices: list[QuantizedExpert], device: torch.device):
        from sglang.srt.layers.activation import SiluAndMul
        from sglang.srt.layers.linear import ReplicatedLinear

        gate_up, down = join_shared([e.gate_up.qweight for e in slices], [e.down.qweight for e in slices])

        def linear(w: torch.Tensor) -> ReplicatedLinear:
            with torch.device(device):
                lin = ReplicatedLinear(w.shape[1], w.shape[0], bias=False, params_dtype=torch.bfloat16)
            lin.weight.data.copy_(w)
            lin.quant_method.process_weights_after_loading(lin)
            return lin

        self.gate_up, self.down, self.act = linear(gate_up), linear(down), SiluAndMul()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate_up(x)[0]))[0]
