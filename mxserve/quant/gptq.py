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
    """Quantize ``w`` [N, K] with Hessian ``h`` [K, K]; returns (codes, scales, zeros).

    A batch of blocks of one shape (``w`` [B, N, K], ``h`` [B, K, K]: the experts of a
    layer) runs as one: every step of the column loop is one batched op for all B, so
    the loop costs B times fewer launches on a GPU (and interpreter steps on a CPU);
    the results are then [B, ...]. Rows of all blocks share the quantizer calls. On a GPU
    the loop is bound by launches, so each column step is kept to about a dozen ops."""
    batched = w.dim() == 3
    w = w.detach().to(torch.float32).clone().reshape(-1, *w.shape[-2:])
    h = h.detach().to(torch.float32).clone().reshape(-1, *h.shape[-2:])
    b, n, k = w.shape
    rows = w.view(b * n, k)  # the quantizer works on rows; GPTQ's updates per block
    diag = torch.diagonal(h, dim1=-2, dim2=-1)  # a view: writes go to h
    dead = diag == 0
    diag[dead] = 1.0
    w.masked_fill_(dead[:, None, :], 0.0)
    diag += percdamp * diag.mean(dim=-1, keepdim=True)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    g = family.group_size(k)
    block = max(block - block % g, g) if g < k else block  # groups never straddle blocks
    ngroups = k // g
    scales = zeros = None
    if family.scheme.family != "none":
        s0, z0 = family.fit(rows)
        scales = torch.empty(b * n, ngroups, device=w.device) if s0 is not None else None
        zeros = torch.empty(b * n, ngroups, device=w.device) if z0 is not None else None
        if g == k:  # per-channel: fit once on the whole row
            scales, zeros = s0, z0

    def by_row(t: torch.Tensor | None) -> torch.Tensor | None:  # [B*N, 1] as the columns' [B, N]
        return None if t is None else t.view(b, n)

    sv, zv = (by_row(scales), by_row(zeros)) if g == k else (None, None)
    q_all = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        m = i2 - i1
        # The block column-major, [m, B, N]: column i is cols[i], one contiguous tensor, and each
        # step is a few whole-tensor ops (the loop is launch-bound on a GPU: ops per column count).
        cols = w[:, :, i1:i2].permute(2, 0, 1).contiguous()
        qcols, errs = [], []  # stacked once per block, not written column by column
        hinv1 = hinv[:, i1:i2, i1:i2]
        hrows = hinv1.permute(1, 2, 0).unsqueeze(-1).contiguous()  # [m, m, B, 1]: hrows[i, j] = hinv1[:, i, j]
        hdiag = torch.diagonal(hinv1, dim1=-2, dim2=-1).T.unsqueeze(-1).contiguous()  # [m, B, 1]
        colv, diagv, hrowv = cols.unbind(0), hdiag.unbind(0), hrows.unbind(0)  # views, made once per block
        for i in range(m):
            col = i1 + i
            if g < k and col % g == 0:
                cur_s, cur_z = family.fit(cols[i : i + g].permute(1, 2, 0).reshape(b * n, -1))
                if scales is not None:
                    scales[:, col // g] = cur_s[:, 0]
                if zeros is not None and cur_z is not None:
                    zeros[:, col // g] = cur_z[:, 0]
                sv, zv = by_row(cur_s), by_row(cur_z)
            wc = colv[i]
            qc = family.quant_dequant(wc, sv, zv)  # [B, N] with one parameter each: elementwise
            e = (wc - qc) / diagv[i]
            # e's outer product with row i of H^-1 (one product per element: exact); sub_ on the
            # slice, as `cols[i:] -= ...` would also copy the slice onto itself
            cols[i:].sub_(hrowv[i][i:] * e)
            qcols.append(qc)
            errs.append(e)
        q_all[:, :, i1:i2] = torch.stack(qcols, dim=2)
        w[:, :, i2:].sub_(torch.stack(errs, dim=2) @ hinv[:, i1:i2, i2:])
    codes = family.encode(q_all.view(b * n, k), scales, zeros)
    if not batched:
        return codes, scales, zeros
    return tuple(None if t is None else t.view(b, n, -1) for t in (codes, scales, zeros))
