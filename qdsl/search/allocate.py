"""The allocation: one choice per unit, least total score under the budget.

A multiple-choice knapsack, solved exactly as an integer linear program
(``scipy.optimize.milp``, HiGHS branch and bound): binary x[u, c], one per unit
(``sum_c x[u, c] = 1``), ``sum size[u, c] x[u, c] <= budget``, optionally
``sum act_bits[u, c] x[u, c] <= act_bits * units with an activation``, minimise
``sum score[u, c] x[u, c]``. Infeasible budgets raise ``BudgetError`` with the
least size the candidates allow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ..errors import QdslError
from .units import Space


class BudgetError(QdslError):
    """No allocation of the candidates fits the budget."""


@dataclass(frozen=True)
class Allocation:
    picks: tuple[int, ...]        # per unit, the index of its choice
    bytes: float                  # the whole model's parameter storage
    score: float                  # predicted mean-loss increase (nats per token)
    act_bits: float | None        # mean activation bits over units with an activation


def mean_act_bits(space: Space, picks) -> float | None:
    bits = [u.choices[i].act_bits() for u, i in zip(space.units, picks) if u.producer]
    return sum(bits) / len(bits) if bits else None


def allocate(space: Space, scores: list[list[float]], max_bytes: float,
             act_bits: float | None = None, what: str = "size") -> Allocation:
    """The least-score allocation whose storage is at most ``max_bytes``."""
    least = space.fixed_bytes + sum(min(c.bytes for c in u.choices) for u in space.units)
    if least > max_bytes + 1e-6:
        raise BudgetError(
            f"the {'' if what == 'budget' else what + ' '}budget cannot be met: the candidates' smallest allocation needs "
            f"{least / 1e6:.6g} MB ({space.bits_per_weight(_smallest(space)):.3f} bits per "
            f"searched weight), the budget allows {max_bytes / 1e6:.6g} MB; raise the budget "
            "or add a smaller candidate")
    cols = [(ui, ci) for ui, u in enumerate(space.units) for ci in range(len(u.choices))]
    n, m = len(cols), len(space.units)
    cost = np.array([scores[ui][ci] for ui, ci in cols], dtype=np.float64)
    one = np.zeros((m, n))
    size = np.zeros((1, n))
    for j, (ui, ci) in enumerate(cols):
        one[ui, j] = 1.0
        size[0, j] = space.units[ui].choices[ci].bytes
    cons = [LinearConstraint(one, 1, 1),
            LinearConstraint(size, -np.inf, max_bytes - space.fixed_bytes)]
    with_act = [ui for ui, u in enumerate(space.units) if u.producer]
    if act_bits is not None and with_act:
        bits = np.zeros((1, n))
        for j, (ui, ci) in enumerate(cols):
            if space.units[ui].producer:
                bits[0, j] = space.units[ui].choices[ci].act_bits()
        lo_bits = sum(min(c.act_bits() for c in space.units[ui].choices) for ui in with_act)
        if lo_bits > act_bits * len(with_act) + 1e-9:
            raise BudgetError(f"--act-bits {act_bits:g} cannot be met: the candidates' "
                              f"lowest mean activation width is {lo_bits / len(with_act):.3f}")
        cons.append(LinearConstraint(bits, -np.inf, act_bits * len(with_act)))
    res = milp(cost, constraints=cons, integrality=np.ones(n), bounds=Bounds(0, 1),
               options={"mip_rel_gap": 0.0, "time_limit": 120})
    if res.x is None:
        raise BudgetError(f"no allocation fits the {what} budget together with --act-bits "
                          f"({res.message})")
    picks = [0] * m
    for j, (ui, ci) in enumerate(cols):
        if res.x[j] > 0.5:
            picks[ui] = ci
    total = space.bytes_of(picks)
    assert total <= max_bytes + 1e-3, (total, max_bytes)
    return Allocation(tuple(picks), total, sum(scores[u][c] for u, c in enumerate(picks)),
                      mean_act_bits(space, picks))


def _smallest(space: Space) -> list[int]:
    return [min(range(len(u.choices)), key=lambda i: u.choices[i].bytes) for u in space.units]
