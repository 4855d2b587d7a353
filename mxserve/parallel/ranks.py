"""Which rank of an expert-parallel group holds which routed experts (no heavy imports: the
planner uses it too)."""

from __future__ import annotations

from mxserve.errors import MxServeError


def ep_range(n_routed: int, ep_size: int, rank: int) -> range:
    """The routed experts rank ``rank`` holds (contiguous, as SGLang's expert parallel assigns)."""
    if n_routed % ep_size:
        raise MxServeError(f"--ep {ep_size}: {n_routed} routed experts do not split evenly over {ep_size} ranks")
    per = n_routed // ep_size
    return range(rank * per, (rank + 1) * per)
