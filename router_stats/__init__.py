"""Routing statistics: device counters, windows folded on the host, Prometheus series.

Nothing here imports prometheus_client at import time (see metrics.py), and the package imports its modules on
first use: the fold process (apart.py) reads no device counter and so never imports torch.
"""

import importlib

_HOME = {
    "CounterSnapshot": "router_stats.snapshot",
    "ExpertCounter": "router_stats.counters",
    "MxMetrics": "router_stats.metrics",
    "Precision": "router_stats.metrics",
    "precision_of": "router_stats.metrics",
    "RouterStats": "router_stats.service",
    "process_stats": "router_stats.service",
    "RoutingStats": "router_stats.windows",
    "RoutingWindows": "router_stats.windows",
}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'router_stats' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
