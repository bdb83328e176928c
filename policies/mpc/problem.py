"""One decision's planning problem: the horizon's steps and the tail, as tables of floats.

`SessionTables` holds a session's menus as chunk x level lists (built once per session); `build_problem`
turns a planning state (`kvcast.policies.planning.PlanState`) and a predicted throughput into an
`MpcProblem`: per horizon step and action its link, decode and recompute time and its quality loss; the
tail's prefix and suffix sums for every split; the ready times of the decided chunks, folded in where they
bound the next step; and the objective's weights (see `kvcast.policies.mpc` for the objective). The cost of a
plan on a problem is `kvcast.policies.mpc.cost.plan_cost`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvcast.policies.base import TEXT, Session, level_names, undominated_levels
from kvcast.policies.planning import SLO_FIRST, ConstantThroughput, Objective, PlanState

__all__ = ["DEFAULT_HORIZON", "DEFAULT_OVERRUN_WEIGHT", "MpcProblem", "SessionTables", "build_problem"]

DEFAULT_HORIZON = 5
DEFAULT_OVERRUN_WEIGHT = 20.0
_INF = math.inf


@dataclass(frozen=True, slots=True)
class MpcProblem:
    """One decision's planning problem: `horizon` in-order steps (action ``n_levels`` is text), then the tail.

    Per step ``k`` and level ``a``: ``tau[k][a]`` link time, ``dec[k][a]`` decode time, ``wq[k][a]``
    token-weighted quality loss; ``r[k]`` recompute time. Tail (the ``m`` undecided chunks after the horizon,
    ascending): ``tail_rp[s]`` recompute time of its first ``s`` chunks; per level ``b``: ``tail_tb[b][s]``
    link time of its chunks from ``s`` on plus the level's largest decode time (``-inf`` for ``s = m``) and
    ``tail_ws[b][s]`` their token-weighted quality loss; ``tail_fast[b]``: every tail chunk's recompute costs
    more (``mu * r``) than its loss at ``b`` saves, which `kvcast.policies.mpc.cost.tail_evaluator` uses to
    skip most splits.
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
    """Level of the tail's loads when the last horizon step is text, fixed per decision so the cost stays a
    function of the plan's own actions. ``objective=slo``: the level of least quality loss with which loading
    the whole tail alone would meet the SLO (ties: menu order), else the fastest. ``objective=ttft``: the
    fastest level with which the whole tail loaded keeps the session within the quality budget, else the
    level of least loss."""
    ttft_first: bool = False
    """``objective=ttft``: a plan's cost is the key ``(max(0, Q - budget), TTFT, Q)``, compared
    lexicographically, instead of ``Q + mu * overrun`` (see `kvcast.policies.mpc`)."""
    budget: float = _INF
    """``objective=ttft``: the largest session mean quality loss (``inf``: none)."""
    q0: float = 0.0
    """Token-weighted quality loss of the decided chunks, where every plan's loss starts (``objective=ttft``;
    0 for ``objective=slo``, whose choice does not depend on it)."""
    _evaluators: list = field(default_factory=list, compare=False, repr=False)

    @property
    def n_actions(self) -> int:
        return self.n_levels + 1

    @property
    def tail_r(self) -> float:
        return self.tail_rp[-1]

    @property
    def worst(self) -> float | tuple[float, float, float]:
        """A cost no plan exceeds (the search's starting incumbent)."""
        return (_INF, _INF, _INF) if self.ttft_first else _INF


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
    def of(cls, session: Session, prune: bool = True, objective: Objective = SLO_FIRST) -> SessionTables:
        """Tables of `session`'s menus; `prune` drops dominated levels (`undominated_levels`: same best
        cost). ``q_span`` is the largest loss of *every* level on the menu either way, so pruning leaves
        the objective unchanged. A level that `objective`'s level floor forbids on a chunk is left out of
        that chunk's row like a level the chunk lacks (its transfer never ends); wherever a dominated level
        is allowed, so is the level that dominates it (it loses no more), so pruning stays exact."""
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
                if opt is None or not objective.allows(menu, opt):
                    continue  # a level this chunk lacks (or may not use): its transfer never ends
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
                  overrun_weight: float = DEFAULT_OVERRUN_WEIGHT, horizon: int = DEFAULT_HORIZON,
                  objective: Objective = SLO_FIRST) -> MpcProblem:
    """The planning problem from `state`: the first `horizon` of the `pending` chunks (ascending), then the
    rest as the tail. Decided chunks may lie anywhere; each needs an estimated ready time in `state`
    (`PlanState.resolved`). `objective`'s level floor is in `tables` (`SessionTables.of`); its kind and
    budget are set here."""
    ttft_first = objective.ttft_first
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
    if tail and not ttft_first:
        ok_table = tables.fast_ok(mu)
        fast = [all(col) for col in zip(*(ok_table[c] for c in tail))]
    else:
        fast = [True] * nl
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
    q0 = 0.0
    if ttft_first:
        menus = state.menus
        for c, action in enumerate(state.actions):
            if action is not None and action != TEXT:
                q0 += menus[c].tokens * menus[c].option(action).quality_loss
    text_tail_level = 0
    if m and nl and ttft_first:
        # after an all-text horizon: the fastest level whose whole tail keeps the session within the budget
        # (ties: the smaller loss, then menu order), else the level of least loss
        budget = objective.quality_budget
        fits = [a for a in range(nl) if (q0 + wss[a][0]) * qscale <= budget]
        text_tail_level = (min(fits, key=lambda a: (tbs[a][0], wss[a][0], a)) if fits
                           else min(range(nl), key=lambda a: (wss[a][0], tbs[a][0], a)))
    elif m and nl:
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
        tail_chunks=tuple(tail), text_tail_level=text_tail_level, ttft_first=ttft_first,
        budget=objective.quality_budget, q0=q0)
    return p
