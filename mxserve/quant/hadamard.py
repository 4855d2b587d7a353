"""Random Hadamard rotation of the input dimension (the paper's "gptq-had").

R = diag(signs) @ blockdiag(H_b / sqrt(b)), with H_b the Sylvester Hadamard
matrix and b the largest power of two dividing K, so any K works. R is
orthogonal: y = x W^T = (x R)(W R)^T, so weights are stored rotated and the
input is rotated at run time. Signs come from a seeded CPU generator, so the
same (K, seed) gives the same R on every machine.
"""

from __future__ import annotations

import math

import torch


def block_size(k: int) -> int:
    return k & -k


_SIGNS: dict[tuple, torch.Tensor] = {}


def random_signs(k: int, seed: int, device: torch.device | str = "cpu", dtype=torch.float32) -> torch.Tensor:
    """The rotation's ±1 diagonal; cached per device so a forward pass copies nothing to the GPU."""
    key = (k, seed, str(device), dtype)
    if key not in _SIGNS:
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        signs = torch.randint(0, 2, (k,), generator=g).to(torch.float32) * 2 - 1
        _SIGNS[key] = signs.to(device=device, dtype=dtype)
    return _SIGNS[key]


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform over the last dim (a power of two)."""
    b = x.shape[-1]
    lead = x.shape[:-1]
    y = x
    h = 1
    while h < b:
        y = y.reshape(*lead, b // (2 * h), 2, h)
        y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return y.reshape(*lead, b) / math.sqrt(b)


def rotate(x: torch.Tensor, seed: int) -> torch.Tensor:
    """x @ R over the last dimension (works for activations and for weight rows)."""
    k = x.shape[-1]
    b = block_size(k)
    signs = random_signs(k, seed, x.device, x.dtype)
    y = (x * signs).reshape(*x.shape[:-1], k // b, b)
    return fwht(y).reshape(x.shape)


def rotate_hessian(h: torch.Tensor, seed: int) -> torch.Tensor:
    """R^T H R, the Hessian of rotated inputs, from the Hessian of the originals."""
    return rotate(rotate(h, seed).transpose(-1, -2).contiguous(), seed).transpose(-1, -2).contiguous()
