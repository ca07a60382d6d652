"""The multiple-choice knapsack behind search: one option per layer, least damage within the budget(s)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

DEFAULT_BUCKETS = 8192


@dataclass
class Choice:
    picks: list[int]  # option index per group
    damage: float
    cost: float


class MultipleChoiceKnapsack:
    """Pick one option per group minimising total damage with total cost <= capacity.

    Dynamic programming over a cost grid: `best[c]` is the least damage with cost at most c
    units. Each group's costs are taken relative to its cheapest option (so the grid spans only
    what choices change), then rounded up to whole units: a pick that fits on the grid fits in
    reality. Integer costs with a small enough capacity use 1-unit cells, which is exact.
    """

    def __init__(self, costs: Sequence[Sequence[float]], damages: Sequence[Sequence[float]],
                 capacity: float, buckets: int = DEFAULT_BUCKETS):
        import numpy as np

        if len(costs) != len(damages) or any(len(c) != len(d) or not c for c, d in zip(costs, damages)):
            raise ValueError("every group needs as many costs as damages, and at least one option")
        self.costs = [list(map(float, c)) for c in costs]
        self.damages = [list(map(float, d)) for d in damages]
        self.base = sum(min(c) for c in self.costs)
        room = capacity - self.base
        self.feasible = room >= -1e-9
        room = max(room, 0.0)
        integral = all(float(x).is_integer() for c in self.costs for x in c) and float(capacity).is_integer()
        if integral and room <= 4 * buckets:
            self.unit, self.cells = 1.0, int(round(room))
        else:
            self.unit = room / buckets if room > 0 else 1.0
            self.cells = buckets if room > 0 else 0
        inf = float("inf")
        best = np.zeros(self.cells + 1)
        self._picks = []
        for c, d in zip(self.costs, self.damages):
            lo = min(c)
            units = [int(math.ceil((x - lo) / self.unit - 1e-9)) for x in c]
            new = np.full(self.cells + 1, inf)
            pick = np.full(self.cells + 1, -1, dtype=np.int32)
            for j, (u, dj) in enumerate(zip(units, d)):
                if u > self.cells:
                    continue
                cand = np.full(self.cells + 1, inf)
                cand[u:] = best[: self.cells + 1 - u] + dj
                better = cand < new
                new[better] = cand[better]
                pick[better] = j
            best = new
            self._picks.append((pick, units))
        self.best = best

    def solve(self, cells: int | None = None) -> Choice | None:
        """The optimum using at most `cells` grid cells (default: the whole capacity)."""
        if not self.feasible:
            return None
        c = self.cells if cells is None else min(cells, self.cells)
        if not math.isfinite(float(self.best[c])):
            return None
        picks = []
        for pick, units in reversed(self._picks):
            j = int(pick[c])
            if j < 0:
                return None
            picks.append(j)
            c -= units[j]
        picks.reverse()
        return self._choice(picks)

    def _choice(self, picks: list[int]) -> Choice:
        return Choice(picks, sum(d[j] for d, j in zip(self.damages, picks)),
                      sum(c[j] for c, j in zip(self.costs, picks)))

    def frontier(self, points: int = 12) -> list[Choice]:
        """Optimal picks at evenly spaced capacities: the cost-vs-damage Pareto frontier."""
        out: list[Choice] = []
        if not self.feasible:
            return out
        seen = set()
        for i in range(points):
            cells = round(self.cells * i / max(points - 1, 1))
            ch = self.solve(cells)
            if ch is not None and tuple(ch.picks) not in seen:
                seen.add(tuple(ch.picks))
                out.append(ch)
        # keep only non-dominated points
        out.sort(key=lambda c: c.cost)
        pareto: list[Choice] = []
        for ch in out:
            if not pareto or ch.damage < pareto[-1].damage - 1e-15:
                pareto.append(ch)
        return pareto


def solve_mckp(costs: Sequence[Sequence[float]], damages: Sequence[Sequence[float]], capacity: float,
               buckets: int = DEFAULT_BUCKETS) -> Choice | None:
    """One option per group, least total damage with total cost <= capacity (None: infeasible)."""
    return MultipleChoiceKnapsack(costs, damages, capacity, buckets).solve()


def solve_two_budgets(costs: Sequence[Sequence[float]], lat: Sequence[Sequence[float]],
                      damages: Sequence[Sequence[float]], capacity: float, max_latency: float,
                      buckets: int = DEFAULT_BUCKETS) -> Choice | None:
    """Size budget by DP, latency budget by a Lagrange multiplier found by bisection."""
    def attempt(mu: float) -> Choice | None:
        d = [[dj + mu * lj for dj, lj in zip(dg, lg)] for dg, lg in zip(damages, lat)]
        ch = solve_mckp(costs, d, capacity, buckets)
        if ch is None:
            return None
        return Choice(ch.picks, sum(dg[j] for dg, j in zip(damages, ch.picks)), ch.cost)

    def latency(ch: Choice) -> float:
        return sum(lg[j] for lg, j in zip(lat, ch.picks))

    first = attempt(0.0)
    if first is None or latency(first) <= max_latency:
        return first
    scale = max((dj for dg in damages for dj in dg), default=1.0) / max(
        (lj for lg in lat for lj in lg), default=1.0) or 1.0
    lo, hi = 0.0, scale
    best = None
    for _ in range(60):  # grow until the latency budget is met
        ch = attempt(hi)
        if ch is not None and latency(ch) <= max_latency:
            best = ch
            break
        lo, hi = hi, hi * 4
    if best is None:
        return None
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        ch = attempt(mid)
        if ch is not None and latency(ch) <= max_latency:
            best, hi = ch, mid
        else:
            lo = mid
    return best
