"""Quantizer families: one per grid (none, integer, fp8), shared by RTN and GPTQ.

A family turns weights into codes and back given per-group parameters:
``fit`` chooses scales (and zeros) for a [N, K] slice, ``encode`` maps weights
to codes on the grid, ``decode`` maps codes back. Scales and zeros are rounded
to bf16 at fit time, so what GPTQ compensates for is exactly what is stored.
"""

from __future__ import annotations

import torch

from mxserve.schemes import Scheme

FP8_MAX = 448.0  # largest finite float8_e4m3fn value


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


def _expand(p: torch.Tensor, k: int) -> torch.Tensor:
    """Per-group parameters [N, G] -> per-column [N, K]."""
    if p.shape[1] == k:  # GPTQ's one column at a time: nothing to repeat
        return p
    return p.repeat_interleave(k // p.shape[1], dim=1)


class Family:
    """Base: no quantization (bf16 is stored as is)."""

    def __init__(self, scheme: Scheme):
        self.scheme = scheme

    def group_size(self, k: int) -> int:
        return self.scheme.group or k

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Scales and zeros for ``w`` [N, K] with one group per ``group_size`` columns."""
        return None, None

    def encode(self, w: torch.Tensor, scales, zeros) -> torch.Tensor:
        return w.to(torch.bfloat16)

    def decode(self, codes: torch.Tensor, scales, zeros) -> torch.Tensor:
        return codes.to(torch.float32)

    def quant_dequant(self, w: torch.Tensor, scales, zeros) -> torch.Tensor:
        return self.decode(self.encode(w, scales, zeros), scales, zeros)


class IntFamily(Family):
    """Integer grid: asymmetric (codes 0..2^b-1 with a zero point) or symmetric.

    Symmetric codes are stored offset by 2^(b-1) so that all codes are unsigned.
    """

    def __init__(self, scheme: Scheme):
        super().__init__(scheme)
        self.bits = scheme.w_bits
        self.qmax = (1 << self.bits) - 1
        self.offset = 1 << (self.bits - 1)

    def fit(self, w):
        n, k = w.shape
        g = self.group_size(k)
        wg = w.reshape(n, k // g, g).float()
        if self.scheme.symmetric:
            amax = wg.abs().amax(dim=-1)
            scale = _bf16((amax / (self.offset - 1)).clamp(min=1e-10))
            return scale, None
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
        scale = _bf16(((hi - lo) / self.qmax).clamp(min=1e-10))
        zero = torch.round(-lo / scale).clamp(0, self.qmax)
        return scale, zero

    def encode(self, w, scales, zeros):
        k = w.shape[1]
        s = _expand(scales, k)
        if zeros is None:
            q = torch.round(w / s).clamp(-self.offset, self.offset - 1) + self.offset
        else:
            q = (torch.round(w / s) + _expand(zeros, k)).clamp(0, self.qmax)
        return q.to(torch.uint8)

    def decode(self, codes, scales, zeros):
        k = codes.shape[1]
        q = codes.to(torch.float32)
        z = self.offset if zeros is None else _expand(zeros, k)
        return (q - z) * _expand(scales, k)

    def quant_dequant(self, w, scales, zeros):
        # encode then decode without the uint8 codes: they are whole numbers, so the values are the
        # same, and GPTQ calls this once per column (fewer ops per call is most of its time on a GPU)
        s = _expand(scales, w.shape[1])
        if zeros is None:
            return torch.round(w / s).clamp(-self.offset, self.offset - 1) * s
        z = _expand(zeros, w.shape[1])
        return ((torch.round(w / s) + z).clamp(0, self.qmax) - z) * s


class Fp8Family(Family):
    """fp8 e4m3 grid with a per-output-channel scale."""

    def fit(self, w):
        amax = w.float().abs().amax(dim=1, keepdim=True)
        return _bf16((amax / FP8_MAX).clamp(min=1e-12)), None

    def encode(self, w, scales, zeros):
        return (w / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)

    def decode(self, codes, scales, zeros):
        return codes.to(torch.float32) * scales


def family_for(scheme: Scheme) -> Family:
    return {"none": Family, "int": IntFamily, "fp8": Fp8Family}[scheme.family](scheme)


def quantize_activation(x: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Simulate the run-time per-token activation quantization of a scheme (fake quant)."""
    if scheme.a_bits >= 16:
        return x
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8)
    if scheme.family == "fp8":
        s = amax / FP8_MAX
        xq = (xf / s).to(torch.float8_e4m3fn).to(torch.float32) * s
    else:
        qpos = (1 << (scheme.a_bits - 1)) - 1
        s = amax / qpos
        xq = torch.round(xf / s).clamp(-qpos - 1, qpos) * s
    return xq.to(x.dtype)
