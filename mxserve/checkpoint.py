"""Quantizing a model by a plan, and the quantized checkpoint on disk.

A quantized checkpoint is a directory:

- ``config.json``: the model's config plus
  ``"quantization_config": {"quant_method": "mxmoe", "version": 1, "plan": "mxmoe_plan.json"}``;
- ``mxmoe_plan.json``: the plan (plan.py), which says each block's scheme and
  the method (a ``gptq-had`` checkpoint stores non-bf16 blocks rotated);
- ``model.safetensors``: every non-expert tensor under its usual name, and per
  MoE layer L and (virtual) expert e the packed blocks
  ``model.layers.L.mlp.experts.mx{e}_{gate_up,down}_{qweight,scales,zeros}``,
  plus the shared-expert gate (if any) as ``model.layers.L.mlp.experts.mx_shared_gate``.
  These flat names under ``mlp.experts`` are parameters of SGLang's FusedMoE
  layer (its ``experts``), so SGLang's own weight loading reads this file too;
  the shared gate lives there because the SGLang engine runs shared experts
  inside the same kernel launch as the routed ones;
- the tokenizer files.

Weights are read with safetensors only (never pickle).
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from mxserve.calibrate import block_hessians, capture_moe_inputs, expert_inputs
from mxserve.data import calibration_windows
from mxserve.errors import MxServeError
from mxserve.models.adapters import MoELayerView, decoder_layers, model_type, moe_layers
from mxserve.models.loading import QUANT_METHOD, load_tokenizer, read_config
from mxserve.plan import Plan
from mxserve.quant.qlinear import QuantizedLinear, check_method, quantize_linears
from mxserve.runtime.moe_layer import MxMoELayer, QuantizedExpert
from mxserve.schemes import Scheme

PLAN_FILE = "mxmoe_plan.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 2  # v2: expert tensors under mlp.experts (v1: mlp.mx)
SHARED_GATE = "mx_shared_gate"
GATE_UP, DOWN = "gate_up", "down"


def rotation_seed(method: str, scheme: Scheme, seed: int) -> int | None:
    """gptq-had stores every quantized block rotated; bf16 blocks never are."""
    return seed if method == "gptq-had" and scheme.family != "none" else None


def layout(views: list[MoELayerView]) -> list[tuple[int, list[bool]]]:
    """[(layer index, [is shared] per expert)] for building uniform plans."""
    return [(v.index, [ew.shared for ew in v.experts()]) for v in views]


def _check_plan_fits(plan: Plan, views: list[MoELayerView]) -> None:
    planned = {lay.layer for lay in plan.layers}
    actual = {v.index for v in views}
    if planned != actual:
        raise MxServeError(f"plan covers MoE layers {sorted(planned)}, the model has {sorted(actual)}")
    for v in views:
        n = len(v.experts())
        if len(plan.layer(v.index).experts) != n:
            raise MxServeError(
                f"plan was made for another model: layer {v.index} has {n} experts, the plan "
                f"{len(plan.layer(v.index).experts)}"
            )


@torch.no_grad()
def layer_blocks(
    model: nn.Module,
    method: str,
    data: list[str] | None,
    tokenizer=None,
    nsamples: int = 128,
    seq_len: int = 512,
    min_tokens: int = 128,
    progress: bool = True,
):
    """Per MoE layer: (view, [(expert weights, fused gate_up fp32, down fp32, Hessians)]).

    Everything a block's quantization depends on besides its scheme: the offline
    quantizer (:func:`quantize_layers`) and the precision ladder (online/ladder.py)
    both quantize from here, so a ladder block is the tensor a checkpoint holds.
    """
    views = moe_layers(model)
    xs = None
    if method != "rtn":
        if not data:
            raise MxServeError(f"method {method} needs calibration text: pass --data (or --calib-data)")
        windows = calibration_windows(data, tokenizer, nsamples, seq_len)
        xs = capture_moe_inputs(model, views, windows, progress=progress)
    for pos, view in enumerate(tqdm(views, desc=f"quantize ({method})", disable=not progress)):
        dev = next(view.module.parameters()).device  # captured inputs wait on the CPU, one layer at a time here
        inputs = expert_inputs(view, xs[pos].to(dev), min_tokens) if xs is not None else None
        blocks = []
        for e, ew in enumerate(view.experts()):
            hess = block_hessians(ew, inputs[e].x) if inputs is not None else {}
            blocks.append((ew, torch.cat([ew.gate, ew.up]).float(), ew.down.float(), hess))
        yield view, blocks


def quantize_experts(blocks: list[tuple], s_gu: list[Scheme], s_d: list[Scheme], method: str,
                     hadamard_seed: int) -> list[QuantizedExpert]:  # fmt: skip
    """Experts' blocks (items of :func:`layer_blocks`) in the given schemes, returned on the CPU;
    the blocks that share a scheme are quantized as one batch (quantize_linears)."""
    out: list[list] = [[None, None] for _ in blocks]
    for pos, schemes, hess_key in ((1, s_gu, "gate"), (2, s_d, "down")):
        for s in dict.fromkeys(schemes):
            idx = [i for i, x in enumerate(schemes) if x == s]
            qs = quantize_linears([blocks[i][pos] for i in idx], s, method, [blocks[i][3].get(hess_key) for i in idx],
                                  hadamard_seed)  # fmt: skip
            for i, q in zip(idx, qs):
                out[i][pos - 1] = q.to("cpu")
    return [QuantizedExpert(gu, d, b[0].shared) for (gu, d), b in zip(out, blocks)]


def quantize_layers(
    model: nn.Module,
    plan: Plan,
    data: list[str] | None = None,
    tokenizer=None,
    nsamples: int = 128,
    seq_len: int = 512,
    min_tokens: int = 128,
    progress: bool = True,
) -> list[list[QuantizedExpert]]:
    """Quantize every expert block by the plan (GPTQ methods need calibration ``data``)."""
    method = check_method(plan.method)
    _check_plan_fits(plan, moe_layers(model))
    out = []
    for view, blocks in layer_blocks(model, method, data or plan.data, tokenizer, nsamples, seq_len, min_tokens,
                                     progress):
        lp = plan.layer(view.index)
        experts = range(len(blocks))
        out.append(quantize_experts(blocks, [lp.experts[e].scheme("gate") for e in experts],
                                    [lp.experts[e].scheme("down") for e in experts], method,
                                    plan.hadamard_seed))  # fmt: skip
    return out


def install_layers(model: nn.Module, qlayers: list[list[QuantizedExpert]]) -> list[MxMoELayer]:
    """Replace the model's MoE blocks by runtime layers holding ``qlayers``."""
    layers = decoder_layers(model)
    installed = []
    for view, experts in zip(moe_layers(model), qlayers):
        mx = MxMoELayer(view, experts)
        layers[view.index].mlp = mx
        installed.append(mx)
    return installed


def runtime_layers(model: nn.Module) -> list[MxMoELayer]:
    return [m for m in model.modules() if isinstance(m, MxMoELayer)]


def expert_param(expert: int, block: str) -> str:
    """Name prefix of one packed block inside the MoE block's ``experts``."""
    return f"mx{expert}_{block}_"


def _prefix(layer: int, expert: int, block: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert_param(expert, block)}"


def _shared_gate_names(layer: int, attr: str) -> tuple[str, str]:
    """(name in the model, name in the checkpoint) of a layer's shared-expert gate."""
    return f"model.layers.{layer}.mlp.{attr}.weight", f"model.layers.{layer}.mlp.experts.{SHARED_GATE}"


def read_experts(
    tensors: dict[str, torch.Tensor],
    plan: Plan,
    layer: int,
    hidden: int,
    prefix: str = "",
) -> list[QuantizedExpert]:
    """A layer's packed experts from ``tensors`` named ``prefix + expert_param(e, block) + kind``.

    Shapes come from the stored tensors (the plan gives the schemes) and are
    validated against ``hidden``; both engines load through here.
    """
    experts = []
    for ep in plan.layer(layer).experts:
        s_gu, s_d = ep.scheme("gate"), ep.scheme("down")
        gu_name = prefix + expert_param(ep.expert, GATE_UP)
        if gu_name + "qweight" not in tensors:
            raise MxServeError(f"checkpoint lacks tensor {gu_name}qweight (layer {layer})")
        two_i = tensors[gu_name + "qweight"].shape[0]
        seed_gu = rotation_seed(plan.method, s_gu, plan.hadamard_seed)
        seed_d = rotation_seed(plan.method, s_d, plan.hadamard_seed)
        experts.append(
            QuantizedExpert(
                QuantizedLinear.from_tensors(s_gu, two_i, hidden, tensors, gu_name, seed_gu),
                QuantizedLinear.from_tensors(
                    s_d, hidden, two_i // 2, tensors, prefix + expert_param(ep.expert, DOWN), seed_d
                ),
                ep.shared,
            )
        )
    return experts


def _source_dtype(cfg: dict) -> torch.dtype:
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
    return getattr(torch, name, torch.bfloat16)


def write_checkpoint(model: nn.Module, plan: Plan, out_dir: str, source: str, tokenizer) -> None:
    """Write a model whose MoE blocks are runtime layers as a quantized checkpoint."""
    os.makedirs(out_dir, exist_ok=True)
    cfg = read_config(source) if os.path.isdir(source) else model.config.to_dict()
    dtype = _source_dtype(cfg)
    state: dict[str, torch.Tensor] = {}
    # lm_head.weight is stored even when tied to the embedding: SGLang's Qwen2-MoE
    # does not tie them and would otherwise serve an uninitialised head.
    for name, t in model.state_dict().items():
        t = t.to(dtype) if t.is_floating_point() else t
        state[name] = t.clone() if name.endswith("lm_head.weight") else t  # own storage: safetensors refuses shared
    for mx in runtime_layers(model):
        for e, qe in enumerate(mx.experts_q):
            state.update(qe.gate_up.tensors(_prefix(mx.layer_index, e, GATE_UP)))
            state.update(qe.down.tensors(_prefix(mx.layer_index, e, DOWN)))
        if mx.shared_gate_name:
            ours, stored = _shared_gate_names(mx.layer_index, mx.shared_gate_name)
            state[stored] = state.pop(ours)
    state = {k: v.contiguous() for k, v in state.items()}
    tmp = os.path.join(out_dir, WEIGHTS_FILE + ".tmp")
    save_file(state, tmp, metadata={"format": "pt", "quant_method": QUANT_METHOD})
    os.replace(tmp, os.path.join(out_dir, WEIGHTS_FILE))
    plan.save(os.path.join(out_dir, PLAN_FILE))
    cfg["quantization_config"] = {"quant_method": QUANT_METHOD, "version": FORMAT_VERSION, "plan": PLAN_FILE}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tokenizer.save_pretrained(out_dir)
    gen = os.path.join(source, "generation_config.json")
    if os.path.isfile(gen):
        with open(gen) as src, open(os.path.join(out_dir, "generation_config.json"), "w") as dst:
            dst.write(src.read())


def load_quantized(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[nn.Module, Plan]:
    """Build the model of a quantized checkpoint with runtime layers in place of its MoE blocks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = read_config(path)
    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise MxServeError(f"{path} is not an mxmoe checkpoint (no quantization_config.quant_method=mxmoe)")
    if qc.get("version") != FORMAT_VERSION:
        raise MxServeError(
            f"{path}: checkpoint format version {qc.get('version')!r} is not supported (this mxserve reads "
            f"version {FORMAT_VERSION}); quantize the model again"
        )
    plan = Plan.load(os.path.join(path, qc.get("plan", PLAN_FILE)))
    try:
        tensors = load_file(os.path.join(path, WEIGHTS_FILE))
    except (OSError, SafetensorError) as e:
        raise MxServeError(f"cannot read {os.path.join(path, WEIGHTS_FILE)}: {e}") from None
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # ours, not one transformers knows
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    views = moe_layers(model)
    _check_plan_fits(plan, views)
    qlayers = []
    for view in views:
        experts = read_experts(tensors, plan, view.index, view.hidden, f"model.layers.{view.index}.mlp.experts.")
        for qe, ew in zip(experts, view.experts()):
            if qe.gate_up.n != 2 * ew.gate.shape[0]:
                raise MxServeError(f"{path}: layer {view.index} expert sizes do not match the config")
        qlayers.append(experts)
    for mx in install_layers(model, qlayers):
        if mx.shared_gate_name:
            ours, stored = _shared_gate_names(mx.layer_index, mx.shared_gate_name)
            if stored in tensors:
                tensors[ours] = tensors.pop(stored)
    rest = {k: v for k, v in tensors.items() if ".mlp.experts.mx" not in k}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise MxServeError(
            f"{path}: checkpoint does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.to(device).eval(), plan


def quantize_to_dir(model_path: str, plan: Plan, out_dir: str, data: list[str] | None = None, nsamples: int = 128,
                    progress: bool = True, device: str = "cpu") -> None:  # fmt: skip
    """The `mxserve quantize` pipeline: load, quantize by the plan (on ``device``), write."""
    from mxserve.models.loading import load_model

    model = load_model(model_path, device=device)
    if plan.model_type != model_type(model):
        raise MxServeError(f"plan is for a {plan.model_type} model, {model_path} is {model_type(model)}")
    tok = load_tokenizer(model_path)
    qlayers = quantize_layers(model, plan, data, tok, nsamples=nsamples, progress=progress)  # blocks on the CPU
    install_layers(model.to("cpu"), qlayers)
    write_checkpoint(model, plan, out_dir, model_path, tok)
