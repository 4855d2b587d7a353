"""Windowed routing statistics, folded on the host from cumulative counter snapshots.

The one place that defines what "load share" and "observed frequency" mean;
both engines' metrics and the re-planner read it.

Per layer and routed expert, at every fold:

- cumulative tokens since start;
- a sliding window over the last ``window`` seconds: the difference between
  the newest snapshot and the newest one at least ``window`` seconds older;
- an EWMA: exponentially decayed counts, halving every ``halflife`` seconds
  (``c <- c * 2^(-dt/halflife) + new``), which follows a drift smoothly and
  keeps its last value when traffic stops.

``share`` is an expert's part of the layer's routed slots (sums to 1 over the
experts); ``freq`` is tokens routed to the expert over tokens through the layer
(sums to top-k), the calibration profile's ``freq`` (profile.py). When traffic
stops, the shares keep the window that ended with the last tokens rather than
dropping to zero or shrinking to the last few tokens: a quiet server still has
a meaningful "current" routing.
Tokens per forward (the batch regime of the planner's latency term) comes from
the first MoE layer, which sees every forward pass.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

from router_stats.snapshot import CounterSnapshot


@dataclass
class LayerStats:
    layer: int
    cumulative: list[int]
    tokens: int
    window_share: list[float]
    ewma_share: list[float]
    window_freq: list[float]
    ewma_freq: list[float]

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RoutingStats:
    """What a fold produced: every layer's statistics and the batch regime."""

    time: float
    window_seconds: float
    halflife_seconds: float
    layers: list[LayerStats] = field(default_factory=list)
    forwards: int = 0
    tokens_per_forward_window: float = 0.0
    tokens_per_forward_ewma: float = 0.0

    def freqs(self, kind: str = "ewma") -> list[list[float]]:
        """Observed frequency per layer and routed expert, for the planner."""
        return [lay.ewma_freq if kind == "ewma" else lay.window_freq for lay in self.layers]

    def tokens_per_forward(self, kind: str = "ewma") -> float:
        return self.tokens_per_forward_ewma if kind == "ewma" else self.tokens_per_forward_window

    def to_json(self) -> dict:
        return {
            "time": self.time,
            "window_seconds": self.window_seconds,
            "halflife_seconds": self.halflife_seconds,
            "forwards": self.forwards,
            "tokens_per_forward": {"window": self.tokens_per_forward_window, "ewma": self.tokens_per_forward_ewma},
            "layers": [lay.to_json() for lay in self.layers],
        }


def _ratios(counts: list[float], total: float) -> list[float] | None:
    return [c / total for c in counts] if total > 0 else None


class _LayerWindow:
    def __init__(self, n_experts: int):
        self.history: collections.deque[tuple[float, CounterSnapshot]] = collections.deque()
        self.ewma = [0.0] * n_experts
        self.ewma_tokens = 0.0
        self.ewma_forwards = 0.0
        self.last: CounterSnapshot | None = None
        n = float(n_experts)
        # before any traffic: an even spread (shares) and no frequency
        self.window_share = [1.0 / n] * n_experts
        self.ewma_share = list(self.window_share)
        self.window_freq = [0.0] * n_experts
        self.ewma_freq = [0.0] * n_experts
        self.tpf_window = 0.0
        self.tpf_ewma = 0.0


class RoutingWindows:
    """Sliding-window and EWMA statistics over cumulative counter snapshots of every layer."""

    def __init__(self, window: float = 60.0, halflife: float = 30.0):
        if window <= 0 or halflife <= 0:
            raise ValueError(f"window and halflife must be positive, got {window} and {halflife}")
        self.window = window
        self.halflife = halflife
        self._layers: dict[int, _LayerWindow] = {}

    def fold(self, t: float, snapshots: dict[int, CounterSnapshot]) -> RoutingStats:
        """Fold one snapshot per layer (cumulative counts, read at time ``t``)."""
        out = RoutingStats(t, self.window, self.halflife)
        for pos, (layer, snap) in enumerate(sorted(snapshots.items())):
            w = self._layers.get(layer)
            if w is None or len(w.ewma) != len(snap.counts):
                w = self._layers[layer] = _LayerWindow(len(snap.counts))
            snap = self._fold_layer(w, t, snap)
            out.layers.append(
                LayerStats(layer, list(snap.counts), snap.tokens, list(w.window_share), list(w.ewma_share),
                           list(w.window_freq), list(w.ewma_freq))
            )
            if pos == 0:
                out.forwards = snap.forwards
                out.tokens_per_forward_window, out.tokens_per_forward_ewma = w.tpf_window, w.tpf_ewma
        return out

    def _fold_layer(self, w: _LayerWindow, t: float, snap: CounterSnapshot) -> CounterSnapshot:
        zero = CounterSnapshot([0] * len(snap.counts), 0, 0, [])
        prev = w.last
        if prev is None:
            prev = zero
            w.history.append((t, zero))  # what came before the first fold counts as in the window
        # counters only grow; a read racing the device's copy may lag by a forward, so never go back
        snap = CounterSnapshot([max(a, b) for a, b in zip(snap.counts, prev.counts)], max(snap.tokens, prev.tokens),
                               max(snap.forwards, prev.forwards), snap.forward_hist)
        # EWMA of counts: decay by the time since the last fold, then add what came since
        decay = math.pow(0.5, max(t - w.history[-1][0], 0.0) / self.halflife)
        w.ewma = [e * decay + (c - p) for e, c, p in zip(w.ewma, snap.counts, prev.counts)]
        w.ewma_tokens = w.ewma_tokens * decay + (snap.tokens - prev.tokens)
        w.ewma_forwards = w.ewma_forwards * decay + (snap.forwards - prev.forwards)
        # sliding window: the base is the newest snapshot at least `window` seconds old
        w.history.append((t, snap))
        while len(w.history) > 2 and w.history[1][0] <= t - self.window:
            w.history.popleft()
        base = w.history[0][1]
        win = [c - b for c, b in zip(snap.counts, base.counts)]
        win_tokens = snap.tokens - base.tokens
        win_forwards = snap.forwards - base.forwards
        # shares move only while traffic comes in: when it stops they keep the window that ended with it
        share = _ratios(win, sum(win)) if snap.counts != prev.counts else None
        if share is not None:
            w.window_share, w.window_freq = share, _ratios(win, win_tokens) or [0.0] * len(win)
            w.tpf_window = win_tokens / win_forwards if win_forwards > 0 else w.tpf_window
        share = _ratios(w.ewma, sum(w.ewma))
        if share is not None:
            w.ewma_share, w.ewma_freq = share, _ratios(w.ewma, w.ewma_tokens) or [0.0] * len(win)
            w.tpf_ewma = w.ewma_tokens / w.ewma_forwards if w.ewma_forwards > 0 else w.tpf_ewma
        w.last = snap
        return snap
