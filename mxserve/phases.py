"""Wall time and peak memory (GPU, host) of one pipeline phase: calibrate, quantize.

On a real-size model these are the numbers a user plans a launch by, so each
phase logs one line in a fixed form (benchmarks parse it):

    phase calibrate: 312.4 s, peak GPU 12.30 GiB, peak host 5.21 GiB
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

GIB = 1 << 30
LINE = re.compile(r"phase (\w+): ([\d.]+) s, peak GPU ([\d.]+|-) GiB, peak host ([\d.]+) GiB")


@dataclass
class PhaseRecord:
    name: str
    seconds: float = 0.0
    peak_gpu_gib: float | None = None  # torch's allocations on the current GPU; None without one
    peak_host_gib: float = 0.0  # resident set size of this process

    def line(self) -> str:
        gpu = "-" if self.peak_gpu_gib is None else f"{self.peak_gpu_gib:.2f}"
        return f"phase {self.name}: {self.seconds:.1f} s, peak GPU {gpu} GiB, peak host {self.peak_host_gib:.2f} GiB"


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no procfs: the process's peak so far is the best bound
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def phase(name: str, log: Callable[[str], None] | None = print, interval: float = 0.2) -> Iterator[PhaseRecord]:
    """Measure the enclosed block; the record is filled (and logged) when it ends."""
    rec = PhaseRecord(name)
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    peak = [_rss_bytes()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval):
            peak[0] = max(peak[0], _rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        yield rec
    finally:
        rec.seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        rec.peak_host_gib = max(peak[0], _rss_bytes()) / GIB
        if gpu:
            rec.peak_gpu_gib = torch.cuda.max_memory_allocated() / GIB
        if log is not None:
            log(rec.line())


def parse_phases(text: str) -> dict[str, PhaseRecord]:
    """Phase records from a log (the last line of each phase wins)."""
    out = {}
    for m in LINE.finditer(text):
        gpu = None if m[3] == "-" else float(m[3])
        out[m[1]] = PhaseRecord(m[1], float(m[2]), gpu, float(m[4]))
    return out
