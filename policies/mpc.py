"""``mpc``: RobustMPC (Yin et al., SIGCOMM 2015; Pensieve's ``robust_mpc_server.py``) for KV streaming.

Plans. At every decision the controller plans the next ``H = 5`` undecided chunks in index order (the
*horizon*), each a codec level or `TEXT`, and applies the first action (receding horizon). The undecided
chunks after the horizon (the *tail*) are modelled as Cake runs them: the tail's first ``s`` chunks are
recomputed from the front and the others loaded from the back at the level of the horizon's last action (at
a level fixed per decision when that action is text), with the best split ``s``. So every plan
is judged on the whole session.

Levels. The actions are the menu's levels that no other level beats on size, decode time and quality loss
at once (`kvcast.policies.base.undominated_levels`; every step of the model is monotone in those three, so the
dropped levels can only tie), in menu order. Nothing assumes that order is monotone in size or quality:
codec profiles list levels in `kvcast.codec.levels()` order, where a kvcast level may be smaller *and* better than
the CacheGen level before it.

Prediction (`kvcast.policies.estimate.RobustThroughputEstimator`): harmonic mean of the last 5 throughputs divided
by ``1 + max`` relative prediction error of the last 5 (``1 + prior_error`` on the prior before the first
sample); the RTT is paid once per request.

Objective (minimised; RobustMPC's "quality minus rebuffering penalty", with TTFT overrun for rebuffering)::

    cost(plan) = Q(plan) + mu * max(0, TTFT(plan) - (1 - margin) * SLO),
    mu = weight * q_span / ((1 - margin) * SLO)

``Q`` is the session's token-weighted mean quality loss (text is lossless) and ``q_span`` the largest
quality loss on the menu, so the default ``weight = 20`` makes an overrun of 5% of the SLO cost as much as
streaming the whole context at the worst level instead of losslessly: violations are avoided first, quality
is maximised second (Pensieve's linear QoE weighs one second of rebuffering like one chunk at the top bitrate;
here the deadline is the primary metric). ``margin = 0.05`` is a safety factor, like sabre's 0.9. There is
no switching term: a KV context has no playback, so level changes between chunks cost nothing.

Execution. Each action is taken as late as possible, with the latest measurement: text for the lowest
undecided chunk when the compute unit runs dry; when the link runs dry, the plan's lowest loaded horizon
chunk, else the highest tail chunk it loads. Loads are issued one at a time.

Search. Full enumeration costs ``(L + 1) ** 5`` plan evaluations per decision (16,807 for six levels plus
text), each trying every tail split (`enumerate_plan`). `search_plan` finds the *same* plan, exactly:

* The state after a plan prefix is ``(link_free, decoder_free, prefix_ready, quality)``. Every step of the
  model (``+`` and ``max`` of floats, both monotone under IEEE rounding) and the final cost are non-decreasing
  in every component, so the cost of a plan whose last action is ``b``, computed with the *current* state in
  place of the state before the last step, is a lower bound on every completion ending in ``b`` -- exactly, in
  floating point. A second, Lagrangian-style bound (``cost >= Q + mu * (TTFT - SLO)`` with ``TTFT`` at least
  any convex mix of the recompute chain and the link chain, each later step adding its cheapest share) prunes
  where overruns are likely; it is lowered by a margin far above its rounding error.
* Subtrees are searched per last action ``b``, most promising first, from an incumbent (the previous
  decision's plan, or the best uniform plan). A subtree is skipped when its bound exceeds the incumbent, or
  equals it and every plan in it comes later in enumeration order, so ties resolve as in enumeration (the
  first plan in order wins; per step text comes first, then the levels in menu order).
* The tail's best split is found in O(log m) instead of O(m) (`_tail_evaluator`; the cost is piecewise
  monotone in ``s``), computing the same floats as trying every split.
* Steps are computed by the same floating-point expressions in the enumerator and the search, so both see
  bit-identical costs; `tests/test_policies_advanced.py` checks plan equality on random cases.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvcast.policies.base import (TEXT, Decision, Observation, Policy, Session, level_names, smallest,
                           undominated_levels)
from kvcast.policies.estimate import DEFAULT_PRIOR_ERROR, RobustThroughputEstimator
from kvcast.policies.planning import ConstantThroughput, PlanState, parse_options

__all__ = ["MpcPolicy", "MpcProblem", "build_problem", "plan_cost", "enumerate_plan", "search_plan",
           "SessionTables", "DEFAULT_HORIZON", "DEFAULT_OVERRUN_WEIGHT"]

DEFAULT_HORIZON = 5
DEFAULT_OVERRUN_WEIGHT = 20.0
DEFAULT_SLO_MARGIN = 0.05
"""Plans aim at ``(1 - margin) * SLO``: a safety factor against prediction error, like sabre's 0.9."""
_INF = math.inf


@dataclass(frozen=True, slots=True)
class MpcProblem:
    """One decision's planning problem: `horizon` in-order steps (action ``n_levels`` is text), then the tail.

    Per step ``k`` and level ``a``: ``tau[k][a]`` link time, ``dec[k][a]`` decode time, ``wq[k][a]``
    token-weighted quality loss; ``r[k]`` recompute time. Tail (the ``m`` undecided chunks after the horizon,
    ascending): ``tail_rp[s]`` recompute time of its first ``s`` chunks; per level ``b``: ``tail_tb[b][s]``
    link time of its chunks from ``s`` on plus the level's largest decode time (``-inf`` for ``s = m``) and
    ``tail_ws[b][s]`` their token-weighted quality loss; ``tail_fast[b]``: every tail chunk's recompute costs
    more (``mu * r``) than its loss at ``b`` saves, which `_tail_evaluator` uses to skip most splits.
    """

    n_levels: int
    horizon: int
    tau: tuple[tuple[float, ...], ...]
    dec: tuple[tuple[float, ...], ...]
    wq: tuple[tuple[float, ...], ...]
    r: tuple[float, ...]
    tail_rp: tuple[float, ...]
    tail_tb: tuple[tuple[float, ...], ...]
    tail_ws: tuple[tuple[float, ...], ...]
    tail_fast: tuple[bool, ...]
    link0: float
    dec0: float
    ready0: float
    qscale: float
    mu: float
    slo_s: float
    fold: tuple[float, ...]
    """``fold[k]`` (``1 <= k <= horizon``): latest ready time of the decided chunks between horizon chunk
    ``k-1`` and the next undecided chunk above it, merged into the prefix-ready time before step ``k`` (before
    the tail for ``k = horizon``). ``-inf`` where there are none."""
    top: float
    """Latest ready time of the decided chunks above every undecided chunk (they only bound the TTFT)."""
    chunks: tuple[int, ...] = field(default=())
    """The horizon's chunk indices."""
    tail_chunks: tuple[int, ...] = field(default=())
    text_tail_level: int = 0
    """Level of the tail's loads when the last horizon step is text: the level of least quality loss with
    which loading the whole tail alone would meet the SLO (ties: menu order), else the fastest (fixed per
    decision, so the cost stays a function of the plan's own actions)."""
    _evaluators: list = field(default_factory=list, compare=False, repr=False)

    @property
    def n_actions(self) -> int:
        return self.n_levels + 1

    @property
    def tail_r(self) -> float:
        return self.tail_rp[-1]


@dataclass(slots=True)
class SessionTables:
    """Per-session menu tables (chunk x level lists), built once per session by `SessionTables.of`.

    ``*_from[j][a]`` are suffix sums over chunks ``j..n-1`` (index ``n``: empty), so the tail's totals
    cost nothing per decision.
    """

    nbytes: list[list[float]]
    decode: list[list[float]]
    wq: list[list[float]]
    recompute: list[float]
    decode_from: list[list[float]]
    wq_from: list[list[float]]
    recompute_from: list[float]
    total_tokens: float
    q_span: float
    n_levels: int
    names: tuple[str, ...] = ()
    """The levels of the actions ``0 .. n_levels - 1`` (the menu's undominated levels, in menu order)."""
    bits: list[list[float]] = field(default_factory=list)
    decode_t: list[tuple[float, ...]] = field(default_factory=list)
    wq_t: list[tuple[float, ...]] = field(default_factory=list)
    decode_max: list[float] = field(default_factory=list)
    """Per level: the largest decode time of any chunk."""
    _fast_ok: dict = field(default_factory=dict)

    def fast_ok(self, mu: float) -> list[list[bool]]:
        """``[chunk][level]``: recomputing the chunk costs clearly more overrun (``mu * r``) than the quality
        loss of loading it at the level (the condition of the fast tail split); cached per ``mu``."""
        table = self._fast_ok.get(mu)
        if table is None:
            qs = 1.0 / self.total_tokens
            table = [[mu * r * (1.0 - 1e-9) > qs * w * (1.0 + 1e-9) + 1e-300 for w in row]
                     for r, row in zip(self.recompute, self.wq)]
            self._fast_ok[mu] = table
        return table

    @classmethod
    def of(cls, session: Session, prune: bool = True) -> SessionTables:
        """Tables of `session`'s menus; `prune` drops dominated levels (`undominated_levels`: same best
        cost). ``q_span`` is the largest loss of *every* level on the menu either way, so pruning leaves
        the objective unchanged."""
        menus = session.menus
        q_span = 0.0
        for menu in menus:
            for opt in menu.levels:
                if not opt.quality_loss >= 0:
                    raise ValueError(f"chunk {menu.index} level {opt.level!r} has quality loss "
                                     f"{opt.quality_loss}; need >= 0")
                q_span = max(q_span, opt.quality_loss)
        names = undominated_levels(menus) if prune else level_names(menus)
        n, nl = len(menus), len(names)
        nbytes = [[_INF] * nl for _ in range(n)]
        decode = [[0.0] * nl for _ in range(n)]
        wq = [[0.0] * nl for _ in range(n)]
        for i, menu in enumerate(menus):
            by_name = {o.level: o for o in menu.levels}
            for a, name in enumerate(names):
                opt = by_name.get(name)
                if opt is None:
                    continue  # a level this chunk lacks: its transfer never ends
                nbytes[i][a] = float(opt.nbytes)
                decode[i][a] = opt.decode_s
                wq[i][a] = menu.tokens * opt.quality_loss
        recompute = [m.recompute_s for m in menus]
        decode_from = [[0.0] * nl for _ in range(n + 1)]
        wq_from = [[0.0] * nl for _ in range(n + 1)]
        recompute_from = [0.0] * (n + 1)
        for i in range(n - 1, -1, -1):
            decode_from[i] = [x + y for x, y in zip(decode[i], decode_from[i + 1])]
            wq_from[i] = [x + y for x, y in zip(wq[i], wq_from[i + 1])]
            recompute_from[i] = recompute[i] + recompute_from[i + 1]
        total = float(sum(m.tokens for m in menus)) or 1.0
        bits = [[x * 8.0 for x in row] for row in nbytes]
        decode_max = [max(decode[i][a] for i in range(n)) if n else 0.0 for a in range(nl)]
        return cls(nbytes, decode, wq, recompute, decode_from, wq_from, recompute_from, total,
                   q_span if q_span > 0 else 1.0, nl, names, bits, [tuple(row) for row in decode],
                   [tuple(row) for row in wq], decode_max)


def build_problem(tables: SessionTables, pending: Sequence[int], state: PlanState,
                  throughput: ConstantThroughput, slo_s: float,
                  overrun_weight: float = DEFAULT_OVERRUN_WEIGHT, horizon: int = DEFAULT_HORIZON
                  ) -> MpcProblem:
    """The planning problem from `state`: the first `horizon` of the `pending` chunks (ascending), then the
    rest as the tail. Decided chunks may lie anywhere; each needs an estimated ready time in `state`
    (`PlanState.resolved`)."""
    bps, rtt = throughput.bps, throughput.rtt_s
    nl = tables.n_levels
    n = len(tables.recompute)
    h = list(pending[:horizon])
    tail = list(pending[horizon:])
    qscale = 1.0 / tables.total_tokens
    mu = overrun_weight * tables.q_span / max(slo_s, 1e-9)
    bits = tables.bits
    if bps > 0:
        inv = 1.0 / bps
        tau = tuple(tuple([rtt + x * inv for x in bits[c]]) for c in h)
    else:
        inv = _INF
        tau = tuple((_INF,) * nl for c in h)
    dec = tuple([tables.decode_t[c] for c in h])
    wq = tuple([tables.wq_t[c] for c in h])
    recompute = tables.recompute
    r = tuple([recompute[c] for c in h])
    m = len(tail)
    rp = [0.0] * (m + 1)
    for i, c in enumerate(tail):
        rp[i + 1] = rp[i] + recompute[c]
    # Tail suffix sums for every level at once, from the last tail chunk down: row i holds, per level, the
    # link time of tail chunks i.. (then + the level's largest decode) and their token-weighted quality loss.
    tables_wq = tables.wq
    link_rows: list[list[float]] = []
    loss_rows: list[list[float]] = []
    acc_t = [0.0] * nl
    acc_q = [0.0] * nl
    for c in reversed(tail):
        if bps > 0:
            acc_t = [t + (rtt + x * inv) for t, x in zip(acc_t, bits[c])]
        else:
            acc_t = [t + _INF for t in acc_t]
        acc_q = [w + x for w, x in zip(acc_q, tables_wq[c])]
        link_rows.append([t + d for t, d in zip(acc_t, tables.decode_max)])
        loss_rows.append(acc_q)
    link_rows.reverse()
    loss_rows.reverse()
    link_rows.append([-_INF] * nl)
    loss_rows.append([0.0] * nl)
    tbs = list(zip(*link_rows))
    wss = list(zip(*loss_rows))
    ok_table = tables.fast_ok(mu)
    fast = [all(col) for col in zip(*(ok_table[c] for c in tail))] if tail else [True] * nl
    # Decided chunks: below the horizon they set the initial prefix-ready time; between undecided chunks
    # they are merged before the step above them (before the tail for those inside the tail); above every
    # undecided chunk they only bound the TTFT.
    ready_s = state.ready_s
    fold = [-_INF] * (len(h) + 1)
    ready0 = max(state.now_s, state.compute_free_s)
    top = -_INF
    last_pending = pending[-1] if len(pending) else -1
    k = 0
    bounds = h + [n]
    for c, action in enumerate(state.actions):
        if action is None:
            continue
        x = ready_s[c]
        if x != x:
            raise ValueError(f"decided chunk {c} has no ready estimate (resolve the state first)")
        if c > last_pending:
            if x > top:
                top = x
            continue
        while c > bounds[k]:
            k += 1
        if k == 0:
            if x > ready0:
                ready0 = x
        elif x > fold[k]:
            fold[k] = x
    text_tail_level = 0
    if m and nl:
        # after an all-text horizon: the level of least loss whose tail, loaded alone, fits the SLO (ties: the
        # faster, then menu order), else the fastest; menus are not ordered by loss or size
        limit = slo_s - state.link_free_s
        fits = [a for a in range(nl) if tbs[a][0] <= limit]
        text_tail_level = (min(fits, key=lambda a: (wss[a][0], tbs[a][0], a)) if fits
                           else min(range(nl), key=lambda a: (tbs[a][0], wss[a][0], a)))
    p = MpcProblem(
        n_levels=nl, horizon=len(h), tau=tau, dec=dec, wq=wq, r=r, tail_rp=tuple(rp), tail_tb=tuple(tbs),
        tail_ws=tuple(wss), tail_fast=tuple(fast), link0=state.link_free_s, dec0=state.decoder_free_s,
        ready0=ready0, qscale=qscale, mu=mu, slo_s=slo_s, fold=tuple(fold), top=top, chunks=tuple(h),
        tail_chunks=tuple(tail), text_tail_level=text_tail_level)
    return p


# --- the model's arithmetic, shared verbatim by the enumerator and the search -----------------------------

def _split_cost(p: MpcProblem, b: int, s: int, link: float, ready: float, q: float) -> float:
    """Cost when the tail's first `s` chunks are recomputed and the others loaded at level `b`."""
    a_s = ready + p.tail_rp[s]
    tb = p.tail_tb[b][s]
    t = a_s
    if tb != -_INF:  # some tail chunk is loaded
        b_s = link + tb
        if b_s > t:
            t = b_s
    if p.top > t:
        t = p.top
    over = t - p.slo_s
    return (q + p.tail_ws[b][s]) * p.qscale + (p.mu * over if over > 0.0 else 0.0)


def tail_split(p: MpcProblem, b: int, link: float, ready: float, q: float) -> tuple[int, float]:
    """Reference: the best split of the tail (first of the least cost) by trying every split."""
    best_s, best = 0, _INF
    for s in range(len(p.tail_rp)):
        c = _split_cost(p, b, s, link, ready, q)
        if c < best:
            best_s, best = s, c
    return best_s, best


def _tail_evaluator(p: MpcProblem, b: int):
    """``f(link, ready, q)``: the cost after the last horizon step took action `b` (fold and tail
    included), with the tail's best split found in O(log m) instead of O(m).

    The text chain ``ready + rp[s]`` grows with ``s`` and the link chain ``link + tb[s]`` shrinks, both
    monotone under rounding. Before they cross (``s < sc``) and after it while the TTFT stays within
    ``max(SLO, top)`` (``sc <= s < su``) the cost can only fall with ``s``; from ``su`` on every extra text
    chunk adds ``mu * r`` of overrun, clearly more than its quality saves when ``tail_fast``, so the cost
    rises. The least cost is therefore at ``sc - 1``, ``su - 1`` or ``su``, computed with the very
    expressions of `_split_cost`: the same floats as `tail_split`, which tries every split.
    """
    lvl = p.text_tail_level if b == p.n_levels else b
    rp, tb, ws = p.tail_rp, p.tail_tb[lvl], p.tail_ws[lvl]
    m = len(rp) - 1
    top, slo, mu, qs = p.top, p.slo_s, p.mu, p.qscale
    fold = p.fold[p.horizon]
    limit = slo if slo > top else top
    neg = -_INF
    if not p.tail_fast[lvl]:
        def slow(link: float, ready: float, q: float) -> float:
            return tail_split(p, lvl, link, ready if ready > fold else fold, q)[1]
        return slow

    def fast(link: float, ready: float, q: float) -> float:
        if fold > ready:
            ready = fold
        lo, hi = 0, m  # first s with ready + rp[s] >= link + tb[s] (true at s = m: no loads)
        while lo < hi:
            mid = (lo + hi) // 2
            t = tb[mid]
            if t == neg or ready + rp[mid] >= link + t:
                hi = mid
            else:
                lo = mid + 1
        sc = lo
        lo, hi = sc, m + 1  # first s >= sc with ready + rp[s] > max(slo, top)
        while lo < hi:
            mid = (lo + hi) // 2
            if ready + rp[mid] > limit:
                hi = mid
            else:
                lo = mid + 1
        best = _INF
        for s in (sc - 1, lo - 1, lo):
            if 0 <= s <= m:
                t = ready + rp[s]
                x = tb[s]
                if x != neg:
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
    return fast


def _evaluators(p: MpcProblem) -> list:
    """The tail evaluators of every last action, made on first use; text's is that of the level at which it
    loads the tail (`MpcProblem.text_tail_level`)."""
    if not p._evaluators:
        levels = [_tail_evaluator(p, b) for b in range(p.n_levels)]
        text = levels[p.text_tail_level] if levels else _tail_evaluator(p, p.n_levels)
        p._evaluators.extend([*levels, text])
    return p._evaluators


def _final_cost(p: MpcProblem, b: int, link: float, dec: float, ready: float, q: float,
                exhaustive: bool = False) -> float:
    """Cost after the last horizon step took action `b` and reached this state, the tail included: the tail
    is split at its best point between text from its front and loads from its back, at level ``b`` (at
    ``text_tail_level`` after a text step); `exhaustive`: by trying every split."""
    if not exhaustive:
        return _evaluators(p)[b](link, ready, q)
    f = p.fold[p.horizon]
    if f > ready:
        ready = f
    return tail_split(p, p.text_tail_level if b == p.n_levels else b, link, ready, q)[1]


def _play(p: MpcProblem, plan: Sequence[int]) -> tuple[float, float, float, float]:
    """State ``(link, dec, ready, q)`` after the horizon steps of `plan`."""
    text = p.n_levels
    link, dec, ready, q = p.link0, p.dec0, p.ready0, 0.0
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


def plan_cost(p: MpcProblem, plan: Sequence[int], exhaustive: bool = True) -> float:
    """Cost of `plan` (one action index per horizon step; index ``n_levels`` is text). `exhaustive` tries
    every tail split (the definition); otherwise the O(log m) split search of the controller."""
    link, dec, ready, q = _play(p, plan)
    return _final_cost(p, plan[-1] if plan else p.n_levels, link, dec, ready, q, exhaustive)


def plan_tail_split(p: MpcProblem, plan: Sequence[int]) -> int:
    """How many tail chunks `plan` recomputes (the rest are loaded at its last level)."""
    link, _, ready, q = _play(p, plan)
    f = p.fold[p.horizon]
    return tail_split(p, plan_tail_level(p, plan), link, ready if ready > f else f, q)[0]


def plan_tail_level(p: MpcProblem, plan: Sequence[int]) -> int:
    """The level at which `plan` loads its tail chunks."""
    return p.text_tail_level if not plan or plan[-1] == p.n_levels else plan[-1]


def enumerate_plan(p: MpcProblem) -> tuple[tuple[int, ...], float]:
    """Full enumeration (RobustMPC's search, every tail split tried): the first plan with the least cost in
    enumeration order (per step: text first, then the levels in menu order)."""
    best, best_cost = (), _INF
    for plan in itertools.product(action_order(p), repeat=p.horizon):
        c = plan_cost(p, plan)
        if c < best_cost or not best:
            best, best_cost = plan, c
    return best, best_cost


def action_order(p: MpcProblem) -> tuple[int, ...]:
    """Actions in enumeration order: text (index ``n_levels``) first, then the levels in menu order. Ties
    between plans go to the first in this order, so text, which is lossless and uses no link, wins them."""
    return (p.n_levels, *range(p.n_levels))


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
    return _final_cost(p, b, link, dec, ready, q)


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


def search_plan(p: MpcProblem, hints: Sequence[Sequence[int]] = ()) -> tuple[tuple[int, ...], float]:
    """The plan `enumerate_plan` returns, found by exact branch-and-bound (see the module docstring).

    `hints` are candidate plans that seed the incumbent (for example the previous decision's plan shifted
    by one step); they change the speed, never the result.
    """
    h = p.horizon
    if h == 0:
        return (), plan_cost(p, (), False)
    n_act = p.n_actions
    text = p.n_levels
    best_plan: tuple[int, ...] = ()
    best_cost = _INF
    order = action_order(p)

    def rank(plan: Sequence[int]) -> tuple[int, ...]:  # position in enumeration order
        return tuple((a + 1) % n_act for a in plan)

    candidates = [tuple(x) for x in hints if len(x) == h and all(0 <= a < n_act for a in x)]
    if not candidates or h == 1:
        candidates += [(a,) * h for a in order]
    for plan in candidates:
        c = plan_cost(p, plan, False)
        if c < best_cost or (c == best_cost and rank(plan) < rank(best_plan)) or not best_plan:
            best_plan, best_cost = plan, c
    if h == 1:
        return best_plan, best_cost  # the uniform plans are all the plans
    tau, decs, wqs, rs = p.tau, p.dec, p.wq, p.r
    link0, dec0, ready0 = p.link0, p.dec0, p.ready0
    last = h - 1
    mu, qs, slo = p.mu, p.qscale, p.slo_s
    fold = p.fold
    f_last = fold[last]
    mu_theta = [mu * t for t in _THETAS]
    mu_other = [mu * (1.0 - t) for t in _THETAS]
    root_bound = [_bound(p, b, link0, dec0, ready0, 0.0) for b in range(n_act)]
    prefix = [0] * h
    steps = None
    margin = 1e-9 * (mu * (slo + abs(p.top if p.top > -_INF else 0.0)) + 1.0)
    backwards = order[::-1]  # pushed so that children pop in enumeration order
    for b in sorted(range(n_act), key=lambda b: (root_bound[b], (b + 1) % n_act)):
        if root_bound[b] > best_cost:
            break  # roots are sorted by their bound
        prefix[last] = b
        is_text = b == text
        tail_cost = _evaluators(p)[b]
        if is_text:
            r_last, t_last, w_last = rs[last], 0.0, 0.0
        else:
            r_last, t_last, w_last = 0.0, tau[last][b], wqs[last][b]
        surrogate = h > 2 and t_last < _INF
        if surrogate:
            if steps is None:
                steps = _surrogate_steps(p)
            ends = _surrogate_end(p, b)
            # per depth and theta: what the remaining steps, the last step and the tail add at least
            extra = [[e + st for e, st in zip(ends, row)] for row in steps]
            w = max(mt * ready0 + mo * link0 + x
                    for mt, mo, x in zip(mu_theta, mu_other, extra[0])) - mu * slo
            if w - margin * (1.0 + mu * (ready0 + link0)) > best_cost:
                continue
        stack = [(0, a, link0, dec0, ready0, 0.0) for a in backwards]
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
                if v < best_cost or (v == best_cost and rank(prefix) < rank(best_plan)):
                    best_cost, best_plan = v, tuple(prefix)
                continue
            if v > best_cost:
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
                    if v > best_cost:
                        continue
            if v == best_cost and rank(prefix[:k + 1]) > rank(best_plan[:k + 1]):
                continue
            # Children; a load child whose quality alone (same float operations as its cost) exceeds the
            # incumbent is skipped before its step is computed.
            nxt = wqs[k + 1]
            for a2 in backwards:
                if a2 != text and ((q + nxt[a2]) + w_last) * qs > best_cost:
                    continue
                push((k + 1, a2, link, dec, ready, q))
    return best_plan, best_cost


class MpcPolicy(Policy):
    """RobustMPC with text as an extra action; see the module docstring.

    Spec ``mpc`` or ``mpc:key=value+...`` with keys ``weight`` (overrun weight, default 20), ``margin``
    (plan for ``(1 - margin) * SLO``, default 0.05), ``horizon`` (5), ``window`` (5) and ``prior_error``
    (0.5); a bare number sets the weight.
    """

    name = "mpc"

    def __init__(self, options: str | None = None, *, overrun_weight: float = DEFAULT_OVERRUN_WEIGHT,
                 horizon: int = DEFAULT_HORIZON, window: int = 5, slo_margin: float = DEFAULT_SLO_MARGIN,
                 prior_error: float = DEFAULT_PRIOR_ERROR, exhaustive: bool = False) -> None:
        opts = parse_options(options, {"weight": overrun_weight, "margin": slo_margin, "horizon": horizon,
                                       "window": window, "prior_error": prior_error}, "mpc")
        self.overrun_weight = opts["weight"]
        self.slo_margin = opts["margin"]
        self.horizon = int(opts["horizon"])
        self.window = int(opts["window"])
        self.prior_error = opts["prior_error"]
        if not self.overrun_weight > 0:
            raise ValueError(f"mpc: weight must be > 0, got {self.overrun_weight}")
        if not 0 <= self.slo_margin < 1:
            raise ValueError(f"mpc: margin must be in [0, 1), got {self.slo_margin}")
        if self.horizon < 1 or self.window < 1 or self.horizon != opts["horizon"]:
            raise ValueError(f"mpc: horizon and window must be integers >= 1, got {opts}")
        if not self.prior_error >= 0:
            raise ValueError(f"mpc: prior_error must be >= 0, got {self.prior_error}")
        self.exhaustive = exhaustive
        """Use full enumeration instead of branch-and-bound (same decisions; for benchmarks)."""
        self.record: list[tuple[MpcProblem, tuple[tuple[int, ...], ...]]] | None = None
        """If a list, every decision's problem and search hints are appended to it (benchmarks, tests)."""

    def reset(self, session: Session) -> None:
        super().reset(session)
        self._tables = SessionTables.of(session)
        self._levels = self._tables.names
        self._text = len(self._levels)
        self._estimator = RobustThroughputEstimator(self.window, session.rtt_s, session.prior_throughput_bps,
                                                    self.prior_error)
        self._slo = session.slo_s * (1.0 - self.slo_margin)
        self._link_order: list[int] = []
        self._decided_at: dict[int, float] = {}
        self._prev_plan: tuple[int, ...] = ()
        self.last_plan: tuple[tuple[int, str], ...] = ()
        """The plan behind the latest decision (horizon chunks and actions), for inspection."""

    def predicted_bps(self) -> float | None:
        return self._estimator.predict_bps()

    def decide(self, obs: Observation) -> Decision | None:
        self._estimator.observe(obs.samples)
        pending = obs.pending
        if not pending:
            return None
        bps = self._estimator.predict_bps()
        if bps is None:
            # No prior and no sample yet: probe the link with the smallest level (not the menu's last: menus
            # are not ordered by size).
            if not obs.link_idle:
                return None
            return self._load(obs, pending[0], smallest(obs.menus, pending[0], self._levels))
        throughput = ConstantThroughput(bps, self.session.rtt_s)
        state = PlanState.from_observation(obs, throughput, self._link_order, self._decided_at).resolved()
        problem = build_problem(self._tables, pending, state, throughput, self._slo,
                                self.overrun_weight, self.horizon)
        prev = self._prev_plan
        hints = ((prev[1:] + prev[-1:])[:problem.horizon], prev[:problem.horizon]) if prev else ()
        if self.record is not None:
            self.record.append((problem, hints))
        plan, _ = enumerate_plan(problem) if self.exhaustive else search_plan(problem, hints)
        self._prev_plan = plan
        names = self._levels + (TEXT,)
        self.last_plan = tuple((c, names[a]) for c, a in zip(problem.chunks, plan))
        # Act as late as possible, so every action uses the latest measurements: text for the lowest
        # undecided chunk when the compute unit runs dry (it would wait for the chunks below it anyway);
        # when the link runs dry, the plan's lowest loaded horizon chunk, else the highest tail chunk the
        # plan loads (the tail is recomputed from its front and loaded from its back, as in Cake).
        if plan[0] == self._text and obs.compute_idle:
            return Decision(pending[0], TEXT, predicted_bps=bps)
        if obs.link_idle:
            for chunk, a in zip(problem.chunks, plan):
                if a != self._text:
                    return self._load(obs, chunk, names[a], bps)
            tail = problem.tail_chunks
            if tail and plan_tail_split(problem, plan) < len(tail):
                return self._load(obs, tail[-1], names[plan_tail_level(problem, plan)], bps)
        return None

    def _load(self, obs: Observation, chunk: int, level: str, bps: float | None = None) -> Decision:
        self._link_order.append(chunk)
        self._decided_at[chunk] = obs.now_s
        return Decision(chunk, level, predicted_bps=bps)
