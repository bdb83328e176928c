"""`search_plan`: the plan of full enumeration (`kvcast.policies.mpc.enumeration.enumerate_plan`), found
exactly by branch-and-bound.

* The state after a plan prefix is ``(link_free, decoder_free, prefix_ready, quality)``. Every step of the
  model (``+`` and ``max`` of floats, both monotone under IEEE rounding) and the final cost are non-decreasing
  in every component, so the cost of a plan whose last action is ``b``, computed with the *current* state in
  place of the state before the last step, is a lower bound on every completion ending in ``b`` -- exactly, in
  floating point (`_bound`). A second, Lagrangian-style bound (``cost >= Q + mu * (TTFT - SLO)`` with
  ``TTFT`` at least any convex mix of the recompute chain and the link chain, each later step adding its
  cheapest share; `_surrogate_steps`, `_surrogate_end`) prunes where overruns are likely; it is lowered by a
  margin far above its rounding error.
* Subtrees are searched per last action ``b``, most promising first, from an incumbent (the previous
  decision's plan, or the best uniform plan). A subtree is skipped when its bound exceeds the incumbent, or
  equals it and every plan in it comes later in enumeration order, so ties resolve as in enumeration (the
  first plan in order wins; per step text comes first, then the levels in menu order).
* Costs come from the expressions of `kvcast.policies.mpc.cost` (the tail's split in O(log m)), so the
  search sees the enumerator's floats bit for bit; `tests/policies/test_advanced.py` checks plan equality
  on random cases.
* ``objective=ttft``: the same depth-first branch-and-bound over keys ``(excess, TTFT, Q)`` compared
  lexicographically. The key is non-decreasing in every state component too, so `_bound` is again a lower
  bound; a load child whose loss alone puts the excess over the incumbent's is skipped (under
  ``objective=slo``: whose loss alone exceeds the incumbent's cost). The surrogate bound, which bounds
  ``Q + mu * overrun``, is ``objective=slo``'s alone. Ties resolve in enumeration order as above.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from kvcast.policies.mpc.cost import Cost, evaluators, final_cost, plan_cost
from kvcast.policies.mpc.enumeration import action_order
from kvcast.policies.mpc.problem import MpcProblem

__all__ = ["search_plan"]

_INF = math.inf


def _bound(p: MpcProblem, b: int, link: float, dec: float, ready: float, q: float) -> float:
    """Lower bound on the cost of every plan ending in action `b` from a prefix with this state: the last
    step and the tail played from the current state (later states are >= it component-wise)."""
    k = p.horizon - 1
    if k and p.fold[k] > ready:
        ready = p.fold[k]
    if b == p.n_levels:
        ready = ready + p.r[k]
    else:
        link = link + p.tau[k][b]
        dec = (link if link > dec else dec) + p.dec[k][b]
        if dec > ready:
            ready = dec
        q = q + p.wq[k][b]
    return final_cost(p, b, link, dec, ready, q)


_THETAS = (0.25, 0.5, 0.75)
"""Weights of the surrogate bound ``TTFT >= theta * text_chain + (1 - theta) * link_chain``."""


def _surrogate_steps(p: MpcProblem) -> list[list[float]]:
    """``steps[j][t]``: least cost that steps ``j .. h-2`` (those before the last) add to the surrogate
    bound of weight ``_THETAS[t]``, each step taking text or its best level on its own."""
    h, mu, qs, text = p.horizon, p.mu, p.qscale, p.n_levels
    steps = [[0.0] * len(_THETAS) for _ in range(h)]
    acc = [0.0] * len(_THETAS)
    for j in range(h - 2, -1, -1):
        wq_j = [qs * x for x in p.wq[j]]
        tau_j = [mu * x for x in p.tau[j]]
        r_j = mu * p.r[j]
        row = steps[j]
        for t, theta in enumerate(_THETAS):
            best = theta * r_j
            other = 1.0 - theta
            for a in range(text):
                v = wq_j[a] + other * tau_j[a]
                if v < best:
                    best = v
            acc[t] += best
            row[t] = acc[t]
    return steps


def _surrogate_end(p: MpcProblem, b: int) -> list[float]:
    """Per ``_THETAS[t]``: least cost that the last step (action `b`) and the tail add to the surrogate
    bound, ``qs * W + mu * (theta * text chain + (1 - theta) * link chain)`` over the tail's splits."""
    mu, qs, text = p.mu, p.qscale, p.n_levels
    last = p.horizon - 1
    rp = p.tail_rp
    m = len(rp) - 1
    lvl = p.text_tail_level if b == text else b
    t_last = 0.0 if b == text else p.tau[last][b]
    tb_row, ws_row = p.tail_tb[lvl], p.tail_ws[lvl]
    row = []
    for theta in _THETAS:
        best = _INF
        for s in range(m + 1):
            tb = tb_row[s] if s < m else 0.0
            v = qs * ws_row[s] + mu * (theta * rp[s] + (1.0 - theta) * (t_last + tb))
            if v < best:
                best = v
        row.append((mu * theta * p.r[last] if b == text else qs * p.wq[last][b]) + best)
    return row


def search_plan(p: MpcProblem, hints: Sequence[Sequence[int]] = ()) -> tuple[tuple[int, ...], Cost]:
    """The plan `enumerate_plan` returns, found by exact branch-and-bound (see the module docstring).

    `hints` are candidate plans that seed the incumbent (for example the previous decision's plan shifted
    by one step); they change the speed, never the result.
    """
    h = p.horizon
    if h == 0:
        return (), plan_cost(p, (), False)
    n_act = p.n_actions
    text = p.n_levels
    ttft_first = p.ttft_first
    order = action_order(p)

    def rank(plan: Sequence[int]) -> tuple[int, ...]:  # position in enumeration order
        return tuple((a + 1) % n_act for a in plan)

    best_plan: tuple[int, ...] = ()
    best = p.worst
    candidates = [tuple(x) for x in hints if len(x) == h and all(0 <= a < n_act for a in x)]
    if not candidates or h == 1:
        candidates += [(a,) * h for a in order]
    for plan in candidates:
        c = plan_cost(p, plan, False)
        if c < best or (c == best and rank(plan) < rank(best_plan)) or not best_plan:
            best_plan, best = plan, c
    if h == 1:
        return best_plan, best  # the uniform plans are all the plans
    tau, decs, wqs, rs = p.tau, p.dec, p.wq, p.r
    link0, dec0, ready0, q0 = p.link0, p.dec0, p.ready0, p.q0
    last = h - 1
    mu, qs, slo = p.mu, p.qscale, p.slo_s
    budget = p.budget
    limit = best[0] if ttft_first else best  # what a load child's loss alone is held against (below)
    fold = p.fold
    f_last = fold[last]
    mu_theta = [mu * t for t in _THETAS]
    mu_other = [mu * (1.0 - t) for t in _THETAS]
    root_bound = [_bound(p, b, link0, dec0, ready0, q0) for b in range(n_act)]
    prefix = [0] * h
    steps = None
    margin = 1e-9 * (mu * (slo + abs(p.top if p.top > -_INF else 0.0)) + 1.0)
    backwards = order[::-1]  # pushed so that children pop in enumeration order
    for b in sorted(range(n_act), key=lambda b: (root_bound[b], (b + 1) % n_act)):
        if root_bound[b] > best:
            break  # roots are sorted by their bound
        prefix[last] = b
        is_text = b == text
        tail_cost = evaluators(p)[b]
        if is_text:
            r_last, t_last, w_last = rs[last], 0.0, 0.0
        else:
            r_last, t_last, w_last = 0.0, tau[last][b], wqs[last][b]
        surrogate = not ttft_first and h > 2 and t_last < _INF  # a bound on Q + mu * overrun
        if surrogate:
            if steps is None:
                steps = _surrogate_steps(p)
            ends = _surrogate_end(p, b)
            # per depth and theta: what the remaining steps, the last step and the tail add at least
            extra = [[e + st for e, st in zip(ends, row)] for row in steps]
            w = max(mt * ready0 + mo * link0 + x
                    for mt, mo, x in zip(mu_theta, mu_other, extra[0])) - mu * slo
            if w - margin * (1.0 + mu * (ready0 + link0)) > best:
                continue
        stack = [(0, a, link0, dec0, ready0, q0) for a in backwards]
        pop, push = stack.pop, stack.append
        while stack:
            k, a, link, dec, ready, q = pop()
            if k and fold[k] > ready:
                ready = fold[k]
            if a == text:
                ready = ready + rs[k]
            else:
                link = link + tau[k][a]
                dec = (link if link > dec else dec) + decs[k][a]
                if dec > ready:
                    ready = dec
                q = q + wqs[k][a]
            prefix[k] = a
            # Cost of taking b now and then the tail: the leaf's cost at depth h-2, a lower bound above it
            # (the same expressions as plan_cost, so the floats are identical).
            rr = f_last if f_last > ready else ready
            if is_text:
                v = tail_cost(link, rr + r_last, q)
            else:
                l2 = link + t_last
                d2 = (l2 if l2 > dec else dec) + decs[last][b]
                v = tail_cost(l2, d2 if d2 > rr else rr, q + w_last)
            if k + 1 == last:
                if v < best or (v == best and rank(prefix) < rank(best_plan)):
                    best, best_plan = v, tuple(prefix)
                    limit = best[0] if ttft_first else best
                continue
            if v > best:
                continue
            if surrogate and link < _INF:
                # cost >= qs*Q + mu*(TTFT - slo) and TTFT >= any convex mix of the text and link chains;
                # lowered by a margin far above the rounding error of these few operations.
                x = -_INF
                for mt, mo, e in zip(mu_theta, mu_other, extra[k + 1]):
                    y = mt * ready + mo * link + e
                    if y > x:
                        x = y
                x += qs * q - mu * slo
                x -= margin * (1.0 + mu * (ready + link))
                if x > v:
                    v = x
                    if v > best:
                        continue
            if v == best and rank(prefix[:k + 1]) > rank(best_plan[:k + 1]):
                continue
            # Children; a load child whose loss alone (the same float operations as its cost) already exceeds
            # the incumbent's cost (objective=ttft: puts the excess over the incumbent's) is skipped before its
            # step is computed.
            nxt = wqs[k + 1]
            if ttft_first:
                for a2 in backwards:
                    if a2 != text and ((q + nxt[a2]) + w_last) * qs - budget > limit:
                        continue
                    push((k + 1, a2, link, dec, ready, q))
            else:
                for a2 in backwards:
                    if a2 != text and ((q + nxt[a2]) + w_last) * qs > limit:
                        continue
                    push((k + 1, a2, link, dec, ready, q))
    return best_plan, best
