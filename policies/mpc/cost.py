"""The cost model of `kvcast.policies.mpc`: the arithmetic shared verbatim by the enumerator and the search.

A plan is one action index per horizon step (index ``n_levels`` is text). `plan_cost` plays it on an
`MpcProblem` (`_play`: link, decoder, prefix-ready time and quality after every step) and adds the tail,
split at its best point between text from its front and loads from its back (`final_cost`).

The tail's best split is found in O(log m) instead of O(m) (`tail_evaluator`; the cost is piecewise
monotone in ``s``), computing the same floats as trying every split (`tail_split`, the reference). Steps are
computed by the same floating-point expressions here, in the enumerator and in the search, so all see
bit-identical costs; `tests/policies/test_advanced.py` checks both equalities on random cases.

Under ``objective=ttft`` (`MpcProblem.ttft_first`) a cost is the key ``(max(0, Q - budget), TTFT, Q)``,
compared lexicographically. The objectives differ in two places only: how a split is scored (the end of
`_split_cost`) and which few splits `tail_evaluator` tries (the excess only falls with ``s``, and the TTFT
falls until the text chain crosses the link chain and rises after it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from kvcast.policies.mpc.problem import MpcProblem

Cost = float | tuple[float, float, float]
"""A plan's cost: a float for ``objective=slo``, the key ``(excess, TTFT, Q)`` for ``objective=ttft``."""

__all__ = ["Cost", "evaluators", "final_cost", "plan_cost", "plan_tail_level", "plan_tail_split", "tail_evaluator",
           "tail_split"]

_INF = math.inf
_NEG_INF = -math.inf


def _split_cost(p: MpcProblem, lvl: int, s: int, link: float, ready: float, q: float) -> Cost:
    """The cost when the tail's first `s` chunks are recomputed and the others loaded at level `lvl`, from the
    state after the horizon (its prefix-ready time `ready` with the fold applied).

    Both objectives take the TTFT ``t`` (the text chain, the link chain and the decided chunks above, whichever
    ends last) and the scaled loss ``qn``; ``objective=slo`` scores ``qn + mu * max(0, t - SLO)``,
    ``objective=ttft`` the key ``(max(0, qn - budget), t, qn)``. `tail_evaluator`'s closures compute these
    very expressions (inlined for speed), so all see the same floats; the tests check that they agree.
    """
    t = ready + p.tail_rp[s]
    x = p.tail_tb[lvl][s]
    if x != -_INF:  # some tail chunk is loaded
        x = link + x
        if x > t:
            t = x
    if p.top > t:
        t = p.top
    qn = (q + p.tail_ws[lvl][s]) * p.qscale
    if p.ttft_first:
        over = qn - p.budget
        return (over if over > 0.0 else 0.0, t, qn)
    over = t - p.slo_s
    return qn + (p.mu * over if over > 0.0 else 0.0)


def tail_split(p: MpcProblem, b: int, link: float, ready: float, q: float) -> tuple[int, Cost]:
    """Reference: the best split of the tail (first of the least cost) by trying every split."""
    best_s, best = 0, p.worst
    for s in range(len(p.tail_rp)):
        c = _split_cost(p, b, s, link, ready, q)
        if c < best:
            best_s, best = s, c
    return best_s, best


def _ttft_key(rp: Sequence[float], tb: Sequence[float], ws: Sequence[float], top: float, qs: float,
              budget: float):
    """``key(s, link, ready, q)``: `_split_cost` under ``objective=ttft`` for one tail level's tables."""
    def key(s: int, link: float, ready: float, q: float) -> tuple[float, float, float]:
        t = ready + rp[s]
        x = tb[s]
        if x != _NEG_INF:
            x = link + x
            if x > t:
                t = x
        if top > t:
            t = top
        qn = (q + ws[s]) * qs
        over = qn - budget
        return (over if over > 0.0 else 0.0, t, qn)
    return key


def tail_evaluator(p: MpcProblem, b: int):
    """``f(link, ready, q)``: the cost after the last horizon step took action `b` (fold and tail
    included), with the tail's best split found in O(log m) instead of O(m): the same cost (float or key)
    as `tail_split`, which tries every split, by `_split_cost`'s expressions (inlined: this is the search's
    hottest code).

    Both objectives: the text chain ``ready + rp[s]`` grows with ``s`` and the link chain ``link + tb[s]``
    shrinks, both monotone under rounding; ``sc`` is the first split where they cross (the text chain ends
    last), so the TTFT is non-increasing in ``s`` before ``sc`` and non-decreasing from it. The loss falls with
    ``s``. What differs is which few splits can hold the least cost:

    * ``objective=slo``: before ``sc``, and after it while the TTFT stays within ``max(SLO, top)`` (``sc <= s <
      su``), the cost can only fall with ``s``; from ``su`` on every extra text chunk adds ``mu * r`` of
      overrun, clearly more than its quality saves when ``tail_fast``, so the cost rises. The least cost is
      at ``sc - 1``, ``su - 1`` or ``su``. (Where a level is not ``tail_fast``: every split is tried.)
    * ``objective=ttft``: the excess ``max(0, (q + ws[s]) * qs - budget)`` is non-increasing in ``s``: the
      splits of least excess are those from ``s0`` on. The least TTFT from ``s0`` on is at ``max(s0, sc - 1)``
      or ``max(s0, sc)``, and the least key is there or at the last split whose text chain still ends by that
      TTFT (the least loss at that TTFT).
    """
    lvl = p.text_tail_level if b == p.n_levels else b
    rp, tb, ws = p.tail_rp, p.tail_tb[lvl], p.tail_ws[lvl]
    m = len(rp) - 1
    fold = p.fold[p.horizon]
    if not p.tail_fast[lvl]:  # (only under objective=slo)
        def slow(link: float, ready: float, q: float) -> Cost:
            return tail_split(p, lvl, link, ready if ready > fold else fold, q)[1]
        return slow
    top, qs, slo, mu = p.top, p.qscale, p.slo_s, p.mu
    limit = slo if slo > top else top
    budget = p.budget
    key = _ttft_key(rp, tb, ws, top, qs, budget) if p.ttft_first else None  # objective=ttft's split key

    def fast(link: float, ready: float, q: float) -> Cost:
        if fold > ready:
            ready = fold
        lo, hi = 0, m  # sc: first s with ready + rp[s] >= link + tb[s] (true at s = m: no loads)
        while lo < hi:
            mid = (lo + hi) // 2
            t = tb[mid]
            if t == _NEG_INF or ready + rp[mid] >= link + t:
                hi = mid
            else:
                lo = mid + 1
        sc = lo
        if key is None:  # objective=slo
            lo, hi = sc, m + 1  # su: first s >= sc with ready + rp[s] > max(slo, top)
            while lo < hi:
                mid = (lo + hi) // 2
                if ready + rp[mid] > limit:
                    hi = mid
                else:
                    lo = mid + 1
            best = _INF
            for s in (sc - 1, lo - 1, lo):
                if 0 <= s <= m:  # _split_cost, inlined
                    t = ready + rp[s]
                    x = tb[s]
                    if x != _NEG_INF:
                        x = link + x
                        if x > t:
                            t = x
                    if top > t:
                        t = top
                    over = t - slo
                    c = (q + ws[s]) * qs + (mu * over if over > 0.0 else 0.0)
                    if c < best:
                        best = c
            return best
        over = (q + ws[m]) * qs - budget
        least = over if over > 0.0 else 0.0
        lo, hi = 0, m  # s0: first s whose excess is the least (that of s = m)
        while lo < hi:
            mid = (lo + hi) // 2
            over = (q + ws[mid]) * qs - budget
            if (over if over > 0.0 else 0.0) <= least:
                hi = mid
            else:
                lo = mid + 1
        s0 = lo
        first = sc - 1 if sc - 1 > s0 else s0  # least TTFT before the crossing, from s0 on
        second = sc if sc > s0 else s0  # ... and after it
        best = key(first, link, ready, q)
        if second != first:
            other = key(second, link, ready, q)
            if other < best:
                best = other
        least_ttft = best[1]
        lo, hi = second, m + 1  # the last s >= second whose text chain ends by the least TTFT
        while lo < hi:
            mid = (lo + hi) // 2
            if ready + rp[mid] > least_ttft:
                hi = mid
            else:
                lo = mid + 1
        if lo - 1 > second:
            other = key(lo - 1, link, ready, q)
            if other < best:
                best = other
        return best
    return fast


def evaluators(p: MpcProblem) -> list:
    """The tail evaluators of every last action, made on first use; text's is that of the level at which it
    loads the tail (`MpcProblem.text_tail_level`)."""
    if not p._evaluators:
        levels = [tail_evaluator(p, b) for b in range(p.n_levels)]
        text = levels[p.text_tail_level] if levels else tail_evaluator(p, p.n_levels)
        p._evaluators.extend([*levels, text])
    return p._evaluators


def final_cost(p: MpcProblem, b: int, link: float, dec: float, ready: float, q: float,
               exhaustive: bool = False) -> Cost:
    """Cost after the last horizon step took action `b` and reached this state, the tail included: the tail
    is split at its best point between text from its front and loads from its back, at level ``b`` (at
    ``text_tail_level`` after a text step); `exhaustive`: by trying every split."""
    if not exhaustive:
        return evaluators(p)[b](link, ready, q)
    f = p.fold[p.horizon]
    if f > ready:
        ready = f
    return tail_split(p, p.text_tail_level if b == p.n_levels else b, link, ready, q)[1]


def _play(p: MpcProblem, plan: Sequence[int]) -> tuple[float, float, float, float]:
    """State ``(link, dec, ready, q)`` after the horizon steps of `plan`."""
    text = p.n_levels
    link, dec, ready, q = p.link0, p.dec0, p.ready0, p.q0
    fold = p.fold
    for k, a in enumerate(plan):
        if k and fold[k] > ready:
            ready = fold[k]
        if a == text:
            ready = ready + p.r[k]
        else:
            link = link + p.tau[k][a]
            dec = (link if link > dec else dec) + p.dec[k][a]
            if dec > ready:
                ready = dec
            q = q + p.wq[k][a]
    return link, dec, ready, q


def plan_cost(p: MpcProblem, plan: Sequence[int], exhaustive: bool = True) -> Cost:
    """Cost of `plan` (one action index per horizon step; index ``n_levels`` is text). `exhaustive` tries
    every tail split (the definition); otherwise the O(log m) split search of the controller."""
    link, dec, ready, q = _play(p, plan)
    return final_cost(p, plan[-1] if plan else p.n_levels, link, dec, ready, q, exhaustive)


def plan_tail_split(p: MpcProblem, plan: Sequence[int]) -> int:
    """How many tail chunks `plan` recomputes (the rest are loaded at its last level)."""
    link, _, ready, q = _play(p, plan)
    f = p.fold[p.horizon]
    return tail_split(p, plan_tail_level(p, plan), link, ready if ready > f else f, q)[0]


def plan_tail_level(p: MpcProblem, plan: Sequence[int]) -> int:
    """The level at which `plan` loads its tail chunks."""
    return p.text_tail_level if not plan or plan[-1] == p.n_levels else plan[-1]
