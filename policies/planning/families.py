"""Exact searches over two families of plans, on the planning model (`kvcast.policies.planning.model`).

Objective, lexicographic (smaller is better; `FamilyPlan.key`): **SLO overrun** ``max(0, TTFT - SLO)``
first, then the session's **quality loss** (token-weighted mean; text is lossless), then TTFT; or, with
``objective=ttft`` (`kvcast.policies.planning.objective.Objective`), the excess over the quality budget, then
TTFT, then quality loss, with the levels below a level floor left out. The link is
any `kvcast.policies.planning.model.TransferModel`: the exact future for ``oracle``
(`kvcast.policies.planning.model.KnownFuture`), a predicted throughput for ``hybrid``
(`kvcast.policies.planning.model.ConstantThroughput`).

Plan families. Each search is **exact** (every plan of the family is considered, none by approximation):

* **in order** (`plan_in_order`): every undecided chunk, in index order, takes a codec level or text; loads
  are transferred back to back in index order, text chunks are recomputed lowest first. This holds every
  plan of ``mpc``, ``cachegen``, ``fixed``, ``raw`` and ``text``.
* **Cake** (`plan_cake`): a text prefix computed from the front while the rest is loaded from the back
  (highest index first), each loaded chunk at its own level. This holds every plan of ``hybrid``.

Both are label-setting dynamic programs over chunks whose labels are the *exact* model state (link free,
decoder free, prefix ready, quality), not time buckets: a label is dropped only when another label of the
same step is at least as good in every component (every step of the model is monotone in each component, and
both objectives' keys are monotone in the final state, so nothing it could lead to is better), or when even
its optimistic completion (TTFT at least the label's ready time, loss at least its loss) cannot beat the
incumbent.
Levels that another level beats on size, decode time and quality at once are left out of both searches
(`kvcast.policies.base.undominated_levels`: they can only tie); nothing assumes the menu's order is monotone
in size or quality. Not covered: orders other than these two (for example loads in an arbitrary order, or
text chunks in the middle of a back-to-front load), which the built-in policies never produce.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kvcast.policies.base import TEXT, undominated_levels
from kvcast.policies.planning.model import PlanState, TransferModel
from kvcast.policies.planning.objective import SLO_FIRST, Objective

__all__ = ["FamilyPlan", "plan_in_order", "plan_cake"]

_INF = math.inf
_DOMINANCE_WINDOW = 48
"""Labels are checked for dominance against this many kept labels of similar quality (a smaller window
keeps more labels; the search stays exact)."""


@dataclass(frozen=True, slots=True)
class FamilyPlan:
    """The best plan of a family for the undecided chunks of a state, and what it achieves on the model."""

    actions: tuple[tuple[int, str], ...]
    """``(chunk, action)`` for every undecided chunk, ascending."""
    load_order: tuple[int, ...]
    """Loaded chunks in transfer order."""
    transfer_end_s: tuple[tuple[int, float], ...]
    """Planned end of each loaded chunk's transfer."""
    overrun_s: float
    quality_loss: float
    """Session quality loss (token-weighted mean, decided chunks included)."""
    ttft_s: float
    family: str
    """``"in-order"`` or ``"cake"``."""
    objective: Objective = SLO_FIRST
    """The objective the plan was searched for."""

    @property
    def key(self) -> tuple[float, float, float]:
        """The objective, compared lexicographically (`Objective.key`)."""
        if self.objective.ttft_first:
            return (self.objective.excess(self.quality_loss), self.ttft_s, self.quality_loss)
        return (self.overrun_s, self.quality_loss, self.ttft_s)


class _Context:
    """What both searches need from a state: pending chunks, folded ready times of decided chunks."""

    def __init__(self, state: PlanState, transfer: TransferModel, slo_s: float,
                 objective: Objective = SLO_FIRST) -> None:
        self.state = state
        self.transfer = transfer
        self.slo = slo_s
        self.objective = objective
        menus = state.menus
        self.total_tokens = float(sum(m.tokens for m in menus)) or 1.0
        self.pending = state.pending
        if state.compute_queue:
            raise ValueError("the plan searches start from a state whose queued text chunks are resolved "
                             "(PlanState.resolved)")
        # Decided chunks: ready estimates, folded between pending chunks (as in kvcast.policies.mpc).
        n = len(menus)
        bounds = list(self.pending) + [n]
        self.fold = [-_INF] * (len(self.pending) + 1)
        ready0 = max(state.now_s, state.compute_free_s)
        q0 = 0.0
        k = 0
        for c, action in enumerate(state.actions):
            if action is None:
                continue
            while c > bounds[k]:
                k += 1
            x = state.ready_s[c]
            if x != x:
                raise ValueError(f"decided chunk {c} has no ready estimate")
            if k == 0:
                ready0 = max(ready0, x)
            else:
                self.fold[k] = max(self.fold[k], x)
            q0 += menus[c].tokens * (0.0 if action == TEXT else menus[c].option(action).quality_loss)
        self.ready0 = ready0
        self.q0 = q0
        # Latest ready time of decided chunks at or above each pending position (for Cake plans).
        self.fold_above = [-_INF] * (len(self.pending) + 1)
        acc = -_INF
        for k in range(len(self.pending), 0, -1):
            acc = max(acc, self.fold[k])
            self.fold_above[k] = acc
        self.fold_above[0] = max(acc, ready0)
        self._cache: dict[tuple[float, int], float] = {}

    def transfer_end(self, start: float, nbytes: int) -> float:
        key = (start, nbytes)
        end = self._cache.get(key)
        if end is None:
            end = self.transfer.transfer_end_s(start, nbytes) if start < _INF else _INF
            self._cache[key] = end
        return end

    def options(self, chunk: int, keep: set[str]) -> list:
        """The menu rows of `chunk` that the searches try: undominated (`keep`) and allowed by the level
        floor."""
        menu = self.state.menus[chunk]
        allows = self.objective.allows
        return [o for o in menu.levels if o.level in keep and allows(menu, o)]

    def ttft_key(self, ttft: float, q: float) -> tuple[float, float, float]:
        """``objective=ttft``'s key of a plan (`q` unnormalised), or a lower bound on every completion of a
        partial plan whose TTFT is at least `ttft` and whose loss is at least `q`."""
        qn = q / self.total_tokens
        over = qn - self.objective.quality_budget
        return (over if over > 0.0 else 0.0, ttft, qn)


def _dominated(front: list, link: float, dec: float, ready: float) -> bool:
    """Is (link, dec, ready) dominated by one of the recent front labels (which have quality <= it)?"""
    for other in front[-_DOMINANCE_WINDOW:]:
        if other[0] <= link and other[1] <= dec and other[2] <= ready:
            return True
    return False


def _make_plan(ctx: _Context, assigned: dict[int, str], order: Sequence[int], ends: Sequence[float],
               score: tuple[float, float, float], family: str) -> FamilyPlan:
    if ctx.objective.ttft_first:  # score = (excess, ttft, quality)
        over = score[1] - ctx.slo
        return FamilyPlan(actions=tuple(sorted(assigned.items())), load_order=tuple(order),
                          transfer_end_s=tuple(zip(order, ends)), overrun_s=over if over > 0.0 else 0.0,
                          quality_loss=score[2], ttft_s=score[1], family=family, objective=ctx.objective)
    return FamilyPlan(actions=tuple(sorted(assigned.items())), load_order=tuple(order),
                      transfer_end_s=tuple(zip(order, ends)), overrun_s=score[0], quality_loss=score[1],
                      ttft_s=score[2], family=family)


def _unwind(label) -> list[tuple[int, str, float]]:
    """(chunk, action, transfer end) of a label's decisions, first to last."""
    out = []
    while label is not None and label[5] is not None:
        out.append((label[5], label[6], label[7]))
        label = label[4]
    out.reverse()
    return out


def plan_in_order(state: PlanState, transfer: TransferModel, slo_s: float,
                  incumbent: tuple[float, float, float] = (_INF, _INF, _INF),
                  objective: Objective = SLO_FIRST) -> FamilyPlan | None:
    """The best in-order plan for `objective` (see the module docstring), or None if none beats
    `incumbent`'s key."""
    ctx = _Context(state, transfer, slo_s, objective)
    menus = state.menus
    slo = slo_s
    total = ctx.total_tokens
    ttft_first = objective.ttft_first
    ttft_key = ctx.ttft_key
    # objective=slo: quality unnormalised while searching; objective=ttft: the key itself
    best = tuple(incumbent) if ttft_first else (incumbent[0], incumbent[1] * total, incumbent[2])
    best_label = None
    # label: (link, dec, ready, q, parent, chunk, action, transfer_end)
    labels = [(state.link_free_s, state.decoder_free_s, ctx.ready0, ctx.q0, None, None, None, None)]
    fold = ctx.fold
    pending = ctx.pending
    last = len(pending) - 1
    keep = set(undominated_levels(menus))
    for k, chunk in enumerate(pending):
        menu = menus[chunk]
        r = menu.recompute_s
        f = fold[k] if k else -_INF
        options = [(o.level, o.nbytes, o.decode_s, menu.tokens * o.quality_loss)
                   for o in ctx.options(chunk, keep)]
        candidates = []
        for lab in labels:
            link, dec, ready, q = lab[0], lab[1], lab[2], lab[3]
            if f > ready:
                ready = f
            candidates.append((link, dec, ready + r, q, lab, chunk, TEXT, None))
            if link == _INF:
                continue
            for level, nbytes, decode_s, wq in options:
                end = ctx.transfer_end(link, nbytes)
                if end == _INF:
                    continue
                d2 = (end if end > dec else dec) + decode_s
                candidates.append((end, d2, d2 if d2 > ready else ready, q + wq, lab, chunk, level, end))
        # Bound: the TTFT is at least the prefix-ready time, quality only grows.
        kept = []
        for c in candidates:
            if ttft_first:
                key = ttft_key(c[2], c[3])
            else:
                over = c[2] - slo
                key = (over if over > 0.0 else 0.0, c[3], c[2])
            if key < best:
                kept.append((key, c))
        kept.sort(key=lambda kc: (kc[1][3], kc[1][2], kc[1][0], kc[1][1]))
        front: list = []
        for _, c in kept:
            if not _dominated(front, c[0], c[1], c[2]):
                front.append(c)
        if k == last:
            end_fold = fold[len(pending)]
            for c in front:
                ttft = c[2] if c[2] > end_fold else end_fold
                if ttft_first:
                    key = ttft_key(ttft, c[3])
                else:
                    over = ttft - slo
                    key = (over if over > 0.0 else 0.0, c[3], ttft)
                if key < best:
                    best, best_label = key, c
        labels = front
        if not labels:
            break
    if best_label is None:
        return None
    steps = _unwind(best_label)
    assigned = {c: a for c, a, _ in steps}
    loads = [(c, e) for c, a, e in steps if a != TEXT]
    return _make_plan(ctx, assigned, [c for c, _ in loads], [e for _, e in loads],
                      best if ttft_first else (best[0], best[1] / total, best[2]), "in-order")


def plan_cake(state: PlanState, transfer: TransferModel, slo_s: float,
              incumbent: tuple[float, float, float] = (_INF, _INF, _INF),
              objective: Objective = SLO_FIRST) -> FamilyPlan | None:
    """The best Cake-family plan (text prefix, loads from the back) for `objective`, or None if none
    beats `incumbent`."""
    ctx = _Context(state, transfer, slo_s, objective)
    ttft_first = objective.ttft_first
    ttft_key = ctx.ttft_key
    menus = state.menus
    slo = slo_s
    total = ctx.total_tokens
    pending = ctx.pending
    m = len(pending)
    fold = ctx.fold
    # compute_end[j]: when the text prefix pending[:j] is done (each waits for the decided chunks below it).
    compute_end = [0.0] * (m + 1)
    c = max(state.compute_free_s, ctx.ready0)
    compute_end[0] = c
    for j, chunk in enumerate(pending):
        if j and fold[j] > c:
            c = fold[j]
        c = c + menus[chunk].recompute_s
        compute_end[j + 1] = c
    decided_above = ctx.fold_above  # decided chunks' latest ready time from each position on
    best = tuple(incumbent) if ttft_first else (incumbent[0], incumbent[1] * total, incumbent[2])
    best_choice = None  # (j, label)

    def consider(j: int, dec: float, q: float, label) -> None:
        nonlocal best, best_choice
        ttft = compute_end[j]
        if dec > ttft:
            ttft = dec
        above = decided_above[j] if j else decided_above[0]
        if above > ttft:
            ttft = above
        if ttft_first:
            key = ttft_key(ttft, q)
        else:
            over = ttft - slo
            key = (over if over > 0.0 else 0.0, q, ttft)
        if key < best:
            best, best_choice = key, (j, label)

    consider(m, -_INF, ctx.q0, None)  # everything undecided recomputed
    labels = [(state.link_free_s, state.decoder_free_s, 0.0, ctx.q0, None, None, None, None)]
    keep = set(undominated_levels(menus))
    for j in range(m - 1, -1, -1):
        chunk = pending[j]
        menu = menus[chunk]
        options = ctx.options(chunk, keep)
        candidates = []
        for lab in labels:
            link, dec, q = lab[0], lab[1], lab[3]
            for o in options:
                end = ctx.transfer_end(link, o.nbytes)
                if end == _INF:
                    continue
                d2 = (end if end > dec else dec) + o.decode_s
                q2 = q + menu.tokens * o.quality_loss
                # More loads only delay the decoder; the text prefix only gets shorter.
                if ttft_first:
                    if ttft_key(d2, q2) < best:
                        candidates.append((end, d2, 0.0, q2, lab, chunk, o.level, end))
                    continue
                over = d2 - slo
                if (over if over > 0.0 else 0.0, q2, d2) < best:
                    candidates.append((end, d2, 0.0, q2, lab, chunk, o.level, end))
        candidates.sort(key=lambda x: (x[3], x[1], x[0]))
        front: list = []
        for cand in candidates:
            if not _dominated(front, cand[0], cand[1], 0.0):
                front.append(cand)
        for cand in front:
            consider(j, cand[1], cand[3], cand)
        labels = front
        if not labels:
            break
    if best_choice is None:
        return None
    j, label = best_choice
    steps = _unwind(label)  # loads, back to front
    assigned = {c: TEXT for c in pending[:j]}
    assigned.update({c: a for c, a, _ in steps})
    return _make_plan(ctx, assigned, [c for c, _, _ in steps], [e for _, _, e in steps],
                      best if ttft_first else (best[0], best[1] / total, best[2]), "cake")
