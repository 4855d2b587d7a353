"""Quantizing a model by a plan, and the quantized checkpoint on disk.

A quantized checkpoint is a directory:

- ``config.json``: the model's config plus
  ``"quantization_config": {"quant_method": "mxmoe", "version": 1, "plan": "mxmoe_plan.json"}``;
- ``mxmoe_plan.json``: the plan (plan.py), which says each block's scheme and
  the method (a ``gptq-had`` checkpoint stores non-bf16 blocks rotated);
- ``model.safetensors``: every non-expert tensor under its usual name (the MoE block as the
  source checkpoint and SGLang name it: Mixtral's ``block_sparse_moe``, else ``mlp``), and per
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

from mxserve.calibrate import block_hessians, capture_moe_inputs, expert_inputs, gptq_batches
from mxserve.data import calibration_windows
from mxserve.errors import MxServeError
from mxserve.models.adapters import MoELayerView, decoder_layers, moe_layers
from mxserve.models.configs import FORMAT_VERSION, PLAN_FILE, QUANT_METHOD, module_name, read_config, stored_name
from mxserve.models.layerwise import LayerwiseModel, release_memory
from mxserve.models.loading import load_tokenizer
from mxserve.plan import Plan
from mxserve.quant.qlinear import QuantizedLinear, check_method, quantize_linears
from mxserve.runtime.moe_layer import MxMoELayer, QuantizedExpert, model_kernel_codes
from mxserve.schemes import Scheme

WEIGHTS_FILE = "model.safetensors"
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

    Everything a block's quantization depends on besides its scheme, for a model loaded
    whole (:func:`quantize_layers`: `mxserve eval --plan`, tests). Checkpoints and the
    precision ladder go one layer at a time (:func:`layerwise_blocks`) through the same
    :func:`expert_blocks`, so a ladder block is the tensor a checkpoint holds.
    """
    views = moe_layers(model)
    xs = None
    if method != "rtn":
        windows = calibration_windows(_need_data(method, data), tokenizer, nsamples, seq_len)
        xs = capture_moe_inputs(model, views, windows, progress=progress)
    for pos, view in enumerate(tqdm(views, desc=f"quantize ({method})", disable=not progress)):
        dev = next(view.module.parameters()).device  # captured inputs wait on the CPU, one layer at a time here
        yield view, expert_blocks(view, xs[pos].to(dev) if xs is not None else None, min_tokens)


def _need_data(method: str, data: list[str] | None) -> list[str]:
    if not data:
        raise MxServeError(f"method {method} needs calibration text: pass --data (or --calib-data)")
    return data


def expert_blocks(view: MoELayerView, x: torch.Tensor | None, min_tokens: int) -> list[tuple]:
    """[(expert weights, fused gate_up fp32, down fp32, GPTQ Hessians)] of one MoE layer whose
    block inputs are ``x`` [T, H] (None: RTN, no Hessians)."""
    inputs = expert_inputs(view, x, min_tokens) if x is not None else None
    blocks = []
    for e, ew in enumerate(view.experts()):
        hess = block_hessians(ew, inputs[e].x) if inputs is not None else {}
        blocks.append((ew, torch.cat([ew.gate, ew.up]).float(), ew.down.float(), hess))
    return blocks


def quantize_experts(blocks: list[tuple], s_gu: list[Scheme], s_d: list[Scheme], method: str,
                     hadamard_seed: int) -> list[QuantizedExpert]:  # fmt: skip
    """Experts' blocks (items of :func:`layer_blocks`) in the given schemes, returned on the CPU;
    the blocks that share a scheme are quantized as one batch (quantize_linears), or in as
    few as the free memory allows (calibrate.gptq_batches)."""
    out: list[list] = [[None, None] for _ in blocks]
    for pos, schemes, hess_key in ((1, s_gu, "gate"), (2, s_d, "down")):
        for s in dict.fromkeys(schemes):
            idx = [i for i, x in enumerate(schemes) if x == s]
            n, k = blocks[idx[0]][pos].shape
            for batch in gptq_batches(idx, n, k, blocks[idx[0]][pos].device):
                qs = quantize_linears([blocks[i][pos] for i in batch], s, method,
                                      [blocks[i][3].get(hess_key) for i in batch], hadamard_seed)  # fmt: skip
                for i, q in zip(batch, qs):
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
        out.append(quantize_by_plan(blocks, plan, view.index))
    return out


def quantize_by_plan(blocks: list[tuple], plan: Plan, layer: int) -> list[QuantizedExpert]:
    """One layer's experts (items of :func:`expert_blocks`) in the plan's schemes."""
    lp = plan.layer(layer)
    s_gu = [lp.experts[e].scheme("gate") for e in range(len(blocks))]
    s_d = [lp.experts[e].scheme("down") for e in range(len(blocks))]
    return quantize_experts(blocks, s_gu, s_d, plan.method, plan.hadamard_seed)


def install_layers(model: nn.Module, qlayers: list[list[QuantizedExpert]]) -> list[MxMoELayer]:
    """Replace the model's MoE blocks by runtime layers holding ``qlayers``."""
    layers = decoder_layers(model)
    installed = []
    codes = model_kernel_codes(qlayers)  # every layer compiles one kernel variant (Arena.extra_codes)
    for view, experts in zip(moe_layers(model), qlayers):
        mx = MxMoELayer(view, experts, codes)
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


def layer_tensors(index: int, layer: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of decoder layer ``index`` (on the CPU): its own in ``dtype``, and
    where its MoE block is a runtime layer, the packed experts and the shared-expert gate."""
    state = {
        f"model.layers.{index}.{k}": (t.to(dtype) if t.is_floating_point() else t).cpu()
        for k, t in layer.state_dict().items()
    }
    mx = getattr(layer, "mlp", None)
    if isinstance(mx, MxMoELayer):
        for e, qe in enumerate(mx.experts_q):
            state.update(qe.gate_up.tensors(_prefix(index, e, GATE_UP)))
            state.update(qe.down.tensors(_prefix(index, e, DOWN)))
        if mx.shared_gate_name:
            ours, stored = _shared_gate_names(index, mx.shared_gate_name)
            state[stored] = state.pop(ours)
    return state


def write_checkpoint(state: dict[str, torch.Tensor], plan: Plan, out_dir: str, cfg: dict, source: str,
                     tokenizer) -> None:  # fmt: skip
    """Write a quantized checkpoint: ``state`` (layer_tensors of every layer, the rest of the
    model), the plan, the source ``cfg`` with our quantization_config, tokenizer and generation config."""
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    tmp = os.path.join(out_dir, WEIGHTS_FILE + ".tmp")
    save_file(state, tmp, metadata={"format": "pt", "quant_method": QUANT_METHOD})
    os.replace(tmp, os.path.join(out_dir, WEIGHTS_FILE))
    plan.save(os.path.join(out_dir, PLAN_FILE))
    cfg = dict(cfg, quantization_config={"quant_method": QUANT_METHOD, "version": FORMAT_VERSION, "plan": PLAN_FILE})
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
        tensors = {module_name(k): v for k, v in load_file(os.path.join(path, WEIGHTS_FILE)).items()}
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


def layerwise_blocks(run: LayerwiseModel, method: str, data: list[str] | None, tokenizer, nsamples: int = 128,
                     seq_len: int = 512, min_tokens: int = 128, progress: bool = True, desc: str = "quantize"):
    """Per decoder layer of ``run``, one at a time on its device: (index, layer module, MoE view
    or None, :func:`expert_blocks` or None). GPTQ methods run the calibration windows through
    each layer (unquantized) first, for the blocks' Hessians."""
    hidden = None
    if method != "rtn":
        hidden = run.embed(calibration_windows(_need_data(method, data), tokenizer, nsamples, seq_len))
    for i in tqdm(range(run.n_layers), desc=f"{desc} ({method})", unit="layer", disable=not progress):
        release_memory()  # the previous layer is gone (callers drop what they were given) before the next loads
        layer = run.layer(i)
        view = run.view(i, layer)
        x = None
        if hidden is not None:
            x = run.advance(i, layer, hidden, capture=view.module if view else None)
        yield i, layer, view, (expert_blocks(view, x, min_tokens) if view is not None else None)
        del layer, view, x
    del hidden
    release_memory()


def quantize_to_dir(model_path: str, plan: Plan, out_dir: str, data: list[str] | None = None, nsamples: int = 128,
                    progress: bool = True, device: str = "cpu", seq_len: int = 512,
                    min_tokens: int = 128) -> None:  # fmt: skip
    """The `mxserve quantize` pipeline, one decoder layer at a time on ``device``
    (models/layerwise.py): each layer is read from safetensors, run on the calibration
    windows to give GPTQ its inputs, its experts quantized by the plan, and its tensors kept
    on the CPU for the checkpoint."""
    run = LayerwiseModel(model_path, device)
    if plan.model_type != run.model_type:
        raise MxServeError(f"plan is for a {plan.model_type} model, {model_path} is {run.model_type}")
    _check_plan_fits(plan, run.moe_views)
    method = check_method(plan.method)
    tok = load_tokenizer(model_path)
    cfg = read_config(run.path)
    dtype = _source_dtype(cfg)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in run.outer_state().items()}
    for i, layer, view, blocks in layerwise_blocks(run, method, data or plan.data, tok, nsamples, seq_len,
                                                   min_tokens, progress):  # fmt: skip
        if view is not None:
            layer.mlp = MxMoELayer(view, quantize_by_plan(blocks, plan, i))
        state.update({stored_name(k, run.spec): v for k, v in layer_tensors(i, layer, dtype).items()})
        del layer, view, blocks  # before the next layer loads: one layer in memory at a time
    write_checkpoint(state, plan, out_dir, cfg, run.path, tok)
