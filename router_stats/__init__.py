"""Routing statistics: how many tokens each expert receives, counted on the device."""

from router_stats.counters import ExpertCounter

__all__ = ["ExpertCounter"]
