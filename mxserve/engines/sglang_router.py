"""A MoE block's router in one launch under SGLang (the default; ``MXSERVE_FUSED_ROUTER=0`` keeps SGLang's).

SGLang's Qwen2-MoE-style blocks call ``gate(hidden)`` for the logits, then ``topk(hidden, logits, ...)``: at
decode on the H200 four launches and 9.6 to 11.7 us a layer from the post-attention norm on (benchmarks/README.md,
twenty-first session). For forwards of at most ``FUSED_ROUTER_TOKENS`` tokens the gate here hands back the
hidden states in place of logits (no launch), and the top-k computes logits, softmax and top-k in one launch
(mxkernels.router.fused_router). Larger forwards (prefill) take SGLang's own two. Only plain softmax top-k is
fused (no groups, correction bias, fused shared experts, routed scaling or custom routing function); other
blocks keep SGLang's router, which the log says once per reason. The fused top-k hands its ids to what
SGLang's own top-k hands them to besides the MoE layer: the expert-distribution recorder (EPLB, its /metrics) and
the routed-experts capture, both no-ops unless enabled.
"""

from __future__ import annotations

import logging
import os

import torch

from mxkernels.router import FUSED_ROUTER_TOKENS, counters, fused_router

log = logging.getLogger(__name__)
_SAID: set[str] = set()


def _refusal(gate, topk) -> str | None:
    """Why this block's router cannot be fused, or None."""
    cfg = getattr(topk, "topk_config", None)
    weight = getattr(gate, "weight", None)
    if cfg is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return "no gate weight and top-k config of SGLang's form"
    if getattr(gate, "bias", None) is not None or weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return "a gate with a bias or a quantized gate"
    if cfg.scoring_func != "softmax" or cfg.use_grouped_topk or cfg.custom_routing_function is not None:
        return f"{cfg.scoring_func} scoring, grouped or custom routing"
    if cfg.correction_bias is not None or cfg.num_fused_shared_experts or cfg.apply_routed_scaling_factor_on_output:
        return "a correction bias, fused shared experts or a routed scaling in the top-k"
    fmt = cfg.output_format
    if cfg.routed_scaling_factor not in (None, 1.0) or (fmt is not None and fmt.name != "STANDARD"):
        return "a routed scaling factor or a top-k output other than SGLang's standard one"
    if getattr(topk, "enable_deepep_waterfill", False) or any(
        os.environ.get(v, "0") not in ("", "0", "false") for v in
        ("SGLANG_SIMULATE_UNIFORM_EXPERTS", "SGLANG_SIMULATE_ROUND_ROBIN_EXPERTS")):  # fmt: skip
        return "SGLang's DeepEP waterfill or simulated routing"
    return None


def fuse_router(block: torch.nn.Module) -> bool:
    """Route ``block``'s small forwards in one launch (module docstring): its ``gate`` and ``topk`` modules'
    forwards are replaced on these instances; SGLang's own classes are not touched."""
    from sglang.srt.eplb.expert_distribution import get_global_expert_distribution_recorder
    from sglang.srt.layers.moe import topk as sglang_topk
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    # what SGLang's select_experts does with the ids besides returning them (absent in other SGLang versions)
    capture = getattr(sglang_topk, "capture_routed_experts_if_allowed", None)

    gate, topk = getattr(block, "gate", None), getattr(block, "topk", None)
    why = _refusal(gate, topk)
    if why is not None:
        if why not in _SAID:
            _SAID.add(why)
            log.info("mxserve: a router stays SGLang's (not fused into one launch): %s", why)
        return False
    cfg, weight = topk.topk_config, gate.weight
    counters(weight.device, FUSED_ROUTER_TOKENS)  # made now, before any CUDA-graph capture
    gate_forward, topk_forward = gate.forward, topk.forward

    def gate_fused(x: torch.Tensor, *args, **kwargs):
        if x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= FUSED_ROUTER_TOKENS and not args and not kwargs:
            return x, None  # the logits come from the top-k's launch
        return gate_forward(x, *args, **kwargs)

    def topk_fused(hidden_states: torch.Tensor, router_logits: torch.Tensor, *args, num_token_non_padded=None,
                   expert_location_dispatch_info=None, **kwargs):  # fmt: skip
        if router_logits is hidden_states:  # the gate left the logits to this launch
            if expert_location_dispatch_info is None and not args and not kwargs:
                w, ids, logits = fused_router(hidden_states, weight, cfg.top_k, cfg.renormalize, num_token_non_padded)
                if capture is not None:
                    capture(cfg, getattr(topk, "layer_id", None), ids)
                get_global_expert_distribution_recorder().on_select_experts(topk_ids=ids)
                return StandardTopKOutput(w, ids, logits)
            router_logits = gate_forward(hidden_states)[0]
        return topk_forward(hidden_states, router_logits, *args, num_token_non_padded=num_token_non_padded,
                            expert_location_dispatch_info=expert_location_dispatch_info, **kwargs)  # fmt: skip

    gate.forward, topk.forward = gate_fused, topk_fused
    return True
