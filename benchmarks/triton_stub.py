"""Triton's own launch path on a machine without a GPU: each launch compiles, nothing runs.

A stand-in driver answers what `JITFunction.run` asks of a GPU driver (the target, device 0, a
stream), and every launch becomes a compile-only one (run's ``warmup``): the kernel is compiled
into Triton's cache, as the first launch on a GPU would compile it, and not launched. Used by
benchmarks/launch_compiles.py and tests/test_precompile.py (only Triton: it works on any checkout).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock


class _Driver:
    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0


@contextlib.contextmanager
def compile_only_launches(target) -> Iterator[None]:
    """Within: every Triton launch compiles for ``target`` (a GPUTarget) and runs nothing."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    before = getattr(driver, "_active", None)  # None: made lazily on first use (reset_active would make it now)
    driver.set_active(_Driver(target))
    try:
        with mock.patch.object(JITFunction, "run", compile_only):
            yield
    finally:
        driver.set_active(before)
