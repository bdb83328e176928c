"""The Policy interface: what a controller sees and what it answers.

A policy is pure decision logic (sans-IO): it receives an `Observation` and returns a `Decision` (or
`None`). It never sleeps, reads sockets, or touches SimPy or asyncio; the same policy object runs in
virtual time (SimPy link) and in real time (aiohttp link).

The execution model that observations describe (the engine in `streamer/` implements it):

* A context is split into chunks ``0..n-1``. Each chunk has a `ChunkMenu`: for every codec level its
  encoded size, GPU decode time and quality loss, plus the time to recompute the chunk's KV from text.
* Three resources work concurrently:
    - the **link** transfers loaded chunks (one request per chunk, in decision order);
    - the **decoder** decodes a transferred chunk (FIFO), so the transfer of chunk ``j`` overlaps the
      decoding of the chunk before it;
    - the **compute** unit recomputes text chunks, lowest chunk index first. Recomputing chunk ``i`` needs
      the KV of every chunk before it, so it starts only once chunks ``0..i-1`` are ready (loaded and
      decoded, or recomputed). Loaded chunks need nothing before them.
* A chunk is *ready* when its KV is on the GPU. The session's time to first token (TTFT) is the time when
  every chunk is ready, plus the (policy-independent) prefill of the query.
* The engine asks the policy for a decision whenever some chunk is still undecided and the link or the
  compute unit is idle with an empty queue. A decision assigns one undecided chunk (any of them: a
  Cake-style policy loads from the back and computes from the front) either a codec level, which queues it
  on the link, or `TEXT`, which queues it on compute. Returning ``None`` leaves the resources as they are
  until the next event: a transfer or a recompute finishing or, when neither is in flight, the decoder
  finishing a chunk. Returning ``None`` when nothing at all is in flight is an error (it would wait forever).

A policy author subclasses `Policy`, implements `decide`, and registers it with
`kvcast.policies.registry.PolicyRegistry.register` (or a ``kvcast.policies`` entry point in a third-party
package; ``docs/writing-a-policy.md`` walks through one). Both executors, the engine and
`kvcast.policies.dryrun`, check every answer with `validate_decision` and raise `PolicyError`
(`PolicyStalled` for a policy that would wait forever) with the same message for the same bug.

A two-chunk session, and a policy that loads every chunk at one level while the link is idle:

>>> from kvcast.policies.base import (ChunkMenu, Decision, LevelOption, Observation, Policy, Session,
...                                   validate_decision)
>>> menus = tuple(ChunkMenu(index=i, start_token=1024 * i, tokens=1024,
...                         levels=(LevelOption("int8", 2_000_000, decode_s=0.002, quality_loss=0.01),),
...                         recompute_s=0.05) for i in range(2))
>>> session = Session(menus=menus, slo_s=0.5, rtt_s=0.01)
>>> class LoadInt8(Policy):
...     name = "load-int8"
...     def decide(self, obs):
...         return Decision(obs.pending[0], "int8") if obs.link_idle else None
>>> policy = LoadInt8()
>>> policy.reset(session)
>>> obs = Observation(now_s=0.0, session=session, pending=(0, 1), actions=(None, None), ready=(False, False),
...                   link_idle=True, compute_idle=True, link_busy_until_s=0.0, decoder_free_at_s=0.0,
...                   compute_free_at_s=0.0)
>>> policy.decide(obs)
Decision(chunk=0, action='int8', predicted_bps=None)
>>> validate_decision(obs, Decision(0, "int4"), "load-int8")  # doctest: +ELLIPSIS
Traceback (most recent call last):
kvcast.policies.base.PolicyError: policy 'load-int8' chose level 'int4' for chunk 0 at t=0 s; the menu has ...
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

TEXT = "text"
"""Action name: recompute the chunk's KV from its text on the compute unit."""

DEFAULT_LOSSY_PREFIX_RATIO = 0.0
"""`Session.lossy_prefix_ratio` when the profile measures none: 0, a text chunk scores as lossless whatever
precedes it (the convention of CacheGen's artifact, which simulates text with the lossless KV). Unmeasured: a
profile that measures the ratio (the continuation's loss when a chunk is recomputed over a prefix loaded at a
level, over that level's own loss) replaces it."""


@dataclass(frozen=True, slots=True)
class LevelOption:
    """One way to load a chunk: a codec level and what it costs."""

    level: str
    """Codec level name, for example ``"cachegen-2"`` or ``"raw"``."""
    nbytes: int
    """Encoded size of this chunk at this level, all side information included."""
    decode_s: float
    """GPU time to decode this chunk at this level."""
    quality_loss: float
    """Quality loss of this level (lower is better; 0 for lossless). The profile says which metric."""


@dataclass(frozen=True, slots=True)
class ChunkMenu:
    """Everything a policy may do with one chunk."""

    index: int
    start_token: int
    tokens: int
    levels: tuple[LevelOption, ...]
    """Loading options in the profile's order (that of `kvcast.codec.levels()`). That order is *not* monotone
    in size or quality: a policy that needs the best quality, the smallest size, or drops options that another
    beats on everything uses `by_quality`, `smallest` or `undominated_levels`."""
    recompute_s: float
    """Time to recompute this chunk from text, given the chunks before it are ready (grows with position)."""

    def option(self, level: str) -> LevelOption:
        """The menu row of `level`; KeyError if this chunk has no such level."""
        for opt in self.levels:
            if opt.level == level:
                return opt
        raise KeyError(f"chunk {self.index} has no level {level!r}; it has {[o.level for o in self.levels]}")


@dataclass(frozen=True, slots=True)
class Session:
    """What a policy learns when a session starts (`Policy.reset`)."""

    menus: tuple[ChunkMenu, ...]
    slo_s: float
    """Target time to first token, seconds from the session start."""
    rtt_s: float = 0.0
    """Round-trip time per request, as configured for the link (a policy may also learn it from samples)."""
    prior_throughput_bps: float | None = None
    """Historical throughput estimate (bits/s) for the first decision, if the deployment has one."""
    future_bandwidth_bps: Callable[[float], float] | None = None
    """Oracle only: bandwidth (bits/s) of the link at session time t. ``None`` unless the policy sets
    ``needs_future = True`` and the link can tell the future (the simulator can, a real network cannot)."""
    future_transfer_end_s: Callable[[float, int], float] | None = None
    """Oracle only: time at which a transfer of ``nbytes`` started alone at time ``t`` completes."""
    lossy_prefix_ratio: float = DEFAULT_LOSSY_PREFIX_RATIO
    """How a text chunk is scored (`chunk_quality_losses`): its KV is recomputed exactly, but over the KV of the
    chunks before it, so its quality loss is this ratio times their token-weighted mean loss. From the codec
    profile (``lossy_prefix_ratio``) where it has one."""


@dataclass(frozen=True, slots=True)
class ThroughputSample:
    """One completed transfer, as measured by the engine."""

    chunk: int
    nbytes: int
    start_s: float
    end_s: float

    @property
    def throughput_bps(self) -> float:
        """Goodput of this transfer in bits/s (RTT included in the duration, as a client measures it)."""
        return self.nbytes * 8.0 / max(self.end_s - self.start_s, 1e-12)

    def payload_bps(self, rtt_s: float) -> float:
        """Throughput of the payload alone: the duration less the request's round trip `rtt_s` (bits/s). A
        model that charges the RTT once per request divides bytes by this one, not by `throughput_bps`."""
        duration = self.end_s - self.start_s
        return self.nbytes * 8.0 / max(duration - rtt_s, 1e-3 * duration, 1e-12)


@dataclass(frozen=True, slots=True)
class Observation:
    """The engine's state when it asks for a decision. Times are seconds since the session start."""

    now_s: float
    session: Session
    pending: tuple[int, ...]
    """Undecided chunks, ascending."""
    actions: tuple[str | None, ...]
    """Per chunk: the action already decided (a level name or `TEXT`), or ``None`` if undecided."""
    ready: tuple[bool, ...]
    """Per chunk: is its KV on the GPU already?"""
    link_idle: bool
    """True when the link has nothing to transfer (the engine would start a transfer now)."""
    compute_idle: bool
    """True when the compute unit has nothing queued or running."""
    link_busy_until_s: float
    """Engine's estimate of when queued transfers end (``now_s`` when idle): one RTT per request plus the bytes
    at the last transfer's payload throughput (`ThroughputSample.payload_bps`; the session's prior before the
    first transfer)."""
    decoder_free_at_s: float
    """When the decoder finishes the work queued on it (known exactly: decode times are on the menu)."""
    compute_free_at_s: float
    """When the compute unit finishes the text chunks queued on it, if their prefixes are ready in time."""
    samples: tuple[ThroughputSample, ...] = field(default=())
    """Completed transfers of this session, oldest first."""

    @property
    def menus(self) -> tuple[ChunkMenu, ...]:
        return self.session.menus

    @property
    def slo_s(self) -> float:
        return self.session.slo_s

    @property
    def remaining_s(self) -> float:
        """Time left before the SLO (negative once it is missed)."""
        return self.session.slo_s - self.now_s


@dataclass(frozen=True, slots=True)
class Decision:
    """Assign one undecided chunk an action: a codec level (load it) or `TEXT` (recompute it)."""

    chunk: int
    action: str
    predicted_bps: float | None = None
    """Optional: the throughput (bits/s) the policy expects for this chunk's transfer; the engine records it
    next to the measured one."""


class Policy(abc.ABC):
    """Base class of every controller. Subclass it, implement `decide`, and register a name.

    Life cycle, one object per session (like Gymnasium's ``reset``/``step``): the engine calls
    ``reset(session)`` once, then ``decide(obs)`` at every decision point until all chunks are decided.
    """

    name: ClassVar[str] = ""
    needs_future: ClassVar[bool] = False
    """True for oracles: the simulator then fills `Session.future_*`; real links refuse such policies."""
    max_inflight: int = 1
    """Transfers the policy lets the engine keep in flight at once. 1 (the default): one request at a time, as
    CacheGen streams; more: several requests share the link (Cake's batched retrieval), which saves round trips.
    `Observation.link_idle` is then True while fewer are in flight and none is queued. A policy may set it per
    instance (in ``__init__``); the dry run executes one transfer at a time and refuses more."""

    def reset(self, session: Session) -> None:
        """Start a new session. The default keeps the session as ``self.session``."""
        self.session = session

    @abc.abstractmethod
    def decide(self, obs: Observation) -> Decision | None:
        """Return a decision for one pending chunk, or ``None`` to wait for the next event."""


class PolicyError(RuntimeError):
    """A policy answered something an executor cannot execute; the message names the policy, the time and
    the bug. The streaming engine and the dry run raise it for the same bugs, with the same messages."""


class PolicyStalled(PolicyError):
    """The session cannot finish: the policy returned ``None`` with nothing in flight and no chunk about to
    become ready (it would wait forever), or a transfer never ends (zero bandwidth, dry run only)."""

    @classmethod
    def waiting(cls, label: str, now_s: float, pending: Sequence[int]) -> PolicyStalled:
        """The error for a policy that returned ``None`` at `now_s` with nothing in flight."""
        return cls(f"policy {label!r} returned None at t={now_s:.6g} s with nothing in flight (pending "
                   f"chunks {_head(pending)}); it would wait forever")


def validate_decision(obs: Observation, decision: object, label: str | None = None) -> LevelOption | None:
    """Check a policy's answer `decision` to `obs`, as both executors do on every answer that is not None.

    Returns the menu row of the chosen level (``None`` for `TEXT`). Raises `PolicyError` when `decision` is
    not a `Decision`, its chunk is not pending (already decided, or no such chunk), or its level is not on
    the chunk's menu. `label` names the policy in the message.
    """
    now = obs.now_s
    if not isinstance(decision, Decision):
        raise PolicyError(f"policy {label!r} returned {decision!r} at t={now:.6g} s; "
                          f"expected a Decision or None")
    chunk, action = decision.chunk, decision.action
    if chunk not in obs.pending:
        raise PolicyError(f"policy {label!r} decided chunk {chunk!r} at t={now:.6g} s, which is not "
                          f"pending (pending: {_head(obs.pending)})")
    if action == TEXT:
        return None
    menu = obs.session.menus[chunk]
    for option in menu.levels:
        if option.level == action:
            return option
    raise PolicyError(f"policy {label!r} chose level {action!r} for chunk {chunk} at t={now:.6g} s; "
                      f"the menu has {[o.level for o in menu.levels]} and {TEXT!r}")


def chunk_quality_losses(menus: Sequence[ChunkMenu], actions: Sequence[str | None],
                         lossy_prefix_ratio: float = DEFAULT_LOSSY_PREFIX_RATIO) -> list[float]:
    """Per chunk, the quality loss of its action (0 for an undecided chunk).

    A loaded chunk has its level's loss. A text chunk's KV is recomputed exactly but attends to the KV of the
    chunks before it, so it inherits part of their error: its loss is ``lossy_prefix_ratio`` times the
    token-weighted mean loss of chunks ``0..i-1`` (text chunks among them counted with their own such loss; 0
    for a text chunk with a lossless or text-only prefix, and for chunk 0).

    >>> opts = (LevelOption("q", 1, 0.0, 0.1),)
    >>> menus = tuple(ChunkMenu(i, 100 * i, 100, opts, 0.1) for i in range(3))
    >>> chunk_quality_losses(menus, ["q", TEXT, TEXT], 0.5)
    [0.1, 0.05, 0.0375]
    >>> chunk_quality_losses(menus, [TEXT, TEXT, "q"], 0.5)
    [0.0, 0.0, 0.1]
    """
    losses = []
    prefix_loss = prefix_tokens = 0.0
    for menu, action in zip(menus, actions):
        if action is None:
            loss = 0.0
        elif action == TEXT:
            loss = lossy_prefix_ratio * prefix_loss / prefix_tokens if prefix_tokens and prefix_loss else 0.0
        else:
            loss = menu.option(action).quality_loss
        losses.append(loss)
        prefix_loss += loss * menu.tokens
        prefix_tokens += menu.tokens
    return losses


def _head(items: Sequence[int], k: int = 8) -> str:
    """The first `k` of `items` as a list, ``...`` after them if there are more."""
    return str(list(items[:k]))[:-1] + (", ...]" if len(items) > k else "]")


def level_names(menus: Sequence[ChunkMenu]) -> tuple[str, ...]:
    """Level names of the first chunk's menu, in menu order (not necessarily best quality first)."""
    return tuple(o.level for o in menus[0].levels) if menus else ()


def by_quality(menus: Sequence[ChunkMenu], names: Sequence[str] | None = None) -> tuple[str, ...]:
    """`names` (default: every level of the first chunk's menu) ordered by quality loss, best first; levels of
    equal loss by size, smallest first, then in menu order."""
    if not menus:
        return ()
    menu = menus[0]
    names = level_names(menus) if names is None else tuple(names)
    pos = {name: i for i, name in enumerate(names)}
    return tuple(sorted(names, key=lambda n: (menu.option(n).quality_loss, menu.option(n).nbytes, pos[n])))


def smallest(menus: Sequence[ChunkMenu], chunk: int = 0, names: Sequence[str] | None = None) -> str:
    """The level (of `names`, default all) with the fewest bytes on chunk `chunk` (ties: lowest loss, then
    menu order)."""
    menu = menus[chunk]
    names = level_names(menus) if names is None else tuple(names)
    pos = {name: i for i, name in enumerate(names)}
    return min(names, key=lambda n: (menu.option(n).nbytes, menu.option(n).quality_loss, pos[n]))


_UNDOMINATED_CACHE: dict[int, tuple[Sequence[ChunkMenu], tuple[str, ...]]] = {}


def undominated_levels(menus: Sequence[ChunkMenu]) -> tuple[str, ...]:
    """The levels of the first chunk's menu that no other level dominates, in menu order.

    Level ``b`` is dominated when some level ``a`` is, on *every* chunk, present wherever ``b`` is and at
    least as good in size, decode time and quality loss (``a`` earlier in menu order when they are equal on
    every chunk). Every step of the execution model is monotone in those three, so a plan that uses ``b``
    is never strictly better than the same plan with ``a``: planners may drop ``b`` and stay exact. Cached
    per menus object (a session's menus are one tuple)."""
    cached = _UNDOMINATED_CACHE.get(id(menus))
    if cached is not None and cached[0] is menus:
        return cached[1]
    names = level_names(menus)
    rows = []
    for menu in menus:
        by_name = {o.level: o for o in menu.levels}
        rows.append([by_name.get(n) for n in names])

    def dominates(a: int, b: int) -> bool:
        strict = False
        for row in rows:
            oa, ob = row[a], row[b]
            if ob is None:
                continue
            if oa is None or oa.nbytes > ob.nbytes or oa.decode_s > ob.decode_s or \
                    oa.quality_loss > ob.quality_loss:
                return False
            if oa.nbytes < ob.nbytes or oa.decode_s < ob.decode_s or oa.quality_loss < ob.quality_loss:
                strict = True
        return strict or a < b

    keep = tuple(n for b, n in enumerate(names)
                 if not any(dominates(a, b) for a in range(len(names)) if a != b))
    if len(_UNDOMINATED_CACHE) > 64:
        _UNDOMINATED_CACHE.clear()
    _UNDOMINATED_CACHE[id(menus)] = (menus, keep)
    return keep
