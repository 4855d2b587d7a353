"""The re-planning controller: re-solve for the observed traffic, swap when it pays.

Every ``interval`` seconds (and on demand), in its own thread, off the serving
path: read router_stats' EWMA frequencies and tokens per forward, re-solve the
allocation with the calibration profile's per-token errors re-weighted by those
frequencies and the latency term at that batch size, and compare the new plan
with the served one under the same traffic by the planner's objective
L^r * T^(1-r). Apply it only if it is better by more than ``margin`` (relative)
and at least ``min_interval`` seconds passed since the last swap (hysteresis);
a forced re-plan skips both checks. Solver errors, time-outs and swap failures
keep the current plan; every attempt is counted by outcome in
``mxserve_replans_total`` and logged.

Observed frequencies are blended with the calibration ones (``PRIOR``), so an
expert the window has not seen yet is not treated as never used.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

from mxserve.costmodel import CostModel
from mxserve.errors import MxServeError
from mxserve.online.swap import PlanRejected, PlanSwapper, SwapError, validate_plan
from mxserve.plan import Plan
from mxserve.planner import plan_terms, solve_plan
from mxserve.profile import CalibrationProfile

log = logging.getLogger("mxserve.online")
PRIOR = 0.05  # weight of the calibration frequencies in the blend


@dataclass
class ReplanSettings:
    interval: float = 0.0  # seconds between automatic re-plans; 0: only on demand
    margin: float = 0.02  # relative gain of L^r * T^(1-r) needed to swap
    min_interval: float = 60.0  # seconds since the last swap before another automatic one
    time_limit: float = 10.0  # solver time limit, seconds
    tp: int = 1  # the serving layout new plans must fit: SGLang's tensor- and expert-parallel sizes
    ep: int = 1
    costly_cap: float | None = None  # `launch --keep-stream-k`: new plans keep it too (planner.solve_plan)


@dataclass
class Outcome:
    outcome: str  # one of router_stats.metrics.OUTCOMES
    plan_id: str
    message: str
    gain: float | None = None
    solve_seconds: float | None = None
    swap_seconds: float | None = None
    layers_changed: int = 0

    def to_json(self) -> dict:
        return dict(self.__dict__)


class Controller:
    """Owns the served plan of one process and every change to it (re-plans and uploads)."""

    def __init__(self, profile: CalibrationProfile, plan: Plan, budget: float, r: float, cost: CostModel,
                 stats, swapper: PlanSwapper, metrics, settings: ReplanSettings,
                 default_tokens: int | tuple[int, ...] = 64):
        self.profile = profile
        self.plan = plan
        self.budget = budget
        self.r = r
        self.cost = cost
        self.stats = stats  # router_stats.RouterStats
        self.swapper = swapper
        self.metrics = metrics  # router_stats.MxMetrics (or None)
        self.settings = settings
        self.default_tokens = default_tokens
        self.last_swap = time.monotonic()
        self._lock = threading.Lock()  # one change at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.solve = solve_plan  # replaceable in tests (fault injection)

    # -- the served plan -------------------------------------------------------------------------
    def plan_id(self) -> str:
        return self.stats.precision().plan_id

    def plan_id_or_none(self) -> str:
        try:
            return self.plan_id()
        except MxServeError:
            return ""

    def _count(self, outcome: Outcome) -> Outcome:
        if self.metrics is not None:
            self.metrics.replans.labels(outcome.outcome).inc()
            if outcome.gain is not None:
                self.metrics.replan_gain.set(outcome.gain)
        level = logging.WARNING if outcome.outcome in ("failed", "swap_failed", "rejected") else logging.INFO
        log.log(level, "re-plan: %s (%s)", outcome.outcome, outcome.message)
        return outcome

    def _apply(self, plan: Plan) -> Outcome:
        try:
            report = self.swapper.apply(self.plan, plan)
        except SwapError as e:
            return Outcome("swap_failed", self.plan_id(), str(e))  # counted by the caller
        self.plan = plan
        self.last_swap = time.monotonic()
        self.stats.refresh_precision()
        if self.metrics is not None:
            self.metrics.plan_changes.inc()
            self.metrics.swap_seconds.observe(report.seconds)
            for held in report.layer_hold_seconds:
                self.metrics.swap_layer_seconds.observe(held)
        return Outcome("applied", self.plan_id(), f"{report.layers_changed} layers changed",
                       swap_seconds=report.seconds, layers_changed=report.layers_changed)

    # -- re-planning -------------------------------------------------------------------------------
    def observed(self) -> tuple[list[list[float]] | None, int | tuple[int, ...]]:
        """(blended frequencies per layer, tokens per forward) from router_stats; None without traffic."""
        st = self.stats.fold()
        if not st.layers or not any(any(f) for f in st.freqs("ewma")):
            return None, self.default_tokens
        freqs = []
        for lay, obs in zip(self.profile.layers, st.freqs("ewma")):
            calib = [e.freq for e in lay.experts if not e.shared]
            freqs.append([(1 - PRIOR) * o + PRIOR * c for o, c in zip(obs, calib)])
        tokens = max(1, round(st.tokens_per_forward("ewma"))) if st.tokens_per_forward("ewma") else self.default_tokens
        return freqs, tokens

    def replan(self, force: bool = False) -> Outcome:
        """Re-solve now; swap if the new plan is better by the margin (or ``force``) and not too soon."""
        with self._lock:
            try:
                freqs, tokens = self.observed()
            except MxServeError as e:  # the statistics could not be read (the engine not up yet, say)
                return self._count(Outcome("failed", self.plan_id_or_none(), f"routing statistics: {e}"))
            if freqs is None:
                return self._count(Outcome("kept", self.plan_id(), "no traffic observed yet"))
            t0 = time.perf_counter()
            try:
                res = self.solve(self.profile, self.budget, r=self.r, tokens=tokens, cost=self.cost, freqs=freqs,
                                 schemes=self.swapper.ladder.schemes, time_limit=self.settings.time_limit,
                                 tp=self.settings.tp, ep=self.settings.ep, costly_cap=self.settings.costly_cap)
                new = res.plan
                new.data = list(self.plan.data)
                validate_plan(new, self.swapper.layers(), self.swapper.ladder, self.budget, new.granularity)
            except (MxServeError, ValueError, RuntimeError, ArithmeticError) as e:
                return self._count(Outcome("failed", self.plan_id(), f"solver: {e}",
                                           solve_seconds=time.perf_counter() - t0))
            solve_s = time.perf_counter() - t0
            if self.metrics is not None:
                self.metrics.replan_seconds.observe(solve_s)
            gain = self._gain(new, freqs, tokens)
            if _assignment(new) == _assignment(self.plan):
                return self._count(Outcome("kept", self.plan_id(), "the solve gave the served plan", gain, solve_s))
            if not force and gain <= self.settings.margin:
                return self._count(Outcome("kept", self.plan_id(),
                                           f"gain {gain:.4f} within the margin {self.settings.margin:g}", gain,
                                           solve_s))
            since = time.monotonic() - self.last_swap
            if not force and since < self.settings.min_interval:
                msg = f"the plan last changed {since:.0f} s ago (launch counts)"
                return self._count(Outcome("too_soon", self.plan_id(), msg, gain, solve_s))
            out = self._apply(new)
            out.gain, out.solve_seconds = gain, solve_s
            return self._count(out)

    def _gain(self, new: Plan, freqs, tokens: int | tuple[int, ...]) -> float:
        """Relative decrease of L^r * T^(1-r) from the served plan to ``new`` under the observed traffic."""
        lo, to = plan_terms(self.profile, self.plan, tokens, self.cost, freqs)
        ln, tn = plan_terms(self.profile, new, tokens, self.cost, freqs)
        old = self.r * math.log(max(lo, 1e-300)) + (1 - self.r) * math.log(max(to, 1e-300))
        cur = self.r * math.log(max(ln, 1e-300)) + (1 - self.r) * math.log(max(tn, 1e-300))
        return 1.0 - math.exp(cur - old)

    def upload(self, plan: Plan) -> Outcome:
        """Apply a plan given by the user after validating it; raises PlanRejected (a 4xx) if it does not fit."""
        with self._lock:
            try:
                validate_plan(plan, self.swapper.layers(), self.swapper.ladder, self.budget, plan.granularity
                              if plan.granularity in ("layer", "model") else "layer")
            except PlanRejected as e:
                self._count(Outcome("rejected", self.plan_id(), str(e)))
                raise
            if _assignment(plan) == _assignment(self.plan):
                return Outcome("kept", self.plan_id(), "the uploaded plan is the served plan")
            return self._count(self._apply(plan))

    # -- the periodic thread -------------------------------------------------------------------------
    def start(self) -> Controller:
        if self.settings.interval > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mxserve-replan", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.interval):
            try:
                self.replan()
            except Exception:  # noqa: BLE001 - the controller must never take the server down
                log.exception("re-plan failed unexpectedly; the current plan keeps serving")


def _assignment(plan: Plan) -> list:
    return [(lay.layer, [(e.gate, e.down) for e in lay.experts]) for lay in sorted(plan.layers, key=lambda x: x.layer)]
