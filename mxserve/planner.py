"""The MxMoE allocation as an integer program (PuLP + HiGHS, CBC as fallback).

Variables x[u, s] = 1 when unit u uses scheme s, where a unit is the fused
gate+up block or the down block of one expert (gate and up are tied). Per
scope (one layer, or the whole model):

    sum_s x[u, s] = 1                                         for every unit
    sum_{u,s} bits(s, K_u) * params_u * x[u, s] <= budget * sum_u params_u
    L = sum x[u, s] * freq_e * err[u, s] / out_energy_layer    (accuracy)
    T = sum x[u, s] * p_e * time(s, N_u, K_u, tokens * freq_e / p_e)   (latency; p_e = 1 - (1 - freq_e)^tokens,
                                                                        the chance the expert runs at all)

Priced for several forward sizes (``tokens`` a list, e.g. 1 and 8: decode at one request and at eight), T is the
sum of one forward of each size.

The paper minimises r*log L + (1-r)*log T with Gurobi's log constraints. A
linear solver takes another route: an epsilon-constraint frontier. Solve
min T, then min L subject to T <= tau for taus from min T up to the T of the
accuracy-optimal plan; every solution is a Pareto point, and the plan is the
point with the lowest r*log L + (1-r)*log T (r = 1: accuracy only; r = 0:
latency only, ties broken by accuracy).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time as _time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pulp

from mxserve.costmodel import CostModel, MeasuredCostModel, RooflineCostModel, expected_time
from mxserve.errors import MxServeError
from mxserve.mckp import MCKPResult, solve_mckp
from mxserve.parallel.ranks import column_split_refusal, ep_range
from mxserve.plan import ExpertPlan, LayerPlan, Plan
from mxserve.profile import CalibrationProfile, LayerStats
from mxserve.schemes import get_scheme

GRANULARITIES = ("layer", "model")
SOLVERS = ("auto", "ilp", "greedy")
GAP_TOLERANCE = 1e-2  # "auto": a layer whose greedy plan is not proven within 1% of optimal goes to the ILP
# A block's loss is an estimate from a sample of calibration tokens, good to a few percent;
# its digits beyond the third are float noise (CPU vs GPU, thread counts), which could flip
# near-tied choices. Rounded, the same model gives the same plan on any device.
LOSS_DIGITS = 3


def significant(v: float, digits: int = LOSS_DIGITS) -> float:
    """``v`` rounded to ``digits`` significant digits."""
    if v == 0 or not math.isfinite(v):
        return v
    return round(v, digits - 1 - math.floor(math.log10(abs(v))))


@dataclass
class Unit:
    layer_pos: int
    expert: int
    shared: bool
    block: str  # "gate_up" or "down"
    params: int
    options: dict[str, tuple[float, float, float]]  # scheme -> (bits per weight, loss, seconds)
    freq: float = 1.0  # the chance that a token is routed to the expert (a shared one: 1)


@dataclass
class FrontierPoint:
    L: float
    T: float
    bits: float
    choice: dict[int, str]  # unit index -> scheme


def token_counts(tokens: int | Sequence[int]) -> tuple[int, ...]:
    """The forward sizes a latency term prices: one, or several (sorted, each once), every one at least 1."""
    counts = tuple(tokens) if isinstance(tokens, Sequence) and not isinstance(tokens, str) else (tokens,)
    if not counts or any(not isinstance(t, int) or isinstance(t, bool) or t < 1 for t in counts):
        raise MxServeError(f"--tokens must be one or more whole numbers of at least 1, got {tokens}")
    return tuple(sorted(set(counts)))


def layer_units(
    stats: LayerStats,
    layer_pos: int,
    schemes: list[str],
    tokens: int | Sequence[int],
    cost: CostModel,
    freq: list[float] | None = None,
    tp: int = 1,
    rotated: bool = False,
) -> list[Unit]:
    """The planning units of one layer; ``freq`` overrides the calibration frequencies; ``tokens``: the forward
    size the time prices, or several (their times summed: ``token_counts``). With ``tp``
    > 1 a down block keeps only the schemes whose input columns split ``tp`` ways (``rotated``:
    the method rotates every non-bf16 block's input, which no column split keeps)."""
    units = []
    counts = token_counts(tokens)
    energy = max(stats.out_energy, 1e-30)
    for e in stats.experts:
        f = 1.0 if e.shared else (e.freq if freq is None else freq[e.expert])
        for block, parts in (("gate_up", ("gate", "up")), ("down", ("down",))):
            n = sum(e.shapes[p][0] for p in parts)
            k = e.shapes[parts[0]][1]
            opts = {}
            for s in schemes:
                sc = get_scheme(s)
                if block == "down" and tp > 1 and column_split_refusal(sc, k, tp, rotated):
                    continue
                if all(s in e.err[p] for p in parts):
                    loss = significant(f * sum(e.err[p][s] for p in parts) / energy)
                    seconds = sum(expected_time(cost, sc, n, k, t, f) for t in counts)
                    opts[s] = (sc.bits_per_weight(k), loss, seconds)
            if not opts:
                raise MxServeError(f"layer {stats.layer} expert {e.expert} {block}: no candidate scheme fits"
                                   + (f" a {tp}-way tensor-parallel split" if tp > 1 else ""))
            units.append(Unit(layer_pos, e.expert, e.shared, block, n * k, opts, min(max(f, 0.0), 1.0)))
    return units


def _solver(time_limit: float):
    if "HiGHS" in pulp.listSolvers(onlyAvailable=True):
        return pulp.HiGHS(msg=False, timeLimit=time_limit)
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit)


@contextlib.contextmanager
def _quiet_stdout():
    """HiGHS prints a banner on stdout from C++ even with msg off; keep stdout for our output."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class _Scope:
    """One integer program over a set of units, re-solved with different objectives."""

    def __init__(self, units: list[Unit], budget: float, time_limit: float, costly_cap: float | None = None):
        self.units = units
        self.total_params = sum(u.params for u in units)
        self.budget = budget
        self.time_limit = time_limit
        self.costly_cap = costly_cap  # the most share of each layer's weights in costly codes (solve_plan)
        self.warnings: list[str] = []
        min_bits = sum(min(o[0] for o in u.options.values()) * u.params for u in units) / self.total_params
        if budget < min_bits - 1e-9:
            raise MxServeError(
                f"budget {budget:g} bits is infeasible: the cheapest candidate schemes average "
                f"{min_bits:.4g} bits (scale/zero overhead included)"
            )
        # Normalise both terms to O(1) so the solver's tolerances mean the same at any scale.
        self.l_scale = max(sum(max(o[1] for o in u.options.values()) for u in units), 1e-30)
        self.t_scale = max(sum(max(o[2] for o in u.options.values()) for u in units), 1e-30)

    def solve(self, objective: str, t_cap: float | None = None, l_cap: float | None = None) -> FrontierPoint:
        prob = pulp.LpProblem("mxmoe", pulp.LpMinimize)
        x = {
            (i, s): prob.add_variable(f"x_{i}_{j}", 0, 1, cat="Binary")
            for i, u in enumerate(self.units)
            for j, s in enumerate(u.options)
        }
        lterm = pulp.lpSum(
            x[i, s] * (o[1] / self.l_scale) for i, u in enumerate(self.units) for s, o in u.options.items()
        )
        tterm = pulp.lpSum(
            x[i, s] * (o[2] / self.t_scale) for i, u in enumerate(self.units) for s, o in u.options.items()
        )
        prob += lterm if objective == "L" else tterm
        for i, u in enumerate(self.units):
            prob += pulp.lpSum(x[i, s] for s in u.options) == 1
        prob += pulp.lpSum(
            x[i, s] * (o[0] * u.params) for i, u in enumerate(self.units) for s, o in u.options.items()
        ) <= self.budget * self.total_params * (1 + 1e-9)
        if self.costly_cap is not None:  # per layer: the stream-K rule looks at one layer's launch
            for pos in sorted({u.layer_pos for u in self.units}):
                mine = [(i, u) for i, u in enumerate(self.units) if u.layer_pos == pos]
                prob += pulp.lpSum(x[i, s] * u.params for i, u in mine for s in u.options if costly(s)) <= (
                    self.costly_cap * sum(u.params for _, u in mine))
        if t_cap is not None:
            prob += tterm <= t_cap / self.t_scale * (1 + 1e-7) + 1e-12
        if l_cap is not None:
            prob += lterm <= l_cap / self.l_scale * (1 + 1e-7) + 1e-12
        with _quiet_stdout():
            prob.solve(_solver(self.time_limit))
        if prob.sol_status == pulp.LpSolutionIntegerFeasible:
            self.warnings.append("solver time limit reached: using the best plan found, which may not be optimal")
        elif prob.sol_status != pulp.LpSolutionOptimal:
            raise MxServeError(f"the solver found no plan ({pulp.LpStatus[prob.status]}); try a larger --time-limit")
        choice = {}
        for i, u in enumerate(self.units):
            choice[i] = max(u.options, key=lambda s, i=i: x[i, s].value() or 0.0)
        return self.point(choice)

    def point(self, choice: dict[int, str]) -> FrontierPoint:
        lv = sum(self.units[i].options[s][1] for i, s in choice.items())
        tv = sum(self.units[i].options[s][2] for i, s in choice.items())
        bits = sum(self.units[i].options[s][0] * self.units[i].params for i, s in choice.items()) / self.total_params
        return FrontierPoint(lv, tv, bits, choice)

    def frontier(self, points: int) -> list[FrontierPoint]:
        """``points`` Pareto points from the fastest plan (first) to the most accurate (last).

        Where the fastest plan is also the most accurate, the points coincide.
        """
        acc = self.solve("L")
        fast = self.solve("T")
        fast = self.solve("L", t_cap=fast.T)  # the most accurate of the fastest plans
        out = [fast]
        for j in range(1, points - 1):
            tau = fast.T + (acc.T - fast.T) * j / (points - 1)
            out.append(self.solve("L", t_cap=tau) if acc.T > fast.T * (1 + 1e-6) else acc)
        return out + [acc]


    def arrays(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """(scheme names, weights [U, S] in bits, L and T terms [U, S]); inf where a unit lacks a scheme."""
        names = sorted({s for u in self.units for s in u.options})
        shape = (len(self.units), len(names))
        w, lv, tv = np.full(shape, np.inf), np.full(shape, np.inf), np.full(shape, np.inf)
        for i, u in enumerate(self.units):
            for s, (bits, loss, sec) in u.options.items():
                j = names.index(s)
                w[i, j], lv[i, j], tv[i, j] = bits * u.params, loss / self.l_scale, sec / self.t_scale
        return names, w, lv, tv

    def greedy_frontier(self, points: int, exact_at_r1: bool) -> list[FrontierPoint]:
        """Like :meth:`frontier`, by the certified greedy knapsack (mckp.py) over L + mu * T for
        ``points`` values of mu, fastest first. With ``exact_at_r1`` the most accurate point
        is re-solved by the ILP when the greedy one is not proven within GAP_TOLERANCE."""
        names, w, lv, tv = self.arrays()
        cap = self.budget * self.total_params * (1 + 1e-9)
        mus = [None] + list(np.geomspace(30.0, 0.01, max(points - 2, 0))) + [0.0]
        out = []
        for mu in mus[:points] if points >= 2 else [0.0]:
            # mu None: latency first, accuracy to break ties; 0: accuracy only (latency breaks ties)
            cost = tv + 1e-6 * lv if mu is None else lv + (mu if mu > 0 else 1e-9) * tv
            res = self._within_cap(names, w, np.where(np.isfinite(w), cost, np.inf), cap)
            # under a cap the greedy plan has no bound to prove it by: the ILP takes the accuracy point
            if mu == 0.0 and exact_at_r1 and (self.costly_cap is not None or res.gap > GAP_TOLERANCE):
                out.append(self.solve("L"))
                continue
            out.append(self.point({i: names[j] for i, j in enumerate(res.choice)}))
        return out

    def _within_cap(self, names: list[str], w: np.ndarray, cost: np.ndarray, cap: float) -> MCKPResult:
        """solve_mckp, and with ``costly_cap`` (one layer's units: the greedy path's scopes) the least Lagrange
        multiplier on the costly weights' share whose plan keeps within it, by bisection: the second constraint the
        greedy walk cannot take (the ILP takes it exactly, and took over a minute on Qwen1.5's 24 layers)."""
        res = solve_mckp(w, cost, cap)
        if self.costly_cap is None:
            return res
        params = np.array([u.params for u in self.units], dtype=float)
        heavy = np.outer(params / self.total_params, [costly(s) for s in names])  # share a choice puts in them

        def share(r: MCKPResult) -> float:
            return float(heavy[np.arange(len(self.units)), r.choice].sum())

        if share(res) <= self.costly_cap + 1e-12:
            return res
        lo, hi = 0.0, 1.0
        best = solve_mckp(w, cost + hi * heavy, cap)
        while share(best) > self.costly_cap + 1e-12:  # large enough, every costly option loses
            if hi > 1e30:  # blocks with no other candidate (their narrow schemes not calibrated)
                raise MxServeError(f"layer {self.units[0].layer_pos}: no plan keeps its 3-bit, 8-bit and bf16 "
                                   f"weights within {self.costly_cap:.0%} (--keep-stream-k)")  # fmt: skip
            lo, hi = hi, hi * 4
            best = solve_mckp(w, cost + hi * heavy, cap)
        for _ in range(30):
            mid = (lo + hi) / 2
            r = solve_mckp(w, cost + mid * heavy, cap)
            if share(r) <= self.costly_cap + 1e-12:
                hi, best = mid, r
            else:
                lo = mid
        # the multiplier's plan can leave room under the cap (a unit's costly option comes or goes whole): the
        # single-unit moves that lower the cost and keep both constraints, best first
        rows, choice = np.arange(len(self.units)), best.choice.copy()
        bits_left = cap - float(w[rows, choice].sum())
        heavy_left = self.costly_cap - share(best)
        for _ in range(len(self.units) * w.shape[1]):
            now = rows, choice
            dw, dh = w - w[now][:, None], heavy - heavy[now][:, None]
            gain = np.where((dw <= bits_left) & (dh <= heavy_left + 1e-12), cost - cost[now][:, None], 0.0)
            u, j = np.unravel_index(np.argmin(gain), gain.shape)
            if not gain[u, j] < 0:
                break
            bits_left, heavy_left, choice[u] = bits_left - dw[u, j], heavy_left - dh[u, j], j
        # no bound: the multiplier's is not one of the capped problem
        return MCKPResult(choice, float(cost[rows, choice].sum()), float(w[rows, choice].sum()), -np.inf)


def _rank_groups(units: list[Unit], n_routed: int, ep: int) -> list[list[Unit]]:
    """A layer's units as budget scopes: all of them, or with ``ep`` ranks the shared experts and
    each rank's contiguous range of routed experts (SGLang's expert-parallel assignment)."""
    if ep == 1:
        return [units]
    ranks = [ep_range(n_routed, ep, r) for r in range(ep)]
    groups = [[u for u in units if u.shared]] + [[u for u in units if not u.shared and u.expert in mine]
                                                 for mine in ranks]  # fmt: skip
    return [g for g in groups if g]


def plan_terms(
    profile: CalibrationProfile, plan: Plan, tokens: int | Sequence[int], cost: CostModel,
    freqs: list[list[float]] | None = None,
) -> tuple[float, float]:
    """(L, T) of an existing plan under a routing distribution and batch size, as the planner counts them."""
    lv = tv = 0.0
    schemes = sorted(plan.scheme_names())
    for pos, st in enumerate(profile.layers):
        lp = plan.layer(st.layer)
        for u in layer_units(st, pos, schemes, tokens, cost, None if freqs is None else freqs[pos]):
            ep = lp.experts[u.expert]
            _, loss, sec = u.options[ep.gate if u.block == "gate_up" else ep.down]
            lv += loss
            tv += sec
    return lv, tv


def score(p: FrontierPoint, r: float) -> float:
    return r * math.log(max(p.L, 1e-30)) + (1 - r) * math.log(max(p.T, 1e-30))


@dataclass
class PlanResult:
    plan: Plan
    frontier: list[tuple[float, float, float]]  # (L, T, avg bits) per explored point, model level
    chosen: int | None  # frontier index of the plan (None when layers chose different points)
    seconds: float
    warnings: list[str]


def solve_plan(
    profile: CalibrationProfile,
    budget: float,
    r: float = 1.0,
    tokens: int | Sequence[int] = 64,
    granularity: str = "layer",
    cost: CostModel | None = None,
    points: int = 6,
    time_limit: float = 60.0,
    freqs: list[list[float]] | None = None,
    schemes: list[str] | None = None,
    solver: str = "auto",
    ep: int = 1,
    tp: int = 1,
    costly_cap: float | None = None,
) -> PlanResult:
    """Solve the allocation for a calibration profile (optionally re-weighted by observed ``freqs``).

    ``solver``: "ilp" runs the integer program for every frontier point; "greedy"
    the certified greedy knapsack (mckp.py, per-layer budgets only); "auto" the
    greedy one, with the ILP for a layer whose accuracy-optimal point is not
    proven within GAP_TOLERANCE of optimal (and the ILP for a whole-model budget).

    ``ep`` > 1 plans for expert parallel serving: the budget then holds for each rank's
    routed experts of a layer and for the shared experts (on every rank) separately, so
    every GPU's share, and the total, stay within it (per-layer budgets only). ``tp`` > 1 keeps
    to schemes every down block can be split with (parallel/ranks.column_split_refusal). ``costly_cap`` (a share,
    e.g. KEEP_STREAM_K) keeps each layer's weights in costly codes (:func:`costly`) within it, so the layer's decode
    launches keep the stream-K grid at 1.5 to 4 rows an expert (the ILP: a constraint per layer; the greedy one: a
    Lagrange multiplier on them, and "auto" solves the accuracy point by the ILP).
    """
    if solver not in SOLVERS:
        raise MxServeError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if not 0.0 <= r <= 1.0:
        raise MxServeError(f"--r must be within [0, 1], got {r}")
    if granularity not in GRANULARITIES:
        raise MxServeError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if points < 2:
        raise MxServeError(f"--points must be at least 2, got {points}")
    counts = token_counts(tokens)
    if ep > 1 and granularity != "layer":
        raise MxServeError("--ep plans need per-layer budgets (--granularity layer)")
    if costly_cap is not None and not 0.0 <= costly_cap <= 1.0:
        raise MxServeError(f"the share of costly codes must be within [0, 1], got {costly_cap}")
    t0 = _time.perf_counter()
    cost = cost or RooflineCostModel()
    if isinstance(cost, MeasuredCostModel):  # this solve's shapes only (a controller re-plans with one model)
        cost.missed.clear()
    schemes, left_out = _decode_kernel_schemes(profile, schemes or profile.schemes, counts, r)
    if costly_cap is not None and all(costly(s) for s in schemes):
        raise MxServeError(f"--keep-stream-k needs a 1, 2 or 4-bit candidate scheme; {', '.join(schemes)} are all "
                           "3-bit, 8-bit or bf16")  # fmt: skip
    units = [
        layer_units(st, pos, schemes, counts, cost, None if freqs is None else freqs[pos], tp,
                    profile.method == "gptq-had")  # fmt: skip
        for pos, st in enumerate(profile.layers)
    ]
    groups = (
        [g for u, st in zip(units, profile.layers) for g in _rank_groups(u, st.n_routed, ep)]
        if granularity == "layer"
        else [[x for u in units for x in u]]
    )
    per_solve = max(1.0, time_limit / max(1, len(groups) * (points + 2)))
    scopes = [_Scope(g, budget, per_solve, costly_cap) for g in groups]
    if solver == "ilp" or granularity == "model":
        fronts = [sc.frontier(points) for sc in scopes]
    else:
        fronts = [sc.greedy_frontier(points, exact_at_r1=solver == "auto") for sc in scopes]
    # ties (points that coincide) go to the most accurate point, so equal layers report one choice
    picks = [min(range(points), key=lambda j, f=f: (score(f[j], r), -j)) for f in fronts]
    total_params = sum(sc.total_params for sc in scopes)
    frontier = [
        (
            sum(f[j].L for f in fronts),
            sum(f[j].T for f in fronts),
            sum(f[j].bits * sc.total_params for f, sc in zip(fronts, scopes)) / total_params,
        )
        for j in range(points)
    ]
    plan = _to_plan(profile, budget, r, counts, granularity, scopes, [f[j] for f, j in zip(fronts, picks)])
    if ep > 1:
        plan.summary["ep"] = ep
    if tp > 1:
        plan.summary["tp"] = tp
    if costly_cap is not None:
        plan.summary["costly_cap"] = costly_cap
    chosen = picks[0] if len(set(picks)) == 1 else None
    warns = sorted({w for sc in scopes for w in sc.warnings}) + _latency_warnings(cost, r) + left_out
    if costly_cap is None:
        warns += _stream_k_warnings(profile, plan, counts, r)
    return PlanResult(plan, frontier, chosen, _time.perf_counter() - t0, warns)


def _routing_shape(st: LayerStats) -> tuple[int, int, int]:
    """(top-k, experts with the shared ones, routed experts) of a layer: the arguments of mxkernels.moe's row counts."""
    return st.top_k, len(st.experts), st.n_routed


def _decode_kernel_schemes(profile: CalibrationProfile, schemes: list[str], counts: tuple[int, ...],
                           r: float) -> tuple[list[str], list[str]]:  # fmt: skip
    """The candidate schemes, and a warning naming those left out: at r < 1 for forwards of decode size, the
    schemes the Gluon decode kernel does not run (activation-quantized ones; groups other than whole 128s). A
    layer holding one runs every expert on the Triton kernel, which a per-block latency term cannot price: on
    the H200 a served r = 0.25 plan with w8a8fp8 blocks in 4 of 24 layers spent 754 us of a 3412 us decode
    step on those 4 layers' GEMMs and 1068 us on the other 20's
    (benchmarks/results/serving-qwen15-24l-h200-s20-r.md). Kept when no candidate would be left. Priced for several
    forward sizes, a scheme the kernel refuses at any of them is left out (the plan serves them all)."""
    if r >= 1.0 or not profile.layers:
        return schemes, []
    from mxkernels.moe import decode_kernel_refuses

    shape = _routing_shape(profile.layers[0])
    refused = [s for s in schemes if any(decode_kernel_refuses(get_scheme(s), t, *shape) for t in counts)]
    if not refused or len(refused) == len(schemes):
        return schemes, []
    return [s for s in schemes if s not in refused], [
        f"r={r:g} at {counts_text(counts)} tokens per forward: {', '.join(refused)} left out; the decode kernel does "
        f"not run {'it' if len(refused) == 1 else 'them'}, and a layer holding one runs all its experts on the slower "
        f"Triton kernel (plan with --r 1 or for more --tokens to keep {'it' if len(refused) == 1 else 'them'})"]


# `plan --keep-stream-k`: the share of a layer's expert weights in costly codes up to which its decode launches take
# the stream-K grid at 1.5 to 4 rows an expert (mxkernels.moe.STREAM_K_COSTLY, kept equal by a test)
KEEP_STREAM_K = 0.1


@functools.cache
def costly(scheme: str) -> bool:
    """Whether the decode kernel counts ``scheme``'s weights as costly (bf16, 3 and 8 bits: outside
    moe_gemm_gluon.NARROW_CODES): their K tiles take 1.5x the instructions of 2 and 4-bit ones, and past
    STREAM_K_COSTLY of a layer's weights they keep its launches off stream-K between 1.5 and 4 rows an expert."""
    from mxkernels.arena import kernel_code
    from mxkernels.moe import costly_code

    return costly_code(kernel_code(get_scheme(scheme)))


def _stream_k_warnings(profile: CalibrationProfile, plan: Plan, counts: tuple[int, ...], r: float) -> list[str]:
    """Where r < 1 prices forwards whose decode launches take the stream-K grid only in layers with at most
    moe.STREAM_K_COSTLY of their expert weights in costly codes (bf16, 3 or 8 bits; moe.STREAM_K_ROWS_COSTLY up to
    STREAM_K_ROWS rows an active expert), and the plan has layers above that share: the latency term prices each block
    alone and does not see that the layer's whole launch leaves stream-K. On the H100 at 8 tokens the MoE section of
    Qwen1.5's layer took 60.5 us with the 1-token plan (37% w3) and 56.2 with a plan of w4 and w2 alone
    (benchmarks/README.md, the fifty-second session). Layers holding a scheme the decode kernel does not run are
    left to _decode_kernel_schemes' warning."""
    if r >= 1.0 or not profile.layers:
        return []
    from mxkernels.moe import STREAM_K_COSTLY, STREAM_K_ROWS, STREAM_K_ROWS_COSTLY, _rows, decode_kernel_refuses

    shape = _routing_shape(profile.layers[0])
    sizes = [t for t in counts if STREAM_K_ROWS_COSTLY <= _rows(t, *shape)[2] < STREAM_K_ROWS]
    if not sizes:
        return []
    over = 0
    for lay, st in zip(plan.layers, profile.layers):
        blocks = [(getattr(ep, b), es.params(b)) for ep, es in zip(lay.experts, st.experts)
                  for b in ("gate", "up", "down")]  # fmt: skip
        if any(decode_kernel_refuses(get_scheme(s), t, *shape) for s, _ in blocks for t in sizes):
            continue
        over += sum(n for s, n in blocks if costly(s)) > STREAM_K_COSTLY * sum(n for _, n in blocks)
    if not over:
        return []
    at = ", ".join(map(str, sizes))
    return [f"r={r:g} at {at} tokens per forward: {over} of {len(plan.layers)} layers hold more "
            f"than {STREAM_K_COSTLY:.0%} of their expert weights in 3-bit, 8-bit or bf16 blocks, which keeps those "
            f"layers' decode launches off the stream-K grid at that size; the latency term prices each block alone "
            f"and does not see it (on the H100 such a layer's MoE part took 1.08x a w4 + w2 layer's at 8 tokens; "
            f"--keep-stream-k caps that share in every layer, --schemes w4a16g128,w2a16g128,w1a16g128 leaves those "
            f"codes out)"]  # fmt: skip


def _latency_warnings(cost: CostModel, r: float) -> list[str]:
    """Where r < 1 prices schemes by the roofline (time in proportion to bytes), which mxserve's decode
    kernels do not follow: on the H200, w1, w2 and w4 experts took the same time and w3 1.6x that
    (benchmarks/results/h200-kernel-profile-qwen15.json), so such a plan can give accuracy for no speed."""
    if r >= 1.0:
        return []
    hint = "measure this GPU's with `mxserve profile` and pass it as --kernel-profile"
    if isinstance(cost, RooflineCostModel):
        return [f"r={r:g} with no kernel profile: the latency term takes time in proportion to bytes, which "
                f"mxserve's decode kernels do not follow (on the H200, w1, w2 and w4 experts took the same time, "
                f"w3 1.6x); {hint}"]  # fmt: skip
    missed = sorted(cost.missed) if isinstance(cost, MeasuredCostModel) else []
    if missed:
        shapes = ", ".join(f"{sc} {n}x{k}" for sc, n, k in missed[:4]) + (", ..." if len(missed) > 4 else "")
        return [f"the kernel profile has no times for {shapes}: those are priced by the roofline; {hint}"]
    return []


W4_BITS = get_scheme("w4a16g128").bits_per_weight()  # the uniform 4-bit model a decode read is compared with


def decode_reads(scopes: list[_Scope], choices: list[dict[int, str]]) -> dict[str, float]:
    """Expert weight bytes a decoded token reads, expected: every block's bytes in its scheme, times the chance that
    the token is routed to its expert (a shared expert: every token). The average bits weigh every weight alike, but
    a step reads the shared experts whole and each routed one rarely, so a plan of fewer average bits can read more
    a token than a uniform 4-bit model (Qwen1.5-MoE's committed 3.25-bit plan at r = 1, its routed experts taken as
    picked alike: 929 MB against 882; its shared experts' blocks at 4 and 8 bits, 610 MB of it). Also the same with
    every block in w4a16g128, for comparison. In MB."""
    out = {"decode_mb_per_token": 0.0, "decode_mb_shared": 0.0, "decode_mb_uniform_w4a16g128": 0.0}
    for sc, choice in zip(scopes, choices):
        for i, s in choice.items():
            u = sc.units[i]
            mb = u.freq * u.params * u.options[s][0] / 8e6
            out["decode_mb_per_token"] += mb
            out["decode_mb_shared"] += mb if u.shared else 0.0
            out["decode_mb_uniform_w4a16g128"] += u.freq * u.params * W4_BITS / 8e6
    return {k: round(v, 6) for k, v in out.items()}


def decode_reads_line(summary: dict) -> str | None:
    """``decode_reads`` in words, for the plan's report; None for a plan made before it was kept."""
    if "decode_mb_per_token" not in summary:
        return None
    return (f"a decoded token reads {summary['decode_mb_per_token']:.4g} MB of expert weights, expected "
            f"({summary['decode_mb_shared']:.4g} MB of it the shared experts'); all in w4a16g128: "
            f"{summary['decode_mb_uniform_w4a16g128']:.4g} MB")


def counts_text(counts: tuple[int, ...]) -> str:
    """``token_counts`` in words: "8", or "1 + 8" (the latency term sums one forward of each)."""
    return " + ".join(map(str, counts))


def _to_plan(profile, budget, r, counts: tuple[int, ...], granularity, scopes: list[_Scope],
             chosen: list[FrontierPoint]) -> Plan:  # fmt: skip
    picked: dict[tuple[int, int], dict[str, str]] = {}
    for sc, pt in zip(scopes, chosen):
        for i, s in pt.choice.items():
            u = sc.units[i]
            picked.setdefault((u.layer_pos, u.expert), {})[u.block] = s
    layers = []
    for pos, st in enumerate(profile.layers):
        experts = []
        for e in st.experts:
            c = picked[(pos, e.expert)]
            experts.append(ExpertPlan(e.expert, e.shared, c["gate_up"], c["gate_up"], c["down"]))
        layers.append(LayerPlan(st.layer, experts))
    total = sum(sc.total_params for sc in scopes)
    share: dict[str, float] = {}
    for sc, pt in zip(scopes, chosen):
        for i, s in pt.choice.items():
            share[s] = share.get(s, 0.0) + sc.units[i].params / total
    summary = {
        "avg_bits": sum(pt.bits * sc.total_params for sc, pt in zip(scopes, chosen)) / total,
        "L": sum(pt.L for pt in chosen),
        "T": sum(pt.T for pt in chosen),
        "schemes": dict(sorted(share.items(), key=lambda kv: -kv[1])),
        **decode_reads(scopes, [pt.choice for pt in chosen]),
    }
    if len(counts) > 1:  # the plan's ``tokens`` holds one size (format v1): the smallest, and all of them here
        summary["priced_tokens"] = list(counts)
    return Plan(
        model=profile.model,
        model_type=profile.model_type,
        method=profile.method,
        hadamard_seed=profile.hadamard_seed,
        budget_bits=budget,
        r=r,
        tokens=counts[0],
        granularity=granularity,
        layers=layers,
        summary=summary,
        data=list(profile.data),
    )
