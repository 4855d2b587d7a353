"""The fold loop: read the layers' counters at a fixed interval, off the hot path, and export.

One :class:`RouterStats` per serving process holds the windows (windows.py)
and the metrics (metrics.py). The embedded engine makes one for its app; under
SGLang the plugin attaches each layer to the scheduler process's statistics
(:func:`process_stats`), which export into SGLang's multiprocess metrics from a
fold process of their own (apart.py). Readers (the admin API, the re-planner)
call :meth:`RouterStats.latest` or :meth:`RouterStats.fold`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from router_stats.apart import FoldApart
from router_stats.metrics import MxMetrics, Precision, plan_versions, precision_of
from router_stats.windows import RoutingStats, RoutingWindows

log = logging.getLogger("mxserve.router_stats")


class RouterStats:
    """Windowed routing statistics of a set of runtime layers, exported to Prometheus.

    ``layers`` returns the runtime layers (objects with ``layer_index``,
    ``counter``, ``experts_q`` and ``version``, e.g. MixedExperts); ``plan_meta``
    returns (budget bits, method) of the served plan.
    """

    def __init__(
        self,
        layers: Callable[[], list],
        metrics: MxMetrics | None,
        plan_meta: Callable[[], tuple[float, str]] = lambda: (0.0, ""),
        interval: float = 1.0,
        window: float = 60.0,
        halflife: float = 30.0,
    ):
        if interval <= 0:
            raise ValueError(f"the stats interval must be positive, got {interval}")
        self._layers = layers
        self.metrics = metrics
        self.plan_meta = plan_meta
        self.interval = interval
        self.windows = RoutingWindows(window, halflife)
        self._lock = threading.Lock()
        self._latest: RoutingStats | None = None
        self._versions: tuple | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if metrics is not None:
            metrics.set_windows(window, halflife)

    def layers(self) -> list:
        return sorted(self._layers(), key=lambda m: m.layer_index)

    def precision(self) -> Precision:
        return precision_of(self.layers(), *self.plan_meta())

    def fold(self) -> RoutingStats:
        """Read every counter now, fold and export; returns the new statistics."""
        with self._lock:
            layers = self.layers()
            snaps = {m.layer_index: m.counter.snapshot() for m in layers}
            stats = self.windows.fold(time.time(), snaps)
            if self.metrics is not None:
                # the precision first: the routing's export prices the served blocks (mxserve_decode_bytes_per_token)
                versions = plan_versions(layers)
                if versions != self._versions:
                    self.metrics.set_precision(precision_of(layers, *self.plan_meta()))
                    self._versions = versions
                first = snaps[min(snaps)].forward_hist if snaps else []
                self.metrics.update_routing(stats, first)
            self._latest = stats
            return stats

    def latest(self) -> RoutingStats:
        """The last fold's statistics (folding now if there was none)."""
        return self._latest if self._latest is not None else self.fold()

    def refresh_precision(self) -> None:
        """Re-export the precision series now (after a swap), without waiting for the next fold."""
        with self._lock:
            self._versions = None
        self.fold()

    def start(self) -> RouterStats:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mxserve-router-stats", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.fold()
            except Exception:  # noqa: BLE001 - statistics must never take the server down
                log.exception("router_stats: fold failed")


# the fold in a process of its own (apart.py) unless MXSERVE_STATS_FOLD=thread folds in this one, as before
FOLD_ENV = "MXSERVE_STATS_FOLD"
FOLD_MODES = ("process", "thread")
_process: RouterStats | FoldApart | None = None
_process_metrics: MxMetrics | None = None
_process_layers: dict[int, object] = {}
_process_plan: list = [0.0, ""]


def process_metrics() -> MxMetrics | None:
    """This process's metrics, when it exports (see :func:`process_stats`): under SGLang the swaps' and re-plans'
    series, which the scheduler writes itself."""
    return _process_metrics


def process_stats(layer, budget_bits: float, method: str) -> RouterStats | FoldApart | None:
    """Attach a runtime layer to this process's routing statistics (SGLang's scheduler).

    Exports only when SGLang runs with metrics (``--enable-metrics``, which
    ``mxserve launch`` sets): prometheus_client is then in multiprocess mode
    and SGLang's ``/metrics`` reads what this process and its fold process write.
    The fold runs in a process of its own (:class:`~router_stats.apart.FoldApart`);
    ``MXSERVE_STATS_FOLD=thread`` folds in a thread of this one (:class:`RouterStats`).
    """
    global _process, _process_metrics
    _process_layers[layer.layer_index] = layer
    _process_plan[:] = [budget_bits, method]
    if _process is None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        env = os.environ.get
        mode = env(FOLD_ENV, "process")
        if mode not in FOLD_MODES:  # mxserve launch refuses it first (engines/sglang_launch.stats_env)
            raise ValueError(f"{FOLD_ENV}={mode}: 'process' (the default) or 'thread'")
        settings = dict(interval=float(env("MXSERVE_STATS_INTERVAL", "1")),
                        window=float(env("MXSERVE_STATS_WINDOW", "60")),
                        halflife=float(env("MXSERVE_STATS_HALFLIFE", "30")))  # fmt: skip
        layers, plan = (lambda: list(_process_layers.values())), (lambda: (_process_plan[0], _process_plan[1]))
        _process_metrics = MxMetrics()
        if mode == "thread":
            _process = RouterStats(layers, _process_metrics, plan, **settings).start()
        else:
            _process = FoldApart(layers, plan, **settings).start()
    return _process
