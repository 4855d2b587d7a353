"""A counter's cumulative counts as the host reads them: what the windows fold (torch-free, so the fold process of
router_stats/apart.py does not import torch)."""

from __future__ import annotations

from dataclasses import dataclass

# Upper bounds of the tokens-per-forward histogram (Prometheus ``le`` buckets; +Inf after).
FORWARD_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class CounterSnapshot:
    """Cumulative counts of one layer since the counter was made."""

    counts: list[int]  # tokens routed to each routed expert
    tokens: int  # tokens through the layer
    forwards: int  # forward passes with at least one token
    forward_hist: list[int]  # forward passes per tokens bucket (FORWARD_TOKEN_BUCKETS, then +Inf)

    @classmethod
    def from_buffer(cls, v: list[int], n_experts: int) -> CounterSnapshot:
        """From a counter's buffer: per-expert counts, tokens, forwards, then the histogram (ExpertCounter.buf)."""
        return cls(v[:n_experts], v[n_experts], v[n_experts + 1], v[n_experts + 2 :])
