"""Serving settings shared by both engines' front ends."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StatsSettings:
    """router_stats' fold interval, sliding window and EWMA half-life, in seconds."""

    interval: float = 1.0
    window: float = 60.0
    halflife: float = 30.0
