"""GPTQ (Frantar et al. 2023): column-by-column rounding with error feedback.

Works with any quantizer family: group parameters are fitted on the current
(already error-compensated) weights when a group starts, as in the reference
implementation with static_groups off. Rows are independent given H, so the
fused gate/up weight is quantized the same as gate and up separately.
"""

from __future__ import annotations

import torch

from mxserve.quant.families import Family


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2/n X^T X for inputs x [n, K] (float64 accumulation for stability)."""
    xd = x.reshape(-1, x.shape[-1]).to(torch.float64)
    return (2.0 / max(xd.shape[0], 1) * (xd.T @ xd)).to(torch.float32)


def gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    family: Family,
    block: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Quantize ``w`` [N, K] with Hessian ``h`` [K, K]; returns (codes, scales, zeros)."""
    w = w.detach().to(torch.float32).clone()
    n, k = w.shape
    h = h.detach().to(torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(h))
    h += damp * torch.eye(k, dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    g = family.group_size(k)
    block = max(block - block % g, g) if g < k else block  # groups never straddle blocks
    ngroups = k // g
    scales = zeros = None
    if family.scheme.family != "none":
        s0, z0 = family.fit(w)
        scales = torch.empty(n, ngroups, device=w.device) if s0 is not None else None
        zeros = torch.empty(n, ngroups, device=w.device) if z0 is not None else None
        if g == k:  # per-channel: fit once on the whole row
            scales, zeros = s0, z0
    q_all = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        cur_s = cur_z = None
        for i in range(i2 - i1):
            col = i1 + i
            if g < k and col % g == 0:
                cur_s, cur_z = family.fit(w1[:, i : i + g])
                if scales is not None:
                    scales[:, col // g] = cur_s[:, 0]
                if zeros is not None and cur_z is not None:
                    zeros[:, col // g] = cur_z[:, 0]
            elif g == k:
                cur_s, cur_z = scales, zeros
            wc = w1[:, i : i + 1]
            qc = family.quant_dequant(wc, cur_s, cur_z)
            q1[:, i : i + 1] = qc
            e = (wc - qc) / hinv1[i, i]
            w1[:, i:] -= e @ hinv1[i : i + 1, i:]
            err1[:, i : i + 1] = e
        q_all[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    codes = family.encode(q_all, scales, zeros)
    return codes, scales, zeros
