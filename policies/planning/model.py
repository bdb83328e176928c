"""The planning model: a pure, fast model of the execution model in `kvcast.policies.base`.

Planning policies (``mpc``, ``hybrid``, ``oracle``) ask "if I took these actions from here, when would every
chunk be ready, and what would the TTFT be?". This module answers it without SimPy or asyncio:

* `TransferModel` says when a transfer of ``nbytes`` started at ``t`` ends: `ConstantThroughput` (a predicted
  throughput plus an RTT per request, what online policies assume) or `KnownFuture` (the link's exact future,
  `Session.future_transfer_end_s`, for the oracle).
* `PlanState` is the engine's state in planning terms: decided actions, estimated ready times of chunks whose
  readiness no longer depends on future decisions, text chunks waiting in the compute queue, and when the
  link, decoder and compute unit are free. `PlanState.initial` is a session's start;
  `PlanState.from_observation` estimates the state from an `Observation`.
* `simulate_plan(state, plan, transfer)` plays a plan, a sequence of ``(chunk, action)`` in decision order, on
  the model and returns every chunk's ready time, the TTFT (``nan`` while some chunk stays undecided) and the
  session's quality loss.

The model is the one `base` documents: loads are transferred back to back in decision order starting when the
link is free (a policy that answers as soon as the link is idle gets exactly this), the decoder is FIFO
(``ready = max(transfer_end, decoder_free) + decode_s``), text chunks run on the compute unit lowest index
first and start once every chunk before them is ready (``start = max(compute_free, max(ready[:i]))``).
TTFT is the time when every chunk is ready (the query's own prefill is policy-independent and left out).
Recomputing from text has quality loss `TEXT_QUALITY_LOSS` (0: the KV is exact); a session's quality loss is
the token-weighted mean over its chunks (`session_quality_loss`).

Two chunks at a constant 1 Gbit/s: chunk 1 is loaded (1 MB: 8 ms on the link, then 2 ms of decoding) while
chunk 0 is recomputed (50 ms); the TTFT is the later of the two:

>>> from kvcast.policies.base import TEXT, ChunkMenu, LevelOption, Session
>>> menus = tuple(ChunkMenu(i, 1024 * i, 1024, (LevelOption("int8", 1_000_000, 0.002, 0.01),), 0.05)
...               for i in range(2))
>>> result = simulate_plan(PlanState.initial(Session(menus, slo_s=0.5)), [(1, "int8"), (0, TEXT)],
...                        ConstantThroughput(1e9))
>>> [round(t, 9) for t in result.ready_s], round(result.ttft_s, 9), result.quality_loss
([0.05, 0.01], 0.05, 0.005)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from kvcast.policies.base import TEXT, ChunkMenu, Observation, Session, chunk_quality_losses

__all__ = [
    "TEXT_QUALITY_LOSS",
    "TransferModel",
    "ConstantThroughput",
    "KnownFuture",
    "PlanState",
    "PlanResult",
    "simulate_plan",
    "session_quality_loss",
    "action_quality_loss",
    "in_order_plan",
    "Plan",
]

TEXT_QUALITY_LOSS = 0.0
"""Quality loss of a chunk recomputed from text (its KV is exact)."""

Plan = Sequence[tuple[int, str]]


class TransferModel(Protocol):
    """When a transfer of `nbytes` payload bytes, started alone at `start_s`, is delivered."""

    def transfer_end_s(self, start_s: float, nbytes: int) -> float: ...


@dataclass(frozen=True, slots=True)
class ConstantThroughput:
    """A constant throughput `bps` (payload bits/s) and a round-trip time `rtt_s` paid once per request.

    A transfer of ``n`` bytes takes ``rtt_s + 8 n / bps`` seconds; with ``bps <= 0`` it never ends (``inf``).
    """

    bps: float
    rtt_s: float = 0.0

    def duration_s(self, nbytes: int) -> float:
        if self.bps <= 0.0:
            return math.inf
        return self.rtt_s + nbytes * 8.0 / self.bps

    def transfer_end_s(self, start_s: float, nbytes: int) -> float:
        return start_s + self.duration_s(nbytes)


@dataclass(frozen=True, slots=True)
class KnownFuture:
    """The link's exact future (oracle): ``end_fn(start_s, nbytes)`` as `Session.future_transfer_end_s`."""

    end_fn: Callable[[float, int], float]

    def transfer_end_s(self, start_s: float, nbytes: int) -> float:
        return self.end_fn(start_s, nbytes)


def action_quality_loss(menu: ChunkMenu, action: str) -> float:
    """Quality loss of taking `action` (a level name or `TEXT`) on the chunk of `menu`."""
    return TEXT_QUALITY_LOSS if action == TEXT else menu.option(action).quality_loss


def session_quality_loss(menus: Sequence[ChunkMenu], actions: Sequence[str | None],
                         lossy_prefix_ratio: float = 0.0) -> float:
    """Token-weighted mean quality loss of a session whose chunks took `actions` (``None``: counted as 0).

    With `lossy_prefix_ratio` > 0 a text chunk is scored over its lossy prefix
    (`kvcast.policies.base.chunk_quality_losses`); the planners' own objectives keep text lossless
    (`TEXT_QUALITY_LOSS`), exact for Cake-family plans, whose text chunks form a lossless prefix."""
    total = sum(m.tokens for m in menus)
    if total <= 0:
        return 0.0
    if lossy_prefix_ratio:
        losses = chunk_quality_losses(menus, actions, lossy_prefix_ratio)
        return sum(m.tokens * q for m, q in zip(menus, losses)) / total
    loss = 0.0
    for menu, action in zip(menus, actions):
        if action is not None:
            loss += menu.tokens * action_quality_loss(menu, action)
    return loss / total


@dataclass(frozen=True, slots=True)
class PlanState:
    """The engine's state in planning terms. Times are seconds since the session start.

    ``ready_s[i]`` is the (estimated) time chunk ``i`` is or will be ready, for every decided chunk whose
    readiness no longer depends on future decisions: ready, decoding, on the link, or running on compute.
    It is ``nan`` for undecided chunks and for the text chunks of `compute_queue`, which still wait for their
    prefix and are played again by `simulate_plan`.
    """

    now_s: float
    menus: tuple[ChunkMenu, ...]
    actions: tuple[str | None, ...]
    ready_s: tuple[float, ...]
    link_free_s: float
    """When the link can start a new transfer (after everything queued on it)."""
    decoder_free_s: float
    """When the decoder has decoded everything transferred or queued on the link."""
    compute_free_s: float
    """When the compute unit has finished the text chunk running on it (``now_s`` if none)."""
    compute_queue: tuple[int, ...] = ()
    """Decided text chunks not started yet (the compute unit runs them lowest index first)."""

    @property
    def pending(self) -> tuple[int, ...]:
        """Undecided chunks, ascending."""
        return tuple(i for i, a in enumerate(self.actions) if a is None)

    def resolved(self) -> PlanState:
        """This state with the queued text chunks whose prefixes are all estimated played on compute
        (lowest index first, as the engine runs them); the others stay queued."""
        if not self.compute_queue:
            return self
        ready = list(self.ready_s)
        compute = self.compute_free_s
        queue = sorted(self.compute_queue)
        done = 0
        for chunk in queue:
            prefix = self.now_s
            for r in ready[:chunk]:
                if r != r:
                    prefix = math.nan
                    break
                if r > prefix:
                    prefix = r
            if prefix != prefix:
                break
            compute = (compute if compute > prefix else prefix) + self.menus[chunk].recompute_s
            ready[chunk] = compute
            done += 1
        if not done:
            return self
        return PlanState(now_s=self.now_s, menus=self.menus, actions=self.actions, ready_s=tuple(ready),
                         link_free_s=self.link_free_s, decoder_free_s=self.decoder_free_s,
                         compute_free_s=compute, compute_queue=tuple(queue[done:]))

    @classmethod
    def initial(cls, session: Session, now_s: float = 0.0) -> PlanState:
        """A session's start: nothing decided, every resource free at `now_s`."""
        n = len(session.menus)
        return cls(now_s=now_s, menus=session.menus, actions=(None,) * n, ready_s=(math.nan,) * n,
                   link_free_s=now_s, decoder_free_s=now_s, compute_free_s=now_s)

    @classmethod
    def from_observation(cls, obs: Observation, transfer: TransferModel,
                         link_order: Sequence[int] = (), started_s: Mapping[int, float] | None = None
                         ) -> PlanState:
        """Estimate the planning state from `obs`, predicting unfinished transfers with `transfer`.

        `link_order` lists loaded chunks in the order they were decided (the link's FIFO order; loaded
        chunks missing from it are assumed to follow in index order). `started_s` maps a chunk to the time
        it was decided, a lower bound on its transfer start. Estimates never lie before ``obs.now_s``.
        """
        now = obs.now_s
        menus = obs.menus
        n = len(menus)
        started = started_s or {}
        actions = obs.actions
        ready = [math.nan] * n
        sampled: dict[int, float] = {s.chunk: s.end_s for s in obs.samples}
        last_end = max(sampled.values(), default=0.0)

        # Decoder: transferred but not ready chunks, in transfer-end order; walk back from decoder_free_at_s.
        decoding = sorted((c for c in sampled if actions[c] not in (None, TEXT) and not obs.ready[c]),
                          key=lambda c: sampled[c])
        t = max(obs.decoder_free_at_s, now)
        for c in reversed(decoding):
            ready[c] = t
            t = max(now, t - menus[c].option(actions[c]).decode_s)
        decoder_free = max(obs.decoder_free_at_s, now)

        # Link: loaded chunks not transferred yet, in decision order; the first may be in flight.
        on_link = {c for c in range(n) if actions[c] not in (None, TEXT) and c not in sampled}
        order = [c for c in link_order if c in on_link]
        order += sorted(on_link.difference(order))
        link_free = now
        for k, c in enumerate(order):
            opt = menus[c].option(actions[c])
            if k == 0:
                start = max(last_end, started.get(c, last_end))
                end = max(transfer.transfer_end_s(start, opt.nbytes), now)
            else:
                end = transfer.transfer_end_s(link_free, opt.nbytes)
            link_free = end
            decoder_free = max(end, decoder_free) + opt.decode_s
            ready[c] = decoder_free
        if not order and not obs.link_idle:
            link_free = max(now, obs.link_busy_until_s)

        # Compute: text chunks not ready, in index order (the order policies queue them). The head runs
        # if every chunk before it is ready; its end is what remains of compute_free_at_s after the rest.
        texts = [c for c in range(n) if actions[c] == TEXT and not obs.ready[c]]
        compute_free = now
        queue: list[int] = []
        if texts:
            head = texts[0]
            if all(obs.ready[:head]):
                rest = sum(menus[c].recompute_s for c in texts[1:])
                ready[head] = compute_free = max(now, obs.compute_free_at_s - rest)
                queue = texts[1:]
            else:
                queue = texts
        for i in range(n):
            if obs.ready[i]:
                ready[i] = now if math.isnan(ready[i]) else min(ready[i], now)
        return cls(now_s=now, menus=menus, actions=tuple(actions), ready_s=tuple(ready),
                   link_free_s=link_free, decoder_free_s=decoder_free, compute_free_s=compute_free,
                   compute_queue=tuple(queue))


@dataclass(frozen=True, slots=True)
class PlanResult:
    """Outcome of a plan on the planning model."""

    ready_s: tuple[float, ...]
    """Per chunk: when it is ready (``nan`` if undecided, or text waiting for an undecided chunk)."""
    ttft_s: float
    """When every chunk is ready; ``nan`` if some chunk stays undecided."""
    quality_loss: float
    """Token-weighted mean quality loss of the decided and planned chunks."""
    actions: tuple[str | None, ...]
    """Every chunk's action after the plan."""

    def overrun_s(self, slo_s: float) -> float:
        """How far the TTFT lies past `slo_s` (0 if it meets it)."""
        return max(0.0, self.ttft_s - slo_s)


def simulate_plan(state: PlanState, plan: Plan, transfer: TransferModel) -> PlanResult:
    """Play `plan` (``(chunk, action)`` pairs for undecided chunks, in decision order) on the model.

    Text chunks (queued and planned) run lowest index first. Raises ValueError for a chunk that is not
    undecided, a repeated chunk or an unknown level.
    """
    menus = state.menus
    n = len(menus)
    actions = list(state.actions)
    ready = list(state.ready_s)
    texts = list(state.compute_queue)
    link = state.link_free_s
    dec = state.decoder_free_s
    for chunk, action in plan:
        if not 0 <= chunk < n or actions[chunk] is not None:
            raise ValueError(f"plan decides chunk {chunk}, which is not undecided")
        actions[chunk] = action
        if action == TEXT:
            texts.append(chunk)
            continue
        opt = menus[chunk].option(action)
        link = transfer.transfer_end_s(link, opt.nbytes)
        dec = (link if link > dec else dec) + opt.decode_s
        ready[chunk] = dec
    compute = state.compute_free_s
    for chunk in sorted(texts):
        prefix = state.now_s
        for j in range(chunk):
            r = ready[j]
            if r != r:  # nan: an undecided chunk
                prefix = math.nan
                break
            if r > prefix:
                prefix = r
        if prefix != prefix:
            break  # waits for an undecided chunk: it and everything behind it stay unknown
        start = compute if compute > prefix else prefix
        compute = start + menus[chunk].recompute_s
        ready[chunk] = compute
    ttft = math.nan if any(r != r for r in ready) else max(ready, default=state.now_s)
    return PlanResult(ready_s=tuple(ready), ttft_s=ttft, quality_loss=session_quality_loss(menus, actions),
                      actions=tuple(actions))


def in_order_plan(chunks: Iterable[int], actions: Iterable[str]) -> list[tuple[int, str]]:
    """Pair `chunks` with `actions`: the plan that decides them in this order."""
    return list(zip(chunks, actions))
