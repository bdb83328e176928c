"""``mpc``: RobustMPC (Yin et al., SIGCOMM 2015; Pensieve's ``robust_mpc_server.py``) for KV streaming.

At every decision the controller plans the next ``H = 5`` undecided chunks in index order, each either a
codec level or `TEXT`, and applies the first action (receding horizon). The chunks after the horizon (the
*tail*) are assumed to repeat the horizon's last action, so every plan is judged on the whole session.

Throughput prediction (`policies.estimate.RobustThroughputEstimator`): harmonic mean of the last 5
throughputs divided by ``1 + max`` relative prediction error of the last 5; the RTT is paid once per request.

Objective (minimised; RobustMPC's "quality minus rebuffering penalty", with TTFT overrun for rebuffering)::

    cost(plan) = Q(plan) + mu * max(0, TTFT(plan) - SLO),    mu = overrun_weight * q_span / SLO

``Q`` is the session's token-weighted mean quality loss (text is lossless), ``q_span`` the largest quality
loss on the menu, so the default ``overrun_weight = 20`` makes an overrun of 5% of the SLO cost as much as
streaming the whole context at the worst level instead of losslessly: violations are avoided first, quality
is maximised second. (Pensieve's linear QoE weighs one second of rebuffering like one chunk at the top bitrate;
here the deadline is the primary metric, so overrun weighs more.) There is no switching term: a KV context has
no playback, so level changes between chunks cost nothing.

Search. Full enumeration costs ``(L + 1) ** 5`` plan evaluations per decision (7,776 for five levels plus
text). `search_plan` finds the *same* plan, exactly, by depth-first branch-and-bound:

* The state after a plan prefix is ``(link_free, decoder_free, prefix_ready, quality)``; every step of the
  model (``+`` and ``max`` of floats, both monotone under IEEE rounding) and the final cost are non-decreasing
  in every component, so the cost of a plan whose last action is ``b``, computed with the *current* state in
  place of the state before the last step, is a lower bound on every completion ending in ``b`` -- exactly, in
  floating point. The bound keeps the tail, which is most of the session's work early on.
* Subtrees are searched per last action ``b``, most promising ``b`` first, from an incumbent (the best
  uniform plan). A subtree is skipped when its bound exceeds the incumbent, or equals it and every plan in it
  comes later in enumeration order, so ties resolve as in enumeration (the first plan in order wins).
* Every step of a plan is computed by the same floating-point expressions in the enumerator and the search,
  so both see bit-identical costs; `tests/test_policies_advanced.py` checks plan equality on random cases.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Sequence

from policies.base import TEXT, Decision, Observation, Policy, Session, level_names
from policies.estimate import RobustThroughputEstimator
from policies.planning import ConstantThroughput, PlanState

__all__ = ["MpcPolicy", "MpcProblem", "build_problem", "plan_cost", "enumerate_plan", "search_plan",
           "SessionTables", "DEFAULT_HORIZON", "DEFAULT_OVERRUN_WEIGHT"]

DEFAULT_HORIZON = 5
DEFAULT_OVERRUN_WEIGHT = 20.0
_INF = math.inf


@dataclass(frozen=True, slots=True)
class MpcProblem:
    """One decision's planning problem over in-order plans of `horizon` steps (action ``L`` is text).

    Per step ``k`` and level ``a``: ``tau[k][a]`` link time, ``dec[k][a]`` decode time, ``wq[k][a]``
    token-weighted quality loss; ``r[k]`` recompute time. Tail per level: ``tail_dec[a]`` total decode,
    ``tail_k[a]`` = max over tail chunks j of (link time up to j + decode time from j on), ``tail_wq[a]``;
    ``tail_r`` total recompute.
    """

    n_levels: int
    horizon: int
    tau: tuple[tuple[float, ...], ...]
    dec: tuple[tuple[float, ...], ...]
    wq: tuple[tuple[float, ...], ...]
    r: tuple[float, ...]
    tail_dec: tuple[float, ...]
    tail_k: tuple[float, ...]
    tail_wq: tuple[float, ...]
    tail_r: float
    link0: float
    dec0: float
    ready0: float
    qscale: float
    mu: float
    slo_s: float
    fold: tuple[float, ...] = ()
    """``fold[k]`` (k >= 1): latest ready time of the decided chunks between horizon chunks ``k-1`` and
    ``k``, merged into the prefix-ready time before step ``k``; ``fold[horizon]``: of those after the horizon,
    merged before the tail. ``-inf`` where there are none."""
    chunks: tuple[int, ...] = field(default=())
    """The horizon's chunk indices."""

    @property
    def n_actions(self) -> int:
        return self.n_levels + 1


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

    @classmethod
    def of(cls, session: Session) -> SessionTables:
        menus = session.menus
        names = level_names(menus)
        n, nl = len(menus), len(names)
        nbytes = [[_INF] * nl for _ in range(n)]
        decode = [[0.0] * nl for _ in range(n)]
        wq = [[0.0] * nl for _ in range(n)]
        q_span = 0.0
        for i, menu in enumerate(menus):
            by_name = {o.level: o for o in menu.levels}
            for a, name in enumerate(names):
                opt = by_name.get(name)
                if opt is None:
                    continue  # a level this chunk lacks: its transfer never ends
                if not opt.quality_loss >= 0:
                    raise ValueError(f"chunk {i} level {name!r} has quality loss {opt.quality_loss}; need >= 0")
                nbytes[i][a] = float(opt.nbytes)
                decode[i][a] = opt.decode_s
                wq[i][a] = menu.tokens * opt.quality_loss
                q_span = max(q_span, opt.quality_loss)
        recompute = [m.recompute_s for m in menus]
        decode_from = [[0.0] * nl for _ in range(n + 1)]
        wq_from = [[0.0] * nl for _ in range(n + 1)]
        recompute_from = [0.0] * (n + 1)
        for i in range(n - 1, -1, -1):
            decode_from[i] = [x + y for x, y in zip(decode[i], decode_from[i + 1])]
            wq_from[i] = [x + y for x, y in zip(wq[i], wq_from[i + 1])]
            recompute_from[i] = recompute[i] + recompute_from[i + 1]
        total = float(sum(m.tokens for m in menus)) or 1.0
        return cls(nbytes, decode, wq, recompute, decode_from, wq_from, recompute_from, total,
                   q_span if q_span > 0 else 1.0, nl)


def build_problem(tables: SessionTables, pending: Sequence[int], state: PlanState,
                  throughput: ConstantThroughput, slo_s: float,
                  overrun_weight: float = DEFAULT_OVERRUN_WEIGHT, horizon: int = DEFAULT_HORIZON
                  ) -> MpcProblem:
    """The planning problem from `state`: the first `horizon` of the `pending` chunks (ascending), then the
    rest as the tail. Decided chunks may lie between them; their estimated ready times (`state` must have
    one for each, `PlanState.resolved`) delay the text chunks above them and the TTFT."""
    bps, rtt = throughput.bps, throughput.rtt_s
    inv = 8.0 / bps if bps > 0 else _INF
    nl = tables.n_levels
    n = len(tables.recompute)
    h = list(pending[:horizon])
    tail = list(pending[horizon:])

    def link_time(bytes_: float) -> float:
        return rtt + bytes_ * inv if bps > 0 else _INF

    tau = tuple(tuple(link_time(x) for x in tables.nbytes[c]) for c in h)
    dec = tuple(tuple(tables.decode[c]) for c in h)
    wq = tuple(tuple(tables.wq[c]) for c in h)
    r = tuple(tables.recompute[c] for c in h)
    if tail and tail[-1] - tail[0] + 1 == len(tail) and tail[-1] == n - 1:
        decode_from = tables.decode_from  # contiguous to the end: the session's suffix sums
        tail_dec = tuple(decode_from[tail[0]])
        tail_wq = tuple(tables.wq_from[tail[0]])
        tail_r = tables.recompute_from[tail[0]]
    else:
        decode_from = {}
        acc = [0.0] * nl
        for j in reversed(tail):
            acc = [x + y for x, y in zip(tables.decode[j], acc)]
            decode_from[j] = acc
        tail_dec = tuple(acc)
        tail_wq = tuple(sum(tables.wq[j][a] for j in tail) for a in range(nl))
        tail_r = sum(tables.recompute[j] for j in tail)
    tail_k = [-_INF] * nl
    for a in range(nl):
        acc_t, best = 0.0, -_INF
        for j in tail:
            acc_t += link_time(tables.nbytes[j][a])
            v = acc_t + decode_from[j][a]
            if v > best:
                best = v
        tail_k[a] = best
    # Decided chunks: below the horizon they set the initial prefix-ready time, between horizon chunks they
    # are folded in before the step above them, after the horizon before the tail.
    ready_s = state.ready_s
    bounds = h + [n]
    fold = [-_INF] * (len(h) + 1)
    ready0 = max(state.now_s, state.compute_free_s)
    k = 0
    for c, action in enumerate(state.actions):
        if action is None:
            continue
        while c > bounds[k]:
            k += 1
        x = ready_s[c]
        if x != x:
            raise ValueError(f"decided chunk {c} has no ready estimate (resolve the state first)")
        if k == 0:
            if x > ready0:
                ready0 = x
        elif x > fold[k]:
            fold[k] = x
    if not h:
        fold[0] = -_INF
    return MpcProblem(
        n_levels=nl, horizon=len(h), tau=tau, dec=dec, wq=wq, r=r, tail_dec=tail_dec, tail_k=tuple(tail_k),
        tail_wq=tail_wq, tail_r=tail_r, link0=state.link_free_s, dec0=state.decoder_free_s, ready0=ready0,
        qscale=1.0 / tables.total_tokens, mu=overrun_weight * tables.q_span / max(slo_s, 1e-9), slo_s=slo_s,
        fold=tuple(fold), chunks=tuple(h))


# --- the model's arithmetic, shared verbatim by the enumerator and the search -----------------------------

def _final_cost(p: MpcProblem, b: int, link: float, dec: float, ready: float, q: float) -> float:
    """Cost after the last horizon step took action `b` and reached this state (tail included)."""
    f = p.fold[p.horizon]
    if f > ready:
        ready = f
    if b == p.n_levels:
        tt = ready + p.tail_r
        qt = q
    else:
        x = dec + p.tail_dec[b]
        y = link + p.tail_k[b]
        dn = x if x > y else y
        tt = ready if ready > dn else dn
        qt = q + p.tail_wq[b]
    over = tt - p.slo_s
    return qt * p.qscale + (p.mu * over if over > 0.0 else 0.0)


def plan_cost(p: MpcProblem, plan: Sequence[int]) -> float:
    """Cost of `plan` (one action index per horizon step; index ``n_levels`` is text)."""
    if p.horizon == 0:
        return _final_cost(p, p.n_levels, p.link0, p.dec0, p.ready0, 0.0)
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
    return _final_cost(p, plan[-1], link, dec, ready, q)


def enumerate_plan(p: MpcProblem) -> tuple[tuple[int, ...], float]:
    """Full enumeration (RobustMPC's search): the first plan in enumeration order with the least cost."""
    best, best_cost = (), _INF
    for plan in itertools.product(range(p.n_actions), repeat=p.horizon):
        c = plan_cost(p, plan)
        if c < best_cost or not best:
            best, best_cost = plan, c
    return best, best_cost


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


_THETAS = (0.2, 0.4, 0.6, 0.8)
"""Weights of the surrogate bound ``TTFT >= theta * text_chain + (1 - theta) * link_chain``."""


def _surrogate_tables(p: MpcProblem) -> list[list[float]]:
    """``table[j][t]``: least cost that steps ``j .. h-2`` (those before the last) add to the surrogate
    bound of weight ``_THETAS[t]``, each step taking text or its best level on its own."""
    h, mu, qs, text = p.horizon, p.mu, p.qscale, p.n_levels
    table = [[0.0] * len(_THETAS) for _ in range(h)]
    acc = [0.0] * len(_THETAS)
    for j in range(h - 2, -1, -1):
        wq_j = [qs * x for x in p.wq[j]]
        tau_j = [mu * x for x in p.tau[j]]
        r_j = mu * p.r[j]
        row = table[j]
        for t, theta in enumerate(_THETAS):
            best = theta * r_j
            other = 1.0 - theta
            for a in range(text):
                v = wq_j[a] + other * tau_j[a]
                if v < best:
                    best = v
            acc[t] += best
            row[t] = acc[t]
    return table


def _surrogate_bound(p: MpcProblem, table_row: Sequence[float], b: int, link: float, ready: float, q: float
                     ) -> float:
    """Surrogate lower bound for plans ending in `b` from a state: cost >= qs*Q + mu*(TTFT - slo), with
    TTFT >= theta * (text chain) + (1 - theta) * (link chain) for every theta; slightly lowered to absorb
    rounding. `table_row` is the `_surrogate_tables` row of the first step not taken yet."""
    last = p.horizon - 1
    if b == p.n_levels:
        qc, a_b, c_b = 0.0, p.r[last] + p.tail_r, 0.0
    else:
        qc, a_b, c_b = p.wq[last][b] + p.tail_wq[b], 0.0, p.tau[last][b] + p.tail_k[b]
    if not (c_b < _INF and link < _INF):
        return -_INF
    mu = p.mu
    base = p.qscale * (q + qc) - mu * p.slo_s
    best = -_INF
    for t, theta in enumerate(_THETAS):
        w = base + mu * (theta * (ready + a_b) + (1.0 - theta) * (link + c_b)) + table_row[t]
        w -= 1e-9 * (abs(w) + mu * (ready + link + a_b + c_b) + 1e-12)
        if w > best:
            best = w
    return best


def search_plan(p: MpcProblem, hints: Sequence[Sequence[int]] = ()) -> tuple[tuple[int, ...], float]:
    """The plan `enumerate_plan` returns, found by exact branch-and-bound (see the module docstring).

    `hints` are candidate plans that seed the incumbent (for example the previous decision's plan shifted
    by one step); they change the speed, never the result.
    """
    h = p.horizon
    if h == 0:
        return (), plan_cost(p, ())
    n_act = p.n_actions
    text = p.n_levels
    best_plan: tuple[int, ...] = ()
    best_cost = _INF
    candidates = [tuple(x) for x in hints if len(x) == h and all(0 <= a < n_act for a in x)]
    if not candidates or h == 1:
        candidates += [(a,) * h for a in range(n_act)]
    for plan in candidates:
        c = plan_cost(p, plan)
        if c < best_cost or (c == best_cost and plan < best_plan) or not best_plan:
            best_plan, best_cost = plan, c
    if h == 1:
        return best_plan, best_cost  # the uniform plans are all the plans
    tau, decs, wqs, rs = p.tau, p.dec, p.wq, p.r
    link0, dec0, ready0 = p.link0, p.dec0, p.ready0
    last = h - 1
    mu, qs, slo = p.mu, p.qscale, p.slo_s
    tail_r = p.tail_r
    fold = p.fold
    f_last, f_end = fold[last], fold[h]
    mu_theta = [mu * t for t in _THETAS]
    mu_other = [mu * (1.0 - t) for t in _THETAS]
    root_bound = [_bound(p, b, link0, dec0, ready0, 0.0) for b in range(n_act)]
    prefix = [0] * h
    table = None
    for b in sorted(range(n_act), key=lambda b: (root_bound[b], b)):
        if root_bound[b] > best_cost:
            break  # roots are sorted by their bound
        if h > 2:
            if table is None:
                table = _surrogate_tables(p)
            if _surrogate_bound(p, table[0], b, link0, ready0, 0.0) > best_cost:
                continue
        prefix[last] = b
        is_text = b == text
        if is_text:
            r_last = rs[last]
            qc, a_b, c_b = 0.0, r_last + tail_r, 0.0
            tl = dl = wl = tdb = tkb = twb = 0.0  # text adds no quality loss
        else:
            tl, dl, wl = tau[last][b], decs[last][b], wqs[last][b]
            tdb, tkb, twb = p.tail_dec[b], p.tail_k[b], p.tail_wq[b]
            qc, a_b, c_b = wl + twb, 0.0, tl + tkb
            r_last = 0.0
        surrogate = table is not None and c_b < _INF
        margin_extra = max(abs(x) for x in table[0]) + 1e-12 if surrogate else 0.0
        stack = [(0, a, link0, dec0, ready0, 0.0) for a in range(n_act - 1, -1, -1)]
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
            # (the same expressions as plan_cost and _final_cost, so the floats are identical).
            rr = f_last if f_last > ready else ready
            if is_text:
                rr = rr + r_last
                if f_end > rr:
                    rr = f_end
                tt = rr + tail_r
                qt = q
            else:
                l2 = link + tl
                d2 = (l2 if l2 > dec else dec) + dl
                if d2 > rr:
                    rr = d2
                if f_end > rr:
                    rr = f_end
                x = d2 + tdb
                y = l2 + tkb
                dn = x if x > y else y
                tt = rr if rr > dn else dn
                qt = (q + wl) + twb
            over = tt - slo
            v = qt * qs + (mu * over if over > 0.0 else 0.0)
            if k + 1 == last:
                if v < best_cost or (v == best_cost and tuple(prefix) < best_plan):
                    best_cost, best_plan = v, tuple(prefix)
                continue
            if v > best_cost:
                continue
            if surrogate and link < _INF:
                # cost >= qs*Q + mu*(TTFT - slo) and TTFT >= any convex mix of the text and link chains;
                # lowered by a margin far above the rounding error of these few operations.
                base = qs * (q + qc) - mu * slo
                tc = ready + a_b
                lc = link + c_b
                w = -_INF
                for m_text, m_link, extra in zip(mu_theta, mu_other, table[k + 1]):
                    x = base + m_text * tc + m_link * lc + extra
                    if x > w:
                        w = x
                w -= 1e-9 * (abs(base) + mu * (slo + tc + lc) + margin_extra)
                if w > v:
                    v = w
                    if v > best_cost:
                        continue
            if v == best_cost and tuple(prefix[:k + 1]) > best_plan[:k + 1]:
                continue
            # Children; a load child whose quality alone (same float operations as its cost) exceeds the
            # incumbent is skipped before its step is computed.
            nxt = wqs[k + 1]
            for a2 in range(n_act - 1, -1, -1):
                if a2 != text and (((q + nxt[a2]) + wl) + twb) * qs > best_cost:
                    continue
                push((k + 1, a2, link, dec, ready, q))
    return best_plan, best_cost


class MpcPolicy(Policy):
    """RobustMPC with text as an extra action; see the module docstring. Spec ``mpc`` or ``mpc:<weight>``."""

    name = "mpc"

    def __init__(self, overrun_weight: float | str = DEFAULT_OVERRUN_WEIGHT, horizon: int = DEFAULT_HORIZON,
                 window: int = 5, exhaustive: bool = False) -> None:
        self.overrun_weight = float(overrun_weight)
        if not self.overrun_weight > 0:
            raise ValueError(f"mpc: overrun weight must be > 0, got {overrun_weight!r}")
        if horizon < 1:
            raise ValueError(f"mpc: horizon must be >= 1, got {horizon}")
        self.horizon = horizon
        self.window = window
        self.exhaustive = exhaustive
        """Use full enumeration instead of branch-and-bound (same decisions; for benchmarks)."""

    def reset(self, session: Session) -> None:
        super().reset(session)
        self._tables = SessionTables.of(session)
        self._levels = level_names(session.menus)
        self._text = len(self._levels)
        self._estimator = RobustThroughputEstimator(self.window, session.rtt_s, session.prior_throughput_bps)
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
            # No prior and no sample yet: probe the link with the smallest level.
            return self._load(obs, pending[0], self._levels[-1]) if obs.link_idle else None
        throughput = ConstantThroughput(bps, self.session.rtt_s)
        state = PlanState.from_observation(obs, throughput, self._link_order, self._decided_at).resolved()
        problem = build_problem(self._tables, pending, state, throughput, self.session.slo_s,
                                self.overrun_weight, self.horizon)
        if self.exhaustive:
            plan, _ = enumerate_plan(problem)
        else:
            prev = self._prev_plan
            hints = [x[:problem.horizon] for x in ((prev, prev[1:] + prev[-1:]) if prev else ())]
            plan, _ = search_plan(problem, hints)
        self._prev_plan = plan
        names = self._levels + (TEXT,)
        self.last_plan = tuple((c, names[a]) for c, a in zip(problem.chunks, plan))
        # Act as late as possible, so every action uses the latest measurements: text for the lowest
        # undecided chunk when the compute unit runs dry (it would wait for the chunks below it anyway),
        # the plan's first load when the link runs dry (loads run in index order, as planned).
        if plan[0] == self._text and obs.compute_idle:
            return Decision(pending[0], TEXT, predicted_bps=bps)
        if obs.link_idle:
            for chunk, a in zip(problem.chunks, plan):
                if a != self._text:
                    return self._load(obs, chunk, names[a], bps)
        return None

    def _load(self, obs: Observation, chunk: int, level: str, bps: float | None = None) -> Decision:
        self._link_order.append(chunk)
        self._decided_at[chunk] = obs.now_s
        return Decision(chunk, level, predicted_bps=bps)
