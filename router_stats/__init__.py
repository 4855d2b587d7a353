"""Routing statistics: device counters, windows folded on the host, Prometheus series.

Nothing here imports prometheus_client at import time (see metrics.py).
"""

from router_stats.counters import CounterSnapshot, ExpertCounter
from router_stats.metrics import MxMetrics, Precision, precision_of
from router_stats.service import RouterStats, process_stats
from router_stats.windows import RoutingStats, RoutingWindows

__all__ = [
    "CounterSnapshot",
    "ExpertCounter",
    "MxMetrics",
    "Precision",
    "RouterStats",
    "RoutingStats",
    "RoutingWindows",
    "precision_of",
    "process_stats",
]
