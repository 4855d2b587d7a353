"""Per-layer expert counters.

Counting is a bincount added into a preallocated tensor on the model's device:
no host synchronisation per forward pass. Readers call :meth:`snapshot`, which
copies to the host, when they need the numbers (a metrics scrape, a re-plan).
"""

from __future__ import annotations

import torch


class ExpertCounter:
    """Tokens routed to each of ``n_experts`` experts of one MoE layer, since the last reset."""

    def __init__(self, n_experts: int, device: torch.device | str = "cpu"):
        self.n_experts = n_experts
        self.counts = torch.zeros(n_experts, dtype=torch.int64, device=device)
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)

    def record(self, topk_ids: torch.Tensor) -> None:
        """Add one forward pass's routing decisions ([T, k] expert ids; -1 marks a padded slot)."""
        ids = topk_ids.reshape(-1).to(torch.int64)
        valid = (ids >= 0).to(torch.int64)
        # index_add_ rather than bincount, which synchronises with the host on CUDA
        self.counts.index_add_(0, ids.clamp(min=0), valid)
        self.tokens += (topk_ids >= 0).any(dim=-1).sum()

    def snapshot(self, reset: bool = False) -> tuple[list[int], int]:
        """(counts per expert, tokens) on the host; optionally start a new window."""
        counts, tokens = self.counts.tolist(), int(self.tokens.item())
        if reset:
            self.counts.zero_()
            self.tokens.zero_()
        return counts, tokens

    def to(self, device: torch.device | str) -> ExpertCounter:
        self.counts = self.counts.to(device)
        self.tokens = self.tokens.to(device)
        return self
