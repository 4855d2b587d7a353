"""Kernel cost model: time of one expert's GEMM for a scheme, shape and token count.

The planner's latency term sums these over experts. Two implementations behind
one interface:

- :class:`RooflineCostModel`, the default where nothing was measured (e.g. a
  CPU): max(bytes / bandwidth, FLOPs / peak of the scheme's MMA type), with the
  token count padded to the kernel's M tile and a fixed per-expert overhead.
- :class:`MeasuredCostModel`, read from a :class:`KernelProfile` written by
  ``mxserve profile`` on a GPU: interpolates measured times over token counts,
  falling back to the roofline for shapes or schemes it has not seen.

Kernel profile JSON (format v1)::

    {"format": "mxmoe-kernel-profile", "version": 1, "device": "NVIDIA H100 80GB HBM3",
     "entries": [{"scheme": "w4a16g128", "n": 2816, "k": 2048, "tokens": 16, "seconds": 1.2e-5}, ...]}
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from mxserve.jsonio import Versioned
from mxserve.schemes import Scheme, get_scheme


class CostModel:
    """Interface: seconds for a [tokens, K] x [K, N] GEMM of one expert in ``scheme``."""

    def time(self, scheme: Scheme, n: int, k: int, tokens: float) -> float:
        raise NotImplementedError


@dataclass
class RooflineCostModel(CostModel):
    """Analytic roofline; defaults are an H100 SXM (bandwidth and bf16 rate as measured on the lent one)."""

    bandwidth: float = 3.0e12  # bytes/s
    peak: dict[str, float] = field(default_factory=lambda: {"bf16": 750e12, "fp8": 1400e12, "int8": 1400e12})
    dequant_efficiency: float = 0.7  # weight-only schemes: share of bf16 MMA peak left after dequant
    tile_m: int = 16
    overhead: float = 2e-6  # seconds per expert with tokens (tile scheduling, epilogue)

    def time(self, scheme: Scheme, n: int, k: int, tokens: float) -> float:
        if tokens <= 0:
            return 0.0
        m = math.ceil(tokens / self.tile_m) * self.tile_m
        a_bytes = 2 if scheme.a_bits >= 16 else 1
        nbytes = n * k * scheme.bits_per_weight(k) / 8 + tokens * k * a_bytes + tokens * n * 2
        peak = self.peak[scheme.mma]
        if scheme.weight_only and scheme.family != "none":
            peak *= self.dequant_efficiency
        return max(nbytes / self.bandwidth, 2.0 * m * n * k / peak) + self.overhead


@dataclass
class ProfileEntry:
    scheme: str
    n: int
    k: int
    tokens: int
    seconds: float


@dataclass
class KernelProfile(Versioned):
    device: str
    entries: list[ProfileEntry] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    FORMAT = "mxmoe-kernel-profile"
    VERSION = 1
    WHAT = "kernel profile"

    @classmethod
    def from_json(cls, obj: dict) -> KernelProfile:
        entries = [ProfileEntry(**e) for e in obj["entries"]]
        for e in entries:
            get_scheme(e.scheme)
            if e.seconds < 0 or e.tokens < 0:
                raise ValueError(f"negative value in {e}")
        return cls(device=str(obj["device"]), entries=entries, meta=dict(obj.get("meta", {})))


class MeasuredCostModel(CostModel):
    """Piecewise-linear interpolation of measured times over the token count."""

    def __init__(self, profile: KernelProfile, fallback: CostModel | None = None):
        self.profile = profile
        self.fallback = fallback or RooflineCostModel()
        self.curves: dict[tuple[str, int, int], tuple[list[int], list[float]]] = {}
        self.missed: set[tuple[str, int, int]] = set()  # (scheme, N, K) priced by the fallback
        grouped: dict[tuple[str, int, int], dict[int, float]] = {}
        for e in profile.entries:
            grouped.setdefault((e.scheme, e.n, e.k), {})[e.tokens] = e.seconds
        for key, pts in grouped.items():
            xs = sorted(pts)
            self.curves[key] = (xs, [pts[x] for x in xs])

    def time(self, scheme: Scheme, n: int, k: int, tokens: float) -> float:
        if tokens <= 0:
            return 0.0
        curve = self.curves.get((scheme.name, n, k))
        if curve is None:
            self.missed.add((scheme.name, n, k))
            return self.fallback.time(scheme, n, k, tokens)
        xs, ys = curve
        if tokens <= xs[0]:
            return ys[0]
        if tokens >= xs[-1]:
            return ys[-1] * tokens / xs[-1]  # compute-bound beyond the last point: linear in tokens
        i = bisect.bisect_left(xs, tokens)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)


def expected_time(cost: CostModel, scheme: Scheme, n: int, k: int, tokens: int, freq: float) -> float:
    """An expert's expected GEMM time in a forward of ``tokens`` tokens, each routed to it with
    probability ``freq`` (a shared expert: 1). It runs only when some token picks it, with chance
    p = 1 - (1 - freq)^tokens, and then on tokens * freq / p rows. At decode a rarely picked expert
    so costs little and a shared one its whole weight read every step; charging every expert its
    whole read made the latency term blind to which experts get the bits."""
    freq = min(max(freq, 0.0), 1.0)
    p = 1.0 - (1.0 - freq) ** tokens
    return p * cost.time(scheme, n, k, tokens * freq / p) if p > 0 else 0.0


def cost_model(kernel_profile: str | None) -> CostModel:
    return MeasuredCostModel(KernelProfile.load(kernel_profile)) if kernel_profile else RooflineCostModel()
