"""What `mxserve launch` hands the server for re-planning, and how the controller is built from it."""

from __future__ import annotations

from dataclasses import dataclass

from mxserve.costmodel import CostModel
from mxserve.online.controller import Controller, ReplanSettings
from mxserve.online.ladder import Ladder
from mxserve.online.swap import PlanSwapper
from mxserve.plan import Plan
from mxserve.profile import CalibrationProfile


@dataclass
class OnlineSetup:
    profile: CalibrationProfile
    budget: float
    r: float
    cost: CostModel
    ladder_path: str
    settings: ReplanSettings
    default_tokens: int | tuple[int, ...] = 64  # the forward sizes priced before traffic shows its own

    def controller(self, plan: Plan, layers: list, lock, stats, metrics) -> Controller:
        """A controller over the served runtime layers (MixedExperts); ``lock`` is the engine's forward lock."""
        hidden = {m.layer_index: m.experts_q[0].gate_up.k for m in layers}
        swapper = PlanSwapper(lambda: layers, Ladder(self.ladder_path), lock, hidden)
        return Controller(self.profile, plan, self.budget, self.r, self.cost, stats, swapper, metrics, self.settings,
                          self.default_tokens)
