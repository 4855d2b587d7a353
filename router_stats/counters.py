"""Per-layer expert counters, on the model's device.

Counting is an index_add_ into a preallocated tensor on the model's device (on a
GPU, one Triton kernel that makes the same additions: mxkernels/count.py): no
host synchronisation per forward pass, and the ops are captured by CUDA graphs
(SGLang replays them with the decode step). On a GPU each forward also puts
the counts into a pinned host mirror, so a reader thread gets them without any
CUDA call of its own: a synchronising copy from another thread would break
SGLang's CUDA-graph capture, which forbids such calls from every thread while it
runs. The counting kernel writes the mirror itself (pinned memory is mapped on a
GPU with unified addressing), checked once per device; where it cannot, an
asynchronous copy per forward does. Counts are cumulative; the window logic
(windows.py) works on differences of snapshots.
"""

from __future__ import annotations

import torch

from router_stats.snapshot import FORWARD_TOKEN_BUCKETS, CounterSnapshot

__all__ = ["FORWARD_TOKEN_BUCKETS", "CounterSnapshot", "ExpertCounter"]


class ExpertCounter:
    """Tokens routed to each of ``n_experts`` experts of one MoE layer, and tokens per forward."""

    def __init__(self, n_experts: int, device: torch.device | str = "cpu"):
        self.n_experts = n_experts
        # one buffer, so a snapshot is one copy: [counts (E), tokens, forwards, histogram (B + 1)]
        self.buf = torch.zeros(n_experts + 2 + len(FORWARD_TOKEN_BUCKETS) + 1, dtype=torch.int64, device=device)
        self.bounds = torch.tensor(FORWARD_TOKEN_BUCKETS, dtype=torch.int64, device=device)
        self.host = self._mirror()
        self.mapped = False  # the counting kernel writes self.host itself (to())

    def _mirror(self) -> torch.Tensor:
        if self.buf.device.type != "cuda":
            return self.buf  # already on the host
        return torch.zeros(self.buf.shape, dtype=self.buf.dtype, pin_memory=True)

    @property
    def counts(self) -> torch.Tensor:
        return self.buf[: self.n_experts]

    @property
    def device(self) -> torch.device:
        return self.buf.device

    def record(self, topk_ids: torch.Tensor) -> None:
        """Add one forward pass's routing decisions ([T, k] expert ids; -1 marks a padded slot)."""
        if self.buf.is_cuda:  # one kernel for the ops below, each a CUDA-graph node of its own
            from mxkernels.count import count_routing

            buf, bounds, host = self.kernel_args()
            count_routing(topk_ids, buf, bounds, self.n_experts, host)
            self.mirrored()
            return
        e = self.n_experts
        ids = topk_ids.reshape(-1).to(torch.int64)
        valid = (ids >= 0).to(torch.int64)
        # index_add_ rather than bincount, which synchronises with the host on CUDA
        self.buf.index_add_(0, ids.clamp(min=0), valid)
        n = (topk_ids >= 0).any(dim=-1).sum().to(torch.int64)
        ran = (n > 0).to(torch.int64)
        bucket = torch.bucketize(n, self.bounds)  # first bound >= n, as Prometheus' le
        at = torch.stack([torch.full_like(bucket, e), torch.full_like(bucket, e + 1), e + 2 + bucket])
        self.buf.index_add_(0, at, torch.stack([n, ran, ran]))
        if self.host is not self.buf:
            self.host.copy_(self.buf, non_blocking=True)

    def kernel_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(buffer, bucket bounds, host mirror or None) for a launch that counts (mxkernels.count.count_routing);
        :meth:`mirrored` after it."""
        return self.buf, self.bounds, self.host if self.mapped else None

    def mirrored(self) -> None:
        """After a counting launch on the GPU: the host mirror copied, where the launch could not write it."""
        if not self.mapped and self.host is not self.buf:
            self.host.copy_(self.buf, non_blocking=True)

    def snapshot(self) -> CounterSnapshot:
        """The counts as of the last forward whose copy has landed (no CUDA call)."""
        return CounterSnapshot.from_buffer(self.host.tolist(), self.n_experts)

    def to(self, device: torch.device | str) -> ExpertCounter:
        self.buf = self.buf.to(device)
        self.bounds = self.bounds.to(device)
        self.host = self._mirror()
        if self.host is not self.buf:
            self.host.copy_(self.buf)
        self.mapped = self.buf.is_cuda and _kernel_writes_host(self.buf, self.bounds, self.host, self.n_experts)
        return self


_writes_host: dict[torch.device, bool] = {}


def _kernel_writes_host(buf: torch.Tensor, bounds: torch.Tensor, host: torch.Tensor, n_experts: int) -> bool:
    """Whether the counting kernel can store into pinned host memory on ``buf``'s GPU: tried once per
    device, on a pass of no tokens (which adds nothing), before any CUDA graph is captured."""
    if buf.device not in _writes_host:
        from mxkernels.count import count_routing

        host.fill_(-1)
        try:
            count_routing(torch.empty(0, 1, dtype=torch.int32, device=buf.device), buf, bounds, n_experts, host)
            torch.cuda.synchronize(buf.device)
            _writes_host[buf.device] = torch.equal(host, buf.cpu())
        except Exception:  # noqa: BLE001 - Triton or the driver refused the host pointer: copy instead
            _writes_host[buf.device] = False
        host.copy_(buf)
    return _writes_host[buf.device]
