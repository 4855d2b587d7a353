"""Test ranks (mp.spawn children) in a gloo process group."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch.distributed as dist


@contextlib.contextmanager
def gloo_rank(store: str, rank: int, world: int) -> Iterator[None]:
    """Within: this process is rank ``rank`` of ``world`` in a gloo group. On the way out the ranks
    meet; then a rank whose body passed leaves at once (``os._exit``): gloo's teardown at
    interpreter exit can abort a process that has finished ("terminate called without an active
    exception", SIGABRT, seen in CI). A body that raised propagates, and mp.spawn reports it."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.barrier()  # neither rank leaves while the other still uses the group
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
