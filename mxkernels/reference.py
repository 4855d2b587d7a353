"""Torch reference of the mixed-precision MoE layer: dequantize, then matmul.

It is the correctness oracle for the Triton kernels and the path every
non-CUDA device runs. Each expert is a pair of linear blocks (fused gate/up
[2I, H], down [H, I]) given as objects with ``forward(x, weight)`` that apply
the block's input transform (rotation, activation quantization) and multiply
by ``weight``, the block's dequantized weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn


class Linear(Protocol):
    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor: ...


def expert_forward(
    x: torch.Tensor, gate_up: Linear, down: Linear, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    gate, up = gate_up.forward(x, w_gate_up).chunk(2, dim=-1)
    return down.forward(nn.functional.silu(gate) * up, w_down)


def moe_reference(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    experts: Sequence[tuple[Linear, Linear]],
    weights: Sequence[tuple[torch.Tensor, torch.Tensor]],
    n_routed: int,
    shared_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoE output [T, H] for tokens x [T, H].

    Experts ``n_routed..`` are shared: they see every token, scaled by
    ``shared_scale`` [T, 1] (or 1).
    """
    out = torch.zeros_like(x)
    for e in torch.unique(topk_ids).tolist():
        tok, pos = torch.where(topk_ids == e)
        y = expert_forward(x[tok], *experts[e], *weights[e])
        out.index_add_(0, tok, (y * topk_weights[tok, pos, None]).to(out.dtype))
    if len(experts) > n_routed:
        shared = sum(expert_forward(x, *experts[e], *weights[e]) for e in range(n_routed, len(experts)))
        out = out + (shared if shared_scale is None else shared_scale.to(x.dtype) * shared)
    return out
