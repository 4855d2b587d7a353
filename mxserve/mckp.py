"""The per-layer allocation as a multiple-choice knapsack, solved greedily with a certificate.

With a per-layer budget each layer is a multiple-choice knapsack: every unit
(gate_up or down block of an expert) takes exactly one option (scheme) with a
weight (bits of storage) and a cost (accuracy loss, or loss + mu * time), and
the weights must fit the capacity. The LP relaxation of that problem is solved
exactly by a greedy walk along each unit's lower convex hull, taking the
steepest cost decrease per bit first; it leaves at most one unit fractional,
which gives a lower bound on the integer optimum. The integer answer is the
greedy walk with every step that fits (then a pass of single-unit moves into
the left-over bits), and its gap to the bound certifies how close it is:
callers fall back to the exact ILP (planner.py) when the gap is above their
tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class MCKPResult:
    choice: np.ndarray  # option index per unit
    cost: float
    weight: float
    lower_bound: float  # of the integer optimum's cost (LP relaxation)

    @property
    def gap(self) -> float:
        """Relative distance of ``cost`` to the bound (0: proven optimal)."""
        return (self.cost - self.lower_bound) / max(abs(self.cost), 1e-300)


def _hull(w: np.ndarray, c: np.ndarray) -> list[int]:
    """Options on the lower convex hull of (weight, cost), lightest first, cost strictly falling."""
    idx = [i for i in np.argsort(w, kind="stable") if np.isfinite(w[i])]
    pts: list[int] = []
    for i in idx:
        if pts and c[i] >= c[pts[-1]]:
            continue  # heavier and no cheaper: dominated
        if pts and w[i] == w[pts[-1]]:
            pts.pop()  # same weight, cheaper
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # b lies on or above the segment a..i: not on the lower hull
            if (c[b] - c[a]) * (w[i] - w[a]) >= (c[i] - c[a]) * (w[b] - w[a]):
                pts.pop()
            else:
                break
        pts.append(i)
    return pts


def solve_mckp(weights: np.ndarray, costs: np.ndarray, capacity: float) -> MCKPResult:
    """Pick one option per row of ``weights``/``costs`` [units, options] (inf: not allowed)
    with total weight <= ``capacity`` and a small total cost. Raises ValueError when even
    the lightest options do not fit."""
    n = weights.shape[0]
    hulls = [_hull(weights[u], costs[u]) for u in range(n)]
    choice = np.array([h[0] for h in hulls])
    rows = np.arange(n)
    weight = float(weights[rows, choice].sum())
    if weight > capacity * (1 + 1e-12):
        raise ValueError(f"the lightest options weigh {weight:g}, over the capacity {capacity:g}")
    cost = float(costs[rows, choice].sum())
    # every hull step of every unit, steepest cost decrease per unit of weight first
    steps = []
    for u, h in enumerate(hulls):
        for k in range(1, len(h)):
            dw = weights[u, h[k]] - weights[u, h[k - 1]]
            dc = costs[u, h[k]] - costs[u, h[k - 1]]
            steps.append((dc / dw, u, k, dw, dc))
    steps.sort(key=lambda s: (s[0], s[1], s[2]))
    level = np.zeros(n, dtype=np.int64)  # hull position reached per unit
    blocked = np.zeros(n, dtype=bool)
    bound = None
    for slope, u, k, dw, dc in steps:
        if blocked[u] or level[u] != k - 1:
            continue
        if weight + dw <= capacity:
            weight += dw
            cost += dc
            level[u] = k
            choice[u] = hulls[u][k]
        else:
            if bound is None:  # the LP optimum takes this step fractionally
                bound = cost + slope * (capacity - weight)
            blocked[u] = True  # a unit's later steps are flatter: it stops here
    if bound is None:
        bound = cost
    choice, cost, weight = _improve(weights, costs, capacity, choice)
    return MCKPResult(choice, cost, weight, min(bound, cost))


def _improve(weights: np.ndarray, costs: np.ndarray, capacity: float, choice: np.ndarray, rounds: int = 64):
    """Local search from the greedy answer: the best move of one unit into the left-over bits, or
    of two units at once (one gives bits back, the other spends them), while the cost falls."""
    rows = np.arange(weights.shape[0])
    choice = choice.copy()
    for _ in range(rounds):
        weight = float(weights[rows, choice].sum())
        cost = float(costs[rows, choice].sum())
        slack = capacity - weight
        dw = weights - weights[rows, choice][:, None]
        dc = costs - costs[rows, choice][:, None]
        ok = np.isfinite(dw)
        single = np.where(ok & (dw <= slack), dc, np.inf)
        u, s = np.unravel_index(np.argmin(single), single.shape)
        best, move = single[u, s], [(u, s)]
        # pairs: a unit that frees bits (dw < 0) with one that spends them on a larger gain
        down = np.argwhere(ok & (dw < 0) & (dc > 0))
        up = np.argwhere(ok & (dw > 0) & (dc < 0))
        if len(down) and len(up):
            pw = dw[up[:, 0], up[:, 1]][None, :] + dw[down[:, 0], down[:, 1]][:, None]
            pc = dc[up[:, 0], up[:, 1]][None, :] + dc[down[:, 0], down[:, 1]][:, None]
            same = down[:, 0][:, None] == up[:, 0][None, :]
            pc = np.where((pw <= slack) & ~same, pc, np.inf)
            i, j = np.unravel_index(np.argmin(pc), pc.shape)
            if pc[i, j] < best:
                best, move = pc[i, j], [tuple(down[i]), tuple(up[j])]
        if not best < -1e-12 * max(abs(cost), 1e-300):
            break
        for u, s in move:
            choice[u] = s
    return choice, float(costs[rows, choice].sum()), float(weights[rows, choice].sum())
