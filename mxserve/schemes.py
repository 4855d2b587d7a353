"""Precision schemes: the one place that maps scheme names to what they mean and cost.

A scheme name reads ``w<bits>a<bits>[g<group>][fp8]``, or ``bf16``:

- ``w4a16g128``: 4-bit asymmetric integer weights, one bf16 scale and zero per
  128 inputs, bf16 activations (weight-only; the kernel dequantizes to bf16).
- ``w1a16g128``: 1-bit (binary, min/max per group): 1.25 bits; lets a plan at
  2.25 bits mix below and above w2 (as the paper's w1 schemes do).
- ``w8a16``: 8-bit asymmetric integer weights, per output channel.
- ``w8a8fp8``: fp8 e4m3 weights with a per-channel scale, activations quantized
  per token to fp8 at run time (fp8 tensor cores on Hopper).
- ``w4a4``: symmetric 4-bit weights per channel and 4-bit activations per
  token (as in the paper; int8 tensor cores on Hopper, which has no int4 MMA).

Bits per weight include the scale/zero overhead (bf16 each), so w4a16g128
counts 4 + 32/128 = 4.25. Per-channel overhead depends on the input size K.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mxserve.errors import MxServeError

SCALE_BITS = 16  # scales and zero points are stored as bf16

_NAME_RE = re.compile(r"^w(\d+)a(\d+)(?:g(\d+))?(fp8)?$")
_WEIGHT_BITS = (1, 2, 3, 4, 8)
_GROUPS = (32, 64, 128, 256)


@dataclass(frozen=True)
class Scheme:
    """One precision scheme for a linear block.

    ``family`` selects the quantizer: ``none`` (bf16), ``int`` (integer grid) or
    ``fp8`` (e4m3 grid). ``group`` is None for per-channel scales.
    """

    name: str
    family: str
    w_bits: int
    a_bits: int
    group: int | None
    symmetric: bool

    @property
    def weight_only(self) -> bool:
        return self.a_bits == 16

    @property
    def mma(self) -> str:
        """Tensor-core input type the kernel uses for this scheme on Hopper."""
        if self.family == "fp8":
            return "fp8"
        if self.a_bits < 16:
            return "int8"  # w4a4 runs on int8 MMA: Hopper has no int4 MMA
        return "bf16"

    def bits_per_weight(self, k: int | None = None) -> float:
        """Storage bits per weight, scale and zero overhead included.

        ``k`` is the input size of the block; per-channel schemes need it for
        their (small) overhead and count none without it.
        """
        if self.family == "none":
            return 16.0
        params = 1 if (self.symmetric or self.family == "fp8") else 2
        if self.group is not None:
            return self.w_bits + params * SCALE_BITS / self.group
        if k is None:
            return float(self.w_bits)
        return self.w_bits + params * SCALE_BITS / k

    def supports(self, k: int) -> bool:
        """Whether a block with input size ``k`` can use this scheme."""
        if self.family == "none" or self.family == "fp8":
            return True
        if self.group is not None and k % self.group:
            return False
        return k % 32 == 0  # packing puts whole 32-value runs into int32 words

    def __str__(self) -> str:
        return self.name


def _build(name: str) -> Scheme:
    if name == "bf16":
        return Scheme("bf16", "none", 16, 16, None, False)
    m = _NAME_RE.match(name)
    if not m:
        raise ValueError(name)
    w, a, g, fp8 = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
    group = int(g) if g else None
    if fp8:
        if (w, a, group) != (8, 8, None):
            raise ValueError(name)
        return Scheme(name, "fp8", 8, 8, None, True)
    if w not in _WEIGHT_BITS or a not in (4, 8, 16) or (group is not None and group not in _GROUPS):
        raise ValueError(name)
    if a != 16 and (a != w or w not in (4, 8)):
        raise ValueError(name)  # weight-activation int schemes: w4a4, w8a8
    if a != 16 and group is not None:
        raise ValueError(name)
    # Weight-only schemes are asymmetric (a zero point per group); weight-activation
    # schemes are symmetric so that the integer MMA needs no zero-point correction.
    return Scheme(name, "int", w, a, group, symmetric=(a != 16))


CANONICAL = ("bf16", "w8a16", "w8a8fp8", "w4a16g128", "w3a16g128", "w2a16g128", "w1a16g128", "w4a4")
"""Default candidate set: what `mxserve calibrate` measures when not told otherwise."""

_CACHE: dict[str, Scheme] = {}


def get_scheme(name: str) -> Scheme:
    """Parse a scheme name; an unknown name is a clear MxServeError."""
    key = name.strip().lower()
    if key not in _CACHE:
        try:
            _CACHE[key] = _build(key)
        except ValueError:
            raise MxServeError(
                f"unknown scheme {name!r}; known schemes: {', '.join(CANONICAL)} "
                "(pattern w<1|2|3|4|8>a16[g32|g64|g128|g256], w4a4, w8a8, w8a8fp8)"
            ) from None
    return _CACHE[key]


def parse_schemes(text: str | list[str] | None) -> list[Scheme]:
    """Parse a comma-separated list (or list) of scheme names; None gives CANONICAL."""
    if text is None:
        names: list[str] = list(CANONICAL)
    elif isinstance(text, str):
        names = [t for t in text.split(",") if t.strip()]
    else:
        names = [t for item in text for t in item.split(",") if t.strip()]
    if not names:
        raise MxServeError("empty scheme list")
    out: list[Scheme] = []
    for n in names:
        s = get_scheme(n)
        if s not in out:
            out.append(s)
    return out


def parse_budget(text: str | float) -> float:
    """Parse a bit budget: ``4bit``, ``3.25bit``, ``3.25`` or a number."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        t = text.strip().lower()
        for suffix in ("bits", "bit", "b"):
            if t.endswith(suffix):
                t = t[: -len(suffix)]
                break
        try:
            value = float(t)
        except ValueError:
            raise MxServeError(f"bad budget {text!r}: write it as 4bit, 3.25bit or 3.25") from None
    if not (value > 0) or value != value:
        raise MxServeError(f"bad budget {text!r}: it must be a positive number of bits")
    if value > 16:
        raise MxServeError(f"budget {value:g} bits is above bf16 (16 bits): nothing to quantize")
    return value
