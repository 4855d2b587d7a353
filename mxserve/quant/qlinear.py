"""A quantized linear block: packed storage, dequantization and the torch reference forward."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mxserve.errors import MxServeError
from mxserve.quant import hadamard
from mxserve.quant.families import family_for, quantize_activation
from mxserve.quant.gptq import gptq
from mxserve.quant.packing import pack, unpack
from mxserve.schemes import Scheme

METHODS = ("rtn", "gptq", "gptq-had")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise MxServeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method


@dataclass
class QuantizedLinear:
    """Weight [N, K] of one linear block in one scheme.

    ``qweight`` is int32 packed codes (integer schemes, see packing.py), fp8
    e4m3 (w8a8fp8) or bf16 (bf16). ``scales``/``zeros`` are bf16 [N, groups];
    zeros is None for symmetric schemes. With ``hadamard_seed`` set, the weight
    is stored rotated and inputs are rotated at run time.
    """

    scheme: Scheme
    n: int
    k: int
    qweight: torch.Tensor
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    hadamard_seed: int | None = None

    def to(self, device) -> QuantizedLinear:
        """The same block with its tensors on ``device``."""
        move = {f: getattr(self, f) for f in ("qweight", "scales", "zeros")}
        return dataclasses.replace(self, **{f: None if t is None else t.to(device) for f, t in move.items()})

    def codes(self) -> torch.Tensor:
        if self.scheme.family == "int":
            return unpack(self.qweight, self.scheme.w_bits, self.k)
        return self.qweight

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the reference multiplies with (in the rotated basis if rotated)."""
        fam = family_for(self.scheme)
        s = None if self.scales is None else self.scales.float()
        z = None if self.zeros is None else self.zeros.float()
        return fam.decode(self.codes(), s, z).to(dtype)

    def prepare_input(self, x: torch.Tensor, rotated: dict | None = None) -> torch.Tensor:
        """What the kernel does to activations before the MMA: rotate, then quantize.

        ``rotated`` caches x's rotation by seed, for callers that apply many blocks (say
        every scheme of one block, in calibration) to one input."""
        if self.hadamard_seed is not None:
            if rotated is None:
                x = hadamard.rotate(x, self.hadamard_seed)
            else:
                if self.hadamard_seed not in rotated:
                    rotated[self.hadamard_seed] = hadamard.rotate(x, self.hadamard_seed)
                x = rotated[self.hadamard_seed]
        return quantize_activation(x, self.scheme)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None, rotated: dict | None = None) -> torch.Tensor:
        w = self.dequantize(x.dtype) if weight is None else weight
        return torch.nn.functional.linear(self.prepare_input(x, rotated), w)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {prefix + "qweight": self.qweight}
        if self.scales is not None:
            out[prefix + "scales"] = self.scales
        if self.zeros is not None:
            out[prefix + "zeros"] = self.zeros
        return out

    @classmethod
    def from_tensors(
        cls,
        scheme: Scheme,
        n: int,
        k: int,
        tensors: dict[str, torch.Tensor],
        prefix: str,
        hadamard_seed: int | None,
    ) -> QuantizedLinear:
        try:
            qw = tensors[prefix + "qweight"]
        except KeyError:
            raise MxServeError(f"checkpoint lacks tensor {prefix}qweight") from None
        ql = cls(scheme, n, k, qw, tensors.get(prefix + "scales"), tensors.get(prefix + "zeros"), hadamard_seed)
        ql.validate()
        return ql

    def validate(self) -> None:
        s = self.scheme
        if s.family == "int":
            expected = (self.n, self.k * s.w_bits // 32)
        else:
            expected = (self.n, self.k)
        if tuple(self.qweight.shape) != expected:
            raise MxServeError(f"packed weight has shape {tuple(self.qweight.shape)}, expected {expected} for {s.name}")
        if s.family != "none" and self.scales is None:
            raise MxServeError(f"scheme {s.name} needs scales")


def quantize_linear(
    w: torch.Tensor,
    scheme: Scheme,
    method: str = "rtn",
    h: torch.Tensor | None = None,
    hadamard_seed: int = 0,
) -> QuantizedLinear:
    """Quantize a [N, K] weight with RTN, GPTQ (needs Hessian ``h``) or GPTQ with rotation.

    bf16 is stored unrotated whatever the method: there is nothing to spread.
    """
    return quantize_linears([w], scheme, method, [h], hadamard_seed)[0]


def quantize_linears(
    ws: list[torch.Tensor],
    scheme: Scheme,
    method: str = "rtn",
    hs: list[torch.Tensor | None] | None = None,
    hadamard_seed: int = 0,
) -> list[QuantizedLinear]:
    """:func:`quantize_linear` for blocks of one shape in one scheme (a layer's experts), as one
    batch: GPTQ runs its column loop once for all of them (gptq.py), with the same results."""
    check_method(method)
    n, k = ws[0].shape
    if not scheme.supports(k):
        raise MxServeError(f"scheme {scheme.name} cannot quantize a block with K={k}")
    fam = family_for(scheme)
    seed = None
    w = torch.stack([x.detach().to(torch.float32) for x in ws])
    if scheme.family == "none":
        return [QuantizedLinear(scheme, n, k, x.to(torch.bfloat16)) for x in w]
    hs = hs if hs is not None else [None] * len(ws)
    if method != "rtn" and any(h is None for h in hs):
        raise MxServeError(f"method {method} needs calibration inputs (a Hessian)")
    h = torch.stack(hs) if method != "rtn" else None
    if method == "gptq-had":
        seed = hadamard_seed
        w = hadamard.rotate(w, seed)
        h = hadamard.rotate_hessian(h, seed)
    if method == "rtn":
        scales, zeros = fam.fit(w.view(-1, k))
        codes = fam.encode(w.view(-1, k), scales, zeros)
        codes, scales, zeros = (None if t is None else t.view(len(ws), n, -1) for t in (codes, scales, zeros))
    else:
        codes, scales, zeros = gptq(w, h, fam)
    out = []
    for i in range(len(ws)):
        qweight = pack(codes[i], scheme.w_bits) if scheme.family == "int" else codes[i]
        out.append(QuantizedLinear(scheme, n, k, qweight,
                                   None if scales is None else scales[i].to(torch.bfloat16),
                                   None if zeros is None else zeros[i].to(torch.bfloat16), seed))  # fmt: skip
    return out
