"""The fold in a process of its own, for SGLang's scheduler.

A fold in the scheduler's process (service.RouterStats' thread) holds that process's GIL for its thousands of
Prometheus writes, and the scheduler, which launches each decode step from Python, waits for it: on the H100 a
request that met a fold took up to 16 ms longer (benchmarks/README.md, fiftieth session). So there
:class:`FoldApart` only copies each layer's counter buffer into a pipe every interval (a few bytes a layer), and a
child process (``python -m router_stats.apart``, which imports neither torch nor mxserve) folds the windows and
writes the series into prometheus_client's multiprocess files, which SGLang's ``/metrics`` reads as it reads the
scheduler's. The precision series go the same way whenever a layer's plan version changes (startup, swaps).

The pipe carries frames: one kind byte, a little-endian uint32 length, the payload. ``C``: the counts (a float64
time, a uint32 layer count, then per layer int32 index, uint32 experts, uint32 values and the int64 buffer);
``P``: the precision as JSON (metrics.Precision.to_json); ``S``: answered with a line on the child's stdout once
everything before it is exported.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import BinaryIO

from router_stats.metrics import Precision, plan_versions, precision_of
from router_stats.snapshot import CounterSnapshot
from router_stats.windows import RoutingWindows

log = logging.getLogger("mxserve.router_stats")

_FRAME = struct.Struct("<cI")
_HEAD = struct.Struct("<dI")
_LAYER = struct.Struct("<iII")


def frame(kind: bytes, payload: bytes) -> bytes:
    return _FRAME.pack(kind, len(payload)) + payload


def read_frame(inp: BinaryIO) -> tuple[bytes, bytes] | None:
    """The next frame (kind, payload); None at the end of the stream."""
    head = inp.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    kind, n = _FRAME.unpack(head)
    payload = inp.read(n)
    return None if len(payload) < n else (kind, payload)


def pack_counts(t: float, layers: list[tuple[int, int, bytes]]) -> bytes:
    """``C``'s payload: (layer index, experts, the counter's buffer as native int64 bytes) per layer."""
    parts = [_HEAD.pack(t, len(layers))]
    for index, experts, buf in layers:
        parts += [_LAYER.pack(index, experts, len(buf) // 8), buf]
    return b"".join(parts)


def unpack_counts(payload: bytes) -> tuple[float, dict[int, CounterSnapshot]]:
    t, n = _HEAD.unpack_from(payload)
    at, snaps = _HEAD.size, {}
    for _ in range(n):
        index, experts, values = _LAYER.unpack_from(payload, at)
        at += _LAYER.size
        v = list(struct.unpack_from(f"<{values}q", payload, at))
        at += 8 * values
        snaps[index] = CounterSnapshot.from_buffer(v, experts)
    return t, snaps


class FoldApart:
    """Publishes the counters of ``layers()`` (runtime layers, as RouterStats reads them) to a fold process every
    ``interval`` seconds; the process exports with the windows ``window`` and ``halflife``."""

    def __init__(self, layers: Callable[[], list], plan_meta: Callable[[], tuple[float, str]],
                 interval: float = 1.0, window: float = 60.0, halflife: float = 30.0):  # fmt: skip
        if interval <= 0:
            raise ValueError(f"the stats interval must be positive, got {interval}")
        RoutingWindows(window, halflife)  # refused here, not in the child
        self._layers, self.plan_meta, self.interval = layers, plan_meta, interval
        self.window, self.halflife = window, halflife
        self._lock = threading.Lock()
        self._versions: tuple | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None

    def start(self) -> FoldApart:
        if self._proc is None:
            home = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (home, os.environ.get("PYTHONPATH")) if p))
            config = json.dumps({"window": self.window, "halflife": self.halflife, "parent": os.getpid()})
            self._proc = subprocess.Popen([sys.executable, "-m", "router_stats.apart", config], env=env,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
            self._thread = threading.Thread(target=self._loop, name="mxserve-router-stats", daemon=True)
            self._thread.start()
        return self

    def publish(self) -> None:
        """This process's part of a fold: the precision where a layer's plan changed, then every counter's buffer."""
        with self._lock:
            layers = sorted(self._layers(), key=lambda m: m.layer_index)
            versions = plan_versions(layers)
            if versions != self._versions:
                p = precision_of(layers, *self.plan_meta())
                self._send(frame(b"P", json.dumps(p.to_json()).encode()))
                self._versions = versions
            counts = [(m.layer_index, m.counter.n_experts, m.counter.host.numpy().tobytes()) for m in layers]
            self._send(frame(b"C", pack_counts(time.time(), counts)))

    def sync(self, timeout: float = 60.0) -> None:
        """Wait until the fold process has exported everything published before."""
        with self._lock:
            self._send(frame(b"S", b""))
            got: list[bytes] = []
            reader = threading.Thread(target=lambda: got.append(self._proc.stdout.readline()), daemon=True)
            reader.start()
            reader.join(timeout)
            if not got or not got[0]:
                raise RuntimeError(f"router_stats: the fold process did not answer within {timeout:g} s")

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop publishing; the fold process exports what it was sent and exits. Its exit code."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._proc is None:
            return None
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            return self._proc.wait()

    def _send(self, data: bytes) -> None:
        self._proc.stdin.write(data)
        self._proc.stdin.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.publish()
            except (BrokenPipeError, ValueError):  # the child ended: its counts cannot be taken up by another
                log.error("router_stats: the fold process ended (exit code %s); the routing series stay where they "
                          "were, serving goes on", self._proc.poll())  # fmt: skip
                return
            except Exception:  # noqa: BLE001 - statistics must never take the server down
                log.exception("router_stats: publishing the counters failed")


def serve(inp: BinaryIO, out: BinaryIO, window: float, halflife: float) -> None:
    """The fold process's loop: fold and export each frame of counts, until the stream ends."""
    from router_stats.metrics import MxMetrics

    metrics = MxMetrics()
    metrics.set_windows(window, halflife)
    windows = RoutingWindows(window, halflife)
    while (got := read_frame(inp)) is not None:
        kind, payload = got
        if kind == b"C":
            t, snaps = unpack_counts(payload)
            if snaps:
                metrics.update_routing(windows.fold(t, snaps), snaps[min(snaps)].forward_hist)
        elif kind == b"P":
            metrics.set_precision(Precision.from_json(json.loads(payload)))
        elif kind == b"S":
            out.write(b"ok\n")
            out.flush()


def _exit_with(parent: int) -> None:
    """Exit when the publishing process is gone, though a process it forked may still hold the pipe open."""
    while True:
        time.sleep(2.0)
        if os.getppid() != parent:
            os._exit(0)


def main() -> None:
    config = json.loads(sys.argv[1])
    threading.Thread(target=_exit_with, args=(config["parent"],), daemon=True).start()
    serve(sys.stdin.buffer, sys.stdout.buffer, config["window"], config["halflife"])


if __name__ == "__main__":
    main()
