"""Reference search of `kvcast.policies.mpc`: full enumeration, as RobustMPC searches.

Every plan of the horizon is evaluated, ``(L + 1) ** H`` of them (16,807 for six levels plus text and
``H = 5``), each trying every tail split (`kvcast.policies.mpc.cost.plan_cost`). The first plan of least
cost in enumeration order wins (`action_order`: per step text first, then the levels in menu order).
`kvcast.policies.mpc.search.search_plan` returns the same plan, much faster; this is its definition.
"""

from __future__ import annotations

import itertools

from kvcast.policies.mpc.cost import Cost, plan_cost
from kvcast.policies.mpc.problem import MpcProblem

__all__ = ["action_order", "enumerate_plan"]


def enumerate_plan(p: MpcProblem) -> tuple[tuple[int, ...], Cost]:
    """Full enumeration (RobustMPC's search, every tail split tried): the first plan with the least cost in
    enumeration order (per step: text first, then the levels in menu order)."""
    best, best_cost = (), p.worst
    for plan in itertools.product(action_order(p), repeat=p.horizon):
        c = plan_cost(p, plan)
        if c < best_cost or not best:
            best, best_cost = plan, c
    return best, best_cost


def action_order(p: MpcProblem) -> tuple[int, ...]:
    """Actions in enumeration order: text (index ``n_levels``) first, then the levels in menu order. Ties
    between plans go to the first in this order, so text, which is lossless and uses no link, wins them."""
    return (p.n_levels, *range(p.n_levels))
