"""Calibration: per-block quantization sensitivity and routing frequency.

Only the tokens routed to an expert change when one of its blocks is
quantized, so each (expert, block, scheme) is measured on that expert's tokens
alone: its MLP is re-run with one block quantized and the weighted output
change is recorded (see profile.py for the metric). An expert that receives
fewer than ``min_tokens`` tokens on the calibration text is measured on its
highest-affinity tokens instead (weighted by their router probability; at
least twice the hidden size, so GPTQ cannot fit them exactly), so
every expert has an error estimate for traffic that does route to it later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from mxserve.data import calibration_windows
from mxserve.models.adapters import ExpertWeights, MoELayerView
from mxserve.models.configs import BLOCKS
from mxserve.models.layerwise import LayerwiseModel, free_bytes, release_memory
from mxserve.models.loading import load_tokenizer
from mxserve.profile import CalibrationProfile, ExpertStats, LayerStats
from mxserve.quant.gptq import hessian
from mxserve.quant.qlinear import check_method, quantize_linears
from mxserve.schemes import Scheme


@torch.no_grad()
def capture_moe_inputs(
    model: nn.Module, views: list[MoELayerView], windows: torch.Tensor, batch: int = 8, progress: bool = True
) -> list[torch.Tensor]:
    """Inputs [T, H] (fp32, CPU) of every MoE block over the calibration windows."""
    store: list[list[torch.Tensor]] = [[] for _ in views]

    def hook(i):
        return lambda _m, args: store[i].append(args[0].reshape(-1, args[0].shape[-1]).float().cpu())

    handles = [v.module.register_forward_pre_hook(hook(i)) for i, v in enumerate(views)]
    device = next(model.parameters()).device
    try:
        for i in tqdm(range(0, windows.shape[0], batch), desc="capture", disable=not progress, leave=False):
            model(input_ids=windows[i : i + batch].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(s) for s in store]


@dataclass
class ExpertInputs:
    x: torch.Tensor  # [n, H] tokens the expert is measured on
    w: torch.Tensor  # [n, 1] weight of the expert's output for each token
    routed: int  # tokens actually routed to it


@torch.no_grad()
def expert_inputs(view: MoELayerView, x: torch.Tensor, min_tokens: int) -> list[ExpertInputs]:
    """Per (virtual) expert: the tokens it is measured on, and their output weights."""
    logits, weights, ids = view.router(x)
    probs = torch.softmax(logits.float(), dim=-1)
    weights = weights.float()
    # Fewer tokens than inputs would let GPTQ fit them exactly and hide its error.
    min_tokens = min(max(min_tokens, 2 * x.shape[1]), x.shape[0])
    out = []
    for e in range(view.n_routed):
        mask = ids == e
        tok = mask.any(dim=1).nonzero().squeeze(1)
        w = (weights * mask).sum(dim=1)[tok]
        routed = tok.numel()
        if routed < min_tokens:
            affinity = probs[:, e].clone()
            affinity[tok] = -1.0
            extra = torch.topk(affinity, min(min_tokens - routed, x.shape[0] - routed)).indices
            tok = torch.cat([tok, extra])
            w = torch.cat([w, probs[extra, e]])
        out.append(ExpertInputs(x[tok], w.unsqueeze(1), routed))
    n_shared = len(view.experts()) - view.n_routed
    if n_shared:
        scale = view.shared_scale(x)
        w = torch.ones(x.shape[0], 1, device=x.device) if scale is None else scale.float()
        out += [ExpertInputs(x, w, x.shape[0]) for _ in range(n_shared)]
    return out


def gptq_batches(jobs: list, n: int, k: int, device: torch.device, share: float = 0.5) -> list[list]:
    """``jobs`` (blocks of shape [n, k]) in batches whose GPTQ working memory fits in ``share`` of
    the memory free now: one batch on a large GPU (the loop is launch-bound there), several where
    memory is short (a real-size layer's gate and up at once need about 11 GB besides its inputs)."""
    per_block = 4 * (6 * k * k + 5 * n * k)  # fp32: Hessian, its factors and rotation; weights, codes
    size = max(1, int(free_bytes(device) * share) // per_block)
    return [jobs[i : i + size] for i in range(0, len(jobs), size)]


def block_hessians(ew: ExpertWeights, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """GPTQ Hessians of the expert's blocks: gate/up see x, down sees SiLU(gate)*up."""
    h_in = hessian(x)
    a = nn.functional.silu(x @ ew.gate.float().T) * (x @ ew.up.float().T)
    return {"gate": h_in, "up": h_in, "down": hessian(a)}


@torch.no_grad()
def measure_experts(
    experts: list[ExpertWeights],
    inputs: list[ExpertInputs],
    schemes: list[Scheme],
    method: str,
    hadamard_seed: int,
    max_eval_tokens: int,
    gen: torch.Generator,
) -> list[dict[str, dict[str, float]]]:
    """Per expert, err[block][scheme]: mean ||w_t (y'_t - y_t)||^2 with only that block quantized.

    Each scheme is quantized for all experts of the layer at once, gate and up together (they
    share a shape and a Hessian), then down: GPTQ's column loop runs twice per scheme and layer
    instead of once per expert and block."""
    prep = []
    for ew, inp in zip(experts, inputs):
        w = {b: ew.block(b).float() for b in BLOCKS}
        hess = block_hessians(ew, inp.x) if method != "rtn" else {b: None for b in BLOCKS}
        n = inp.x.shape[0]
        sel = torch.randperm(n, generator=gen)[:max_eval_tokens] if n > max_eval_tokens else slice(None)
        xs, ws = inp.x[sel], inp.w[sel]
        g, u = xs @ w["gate"].T, xs @ w["up"].T
        a = nn.functional.silu(g) * u
        prep.append((w, hess, xs, ws, g, u, a, a @ w["down"].T, {}, {}))  # + rotations of xs and of a, by seed
    errs: list[dict[str, dict[str, float]]] = [{b: {} for b in BLOCKS} for _ in experts]
    for s in schemes:
        for blocks in (("gate", "up"), ("down",)):
            jobs = [(i, b) for b in blocks for i, p in enumerate(prep) if s.supports(p[0][b].shape[1])]
            if not jobs:
                continue
            n, k = prep[jobs[0][0]][0][jobs[0][1]].shape
            done = []
            for batch in gptq_batches(jobs, n, k, prep[0][0]["gate"].device):
                weights, hessians = [prep[i][0][b] for i, b in batch], [prep[i][1][b] for i, b in batch]
                done += zip(batch, quantize_linears(weights, s, method, hessians, hadamard_seed))
            for (i, b), q in done:
                w, _, xs, ws, g, u, a, y, xs_rot, a_rot = prep[i]
                if b == "gate":
                    y2 = (nn.functional.silu(q.forward(xs, rotated=xs_rot)) * u) @ w["down"].T
                elif b == "up":
                    y2 = (nn.functional.silu(g) * q.forward(xs, rotated=xs_rot)) @ w["down"].T
                else:
                    y2 = q.forward(a, rotated=a_rot)
                errs[i][b][s.name] = float((((y2 - y) * ws) ** 2).sum(dim=1).mean())
    return errs


@torch.no_grad()
def calibrate_layer(
    view: MoELayerView,
    x: torch.Tensor,
    schemes: list[Scheme],
    method: str,
    hadamard_seed: int,
    min_tokens: int,
    max_eval_tokens: int,
    seed: int,
) -> LayerStats:
    gen = torch.Generator().manual_seed(seed + view.index)  # on the CPU: the same draws on any device
    x = x.to(next(view.module.parameters()).device)
    experts = view.experts()
    inputs = expert_inputs(view, x, min_tokens)
    sel = torch.randperm(x.shape[0], generator=gen)[:max_eval_tokens]
    y = view.module(x[sel].unsqueeze(0).to(next(view.module.parameters()).dtype)).float()
    energy = float((y**2).sum(dim=-1).mean())
    stats = []
    errs = measure_experts(experts, inputs, schemes, method, hadamard_seed, max_eval_tokens, gen)
    for e, (ew, inp, err) in enumerate(zip(experts, inputs, errs)):
        stats.append(
            ExpertStats(
                expert=e,
                shared=ew.shared,
                shapes=ew.shapes(),
                freq=1.0 if ew.shared else inp.routed / x.shape[0],
                routed_tokens=inp.routed,
                calib_tokens=inp.x.shape[0],
                err=err,
            )
        )
    return LayerStats(view.index, view.n_routed, view.top_k, energy, stats)


def calibrate(
    model_path: str,
    data: list[str],
    schemes: list[Scheme],
    method: str = "rtn",
    nsamples: int = 128,
    seq_len: int = 512,
    min_tokens: int = 128,
    max_eval_tokens: int = 4096,
    seed: int = 0,
    hadamard_seed: int = 0,
    progress: bool = True,
    device: str = "cpu",
) -> CalibrationProfile:
    """Measure a model's calibration profile on the given text files, one decoder layer at a
    time on ``device`` (models/layerwise.py: fp32, weights read from safetensors as needed)."""
    check_method(method)
    run = LayerwiseModel(model_path, device)
    tok = load_tokenizer(model_path)
    windows = calibration_windows(data, tok, nsamples, seq_len, seed)
    hidden = run.embed(windows)
    prof = CalibrationProfile(
        model=model_path,
        model_type=run.model_type,
        method=method,
        schemes=[s.name for s in schemes],
        tokens=int(windows.numel()),
        seq_len=seq_len,
        data=list(data),
        hadamard_seed=hadamard_seed,
    )
    last = run.moe_views[-1].index
    for i in tqdm(range(last + 1), desc=f"calibrate ({method})", unit="layer", disable=not progress):
        release_memory()  # the previous layer is gone before the next loads
        layer = run.layer(i)
        view = run.view(i, layer)
        x = run.advance(i, layer, hidden, capture=view.module if view else None)
        if view is not None:
            prof.layers.append(calibrate_layer(view, x, schemes, method, hadamard_seed, min_tokens, max_eval_tokens,
                                               seed))  # fmt: skip
        del layer, view, x
    del hidden
    release_memory()
    return prof
