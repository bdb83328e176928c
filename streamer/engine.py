"""The streaming engine: one session of loading a context's KV cache, chunk by chunk, as a policy decides.

It implements the execution model documented in `kvcast.policies.base` (link, decoder and compute unit working
concurrently; the policy asked whenever the link or the compute unit runs dry). It is plain asyncio: it
reads ``loop.time()``, schedules its own completions with ``loop.call_at`` and waits on the link's transfer
futures. On a `kvcast.netsim.VirtualTimeLoop` over a `kvcast.netsim.SimPyLink` it runs in virtual time; on a
normal event loop over a real link it runs in real time. Nothing else changes.

Example (virtual time)::

    loop = netsim.VirtualTimeLoop()
    link = netsim.SimPyLink(loop.env, trace, rtt_s=0.01)
    engine = StreamingEngine(policy, menus, link, slo_s=1.0)
    result = loop.run_until_complete(engine.run())
    result.ttft_s, result.slo_met, result.quality_loss

Internally the engine is an event-driven state machine (like an asyncio `Protocol`): a transfer's future or
a recompute's timer fires, the engine updates its state, starts what can start and asks the policy. Decode
and recompute durations are known from the menu, so their end times are computed, not waited for; the
session ends with a single timer at the moment the last chunk is ready. This keeps a simulated chunk to about
one event.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

from kvcast.netsim.link import ChunkRequest, Link, LinkFailure, TransferOutcome
from kvcast.policies.base import (
    DEFAULT_LOSSY_PREFIX_RATIO,
    TEXT,
    ChunkMenu,
    Decision,
    Observation,
    Policy,
    PolicyError,
    PolicyStalled,
    Session,
    ThroughputSample,
    chunk_quality_losses,
    validate_decision,
)
from kvcast.streamer.resources import Compute, Decoder, SimulatedCompute, SimulatedDecoder

__all__ = ["PAUSE", "ChunkRecord", "PolicyError", "SessionResult", "StreamingEngine", "stream_context"]
# PolicyError is kvcast.policies.base's, re-exported: the dry run raises the same class for the same bugs.


class _Pause:
    __slots__ = ()

    def __repr__(self) -> str:
        return "PAUSE"


PAUSE = _Pause()
"""For a driver that steps a session from outside, one decision at a time (`kvcast.streamer.gym`): a policy
whose ``decide`` returns `PAUSE` holds the engine at that decision point. The engine asks nothing more and
returns to the event loop, which the driver stops at once (``loop.stop()`` in ``decide``: a
`kvcast.netsim.VirtualTimeLoop` stops after the current callback); the driver later calls
`StreamingEngine.resume` with the answer, which the engine takes as if ``decide`` had returned it then, and
runs the loop on. A session driven so makes exactly the decisions, at exactly the times, of a policy that
answers the same thing directly."""


@dataclass(slots=True)
class ChunkRecord:
    """What happened to one chunk. Times are seconds since the session start; None where not applicable."""

    index: int
    start_token: int
    tokens: int
    action: str | None = None
    """The chosen codec level, or ``"text"``."""
    nbytes: int = 0
    """Payload bytes transferred (0 for text)."""
    quality_loss: float = 0.0
    decided_s: float | None = None
    transfer_start_s: float | None = None
    transfer_end_s: float | None = None
    decode_start_s: float | None = None
    decode_end_s: float | None = None
    recompute_start_s: float | None = None
    recompute_end_s: float | None = None
    ready_s: float | None = None
    measured_bps: float | None = None
    """Payload goodput of the transfer, RTT included."""
    predicted_bps: float | None = None
    """The policy's expected throughput (`Decision.predicted_bps`), if it gave one."""
    wire_bits: float | None = None
    fallback: str | None = None
    """Why a real link's transfer failed, for a chunk then recomputed from text (None otherwise)."""

    def to_dict(self) -> dict[str, Any]:
        """The record as a dict; ``fallback`` only where a chunk fell back to text."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if d["fallback"] is None:
            del d["fallback"]
        return d


@dataclass(frozen=True, slots=True)
class SessionResult:
    """Outcome of one session."""

    policy: str
    slo_s: float
    ttft_s: float
    """Time to first token: when the last chunk is ready, plus the query's prefill."""
    quality_loss: float
    """Token-weighted mean quality loss of the chosen levels; a text chunk counts `Session.lossy_prefix_ratio`
    times the mean loss of the chunks before it (0 by default: lossless)."""
    bytes_loaded: int
    """Payload bytes transferred."""
    wire_bytes: float
    """Bytes on the wire, overhead included."""
    context_tokens: int
    text_chunks: int
    decisions: int
    """Times the policy was asked (including answers of None)."""
    chunks: tuple[ChunkRecord, ...]

    @property
    def slo_met(self) -> bool:
        return self.ttft_s <= self.slo_s

    @property
    def overrun_s(self) -> float:
        """TTFT beyond the SLO (0 when met)."""
        return max(self.ttft_s - self.slo_s, 0.0)

    def summary(self) -> dict[str, Any]:
        """The per-session numbers as a JSON-ready dict (without the per-chunk records)."""
        return {"policy": self.policy, "slo_s": self.slo_s, "ttft_s": self.ttft_s, "slo_met": self.slo_met,
                "overrun_s": self.overrun_s, "quality_loss": self.quality_loss,
                "bytes_loaded": self.bytes_loaded, "wire_bytes": self.wire_bytes,
                "context_tokens": self.context_tokens, "chunks": len(self.chunks),
                "text_chunks": self.text_chunks, "decisions": self.decisions}


class StreamingEngine:
    """Runs one session: asks `policy` for decisions and drives the link, the decoder and the compute unit.

    Args:
        policy: a fresh policy object (the engine calls its ``reset`` once).
        menus: one menu per chunk, chunk ``i`` at index ``i``.
        link: the network; ``policy.needs_future`` requires ``link.oracle()``.
        slo_s: target TTFT in seconds.
        prior_throughput_bps: historical throughput estimate given to the policy (`Session`).
        query_prefill_s: policy-independent prefill of the query, added to TTFT.
        label: the policy's name in the results (default: ``policy.name`` or its class name).
        decoder: the decoder (`kvcast.streamer.resources`); default simulated, timed by the menus.
        compute: the compute unit; default simulated, timed by the menus.
        lossy_prefix_ratio: how text chunks are scored (`Session.lossy_prefix_ratio`,
            `kvcast.policies.base.chunk_quality_losses`); the codec profile's, where it has one.

    With real resources (`Decoder`/`Compute` whose ``timed_by_menu`` is False) a chunk's decode or recompute
    ends when the resource calls back, not at a time the menu predicts; the menus' times then serve only as the
    estimates the policy observes.
    """

    def __init__(self, policy: Policy, menus: Sequence[ChunkMenu], link: Link, *, slo_s: float,
                 prior_throughput_bps: float | None = None, query_prefill_s: float = 0.0,
                 label: str | None = None, decoder: Decoder | None = None,
                 compute: Compute | None = None,
                 lossy_prefix_ratio: float = DEFAULT_LOSSY_PREFIX_RATIO) -> None:
        if not menus:
            raise ValueError("a session needs at least one chunk")
        for i, menu in enumerate(menus):
            if menu.index != i:
                raise ValueError(f"menus[{i}] has index {menu.index}; menus must be in chunk order from 0")
        if not (slo_s > 0 and math.isfinite(slo_s)):
            raise ValueError(f"slo_s must be finite and > 0, got {slo_s}")
        if not (lossy_prefix_ratio >= 0 and math.isfinite(lossy_prefix_ratio)):
            raise ValueError(f"lossy_prefix_ratio must be finite and >= 0, got {lossy_prefix_ratio}")
        self.lossy_prefix_ratio = float(lossy_prefix_ratio)
        self.policy = policy
        self.menus = tuple(menus)
        self.link = link
        self.slo_s = float(slo_s)
        self.prior_throughput_bps = prior_throughput_bps
        self.query_prefill_s = float(query_prefill_s)
        self.label = label or policy.name or type(policy).__name__
        self.decoder = decoder if decoder is not None else SimulatedDecoder()
        self.compute = compute if compute is not None else SimulatedCompute()
        self._link_takes_requests = type(link).send_request is not Link.send_request
        self._real_decode = not self.decoder.timed_by_menu
        self._real_compute = not self.compute.timed_by_menu
        self._decode_queue: deque[tuple[int, bytes | None]] = deque()
        self._decoding: int | None = None
        n = len(self.menus)
        self.records = [ChunkRecord(m.index, m.start_token, m.tokens) for m in self.menus]
        self._actions: list[str | None] = [None] * n
        self._ready_at: list[float | None] = [None] * n
        self._pending: list[int] = list(range(n))
        self._resolved = 0          # chunks whose ready time is known
        self._prefix = 0            # chunks 0.._prefix-1 all have known ready times
        self._prefix_ready = 0.0    # the latest of those ready times
        self._last_ready = 0.0
        self._link_queue: deque[int] = deque()
        self._inflight: list[int] = []  # chunks in flight, in the order their transfers started
        self._max_inflight = max(1, int(getattr(policy, "max_inflight", 1)))
        self._decoder_free = 0.0
        self._compute_queue: list[int] = []   # heap of chunk indices
        self._compute_running: int | None = None
        self._compute_free = 0.0
        self._samples: tuple[ThroughputSample, ...] = ()
        self._decisions = 0
        self._wake_times: set[float] = set()
        self._decode_s = [0.0] * n
        self._started = False
        self._finish_scheduled = False
        self._decisions_applied = 0
        self._obs_cache_key = -1
        self._ready_flags = [False] * n
        self._ready_t = tuple(self._ready_flags)
        self._upcoming: list[tuple[float, int]] = []  # (ready time, chunk) not yet flagged ready
        self._paused: tuple[Observation, float] | None = None  # the decision point a PAUSE holds

    # ------------------------------------------------------------------ public
    async def run(self) -> SessionResult:
        """Run the session to the end and return its result (PolicyError if the policy misbehaves)."""
        if self._started:
            raise RuntimeError("a StreamingEngine runs one session; create a new one")
        self._started = True
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._t0 = t0 = loop.time()
        future_bw = future_end = None
        if self.policy.needs_future:
            oracle = self.link.oracle()
            if oracle is None:
                raise PolicyError(f"policy {self.label!r} needs the future of the link, and "
                                  f"{type(self.link).__name__} cannot tell it (only simulated links can)")
            future_bw = lambda t: oracle.bandwidth_bps(t0 + t)  # noqa: E731
            future_end = lambda t, nbytes: oracle.transfer_end_s(t0 + t, nbytes) - t0  # noqa: E731
        self.session = Session(menus=self.menus, slo_s=self.slo_s, rtt_s=self.link.rtt_s,
                               prior_throughput_bps=self.prior_throughput_bps,
                               future_bandwidth_bps=future_bw, future_transfer_end_s=future_end,
                               lossy_prefix_ratio=self.lossy_prefix_ratio)
        self.policy.reset(self.session)
        self._done: asyncio.Future[SessionResult] = loop.create_future()
        self._guard(self._step)
        return await self._done

    @property
    def paused(self) -> Observation | None:
        """The observation of the decision point that the policy's `PAUSE` holds (None when not paused)."""
        return None if self._paused is None else self._paused[0]

    def resume(self, decision: Decision | None) -> None:
        """Answer the decision point that the policy's `PAUSE` holds, as ``decide`` would have (see `PAUSE`);
        the engine goes on at the same session time. Call it while the event loop is stopped."""
        if self._paused is None:
            raise RuntimeError("resume() without a paused decision point (the policy did not return PAUSE)")
        obs, now = self._paused
        self._paused = None
        self._guard(self._answer, decision, obs, now)

    def _answer(self, decision: Decision | None, obs: Observation, now: float) -> None:
        if decision is None:
            self._settle(now, True)
            return
        self._apply(decision, obs, now)
        self._ask(now)

    # ------------------------------------------------------------------ event handlers
    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        """Run an event handler; any exception ends the session with that exception."""
        try:
            fn(*args)
        except BaseException as exc:
            if not self._done.done():
                self._done.set_exception(exc)
            else:
                raise

    def _now(self) -> float:
        return self._loop.time() - self._t0

    def _on_transfer_done(self, chunk: int, outcome: TransferOutcome) -> None:
        try:
            self._transfer_done(chunk, outcome)
        except BaseException as exc:
            if self._done.done():
                raise
            self._done.set_exception(exc)

    def _transfer_done(self, c: int, timing: TransferOutcome) -> None:
        if self._done.done():
            return
        if isinstance(timing, LinkFailure):
            self._fall_back_to_text(c, timing)
            return
        if isinstance(timing, BaseException):
            raise timing
        self._inflight.remove(c)
        t0 = self._t0
        rec = self.records[c]
        start, end = timing.start_s - t0, timing.end_s - t0
        rec.transfer_end_s = end
        rec.wire_bits = timing.wire_bits
        sample = ThroughputSample(c, timing.nbytes, start, end)
        rec.measured_bps = sample.throughput_bps
        self._samples = (*self._samples, sample)
        if self._real_decode:
            self._decode_queue.append((c, timing.payload))
            self._start_decode(self._now())
            self._step()
            return
        decode_start = end if end > self._decoder_free else self._decoder_free
        decode_end = decode_start + self._decode_s[c]
        rec.decode_start_s, rec.decode_end_s = decode_start, decode_end
        self._decoder_free = decode_end
        self._set_ready(c, decode_end)
        self._step()

    def _fall_back_to_text(self, c: int, failure: LinkFailure) -> None:
        """The link gave up on chunk `c`'s transfer: recompute it from text (lossless) instead."""
        self._inflight.remove(c)
        rec = self.records[c]
        rec.fallback = str(failure)
        rec.action, rec.quality_loss, rec.nbytes = TEXT, 0.0, 0
        rec.transfer_end_s = self._now()
        self._actions[c] = TEXT
        self._decisions_applied += 1  # the observation's actions changed
        heapq.heappush(self._compute_queue, c)
        self._step()

    def _on_recompute_done(self, chunk: int) -> None:
        self._guard(self._recompute_done, chunk)

    # real resources: they call back when their work is done; the chunk is ready then
    def _start_decode(self, now: float) -> None:
        if self._decoding is not None or not self._decode_queue:
            return
        chunk, payload = self._decode_queue.popleft()
        rec = self.records[chunk]
        rec.decode_start_s = now
        self._decoding = chunk
        self._decoder_free = now + self._decode_s[chunk]  # the menu's estimate, until the decoder answers
        self.decoder.start(chunk, rec.action, payload,
                           lambda exc: self._guard(self._real_decode_done, chunk, exc))

    def _real_decode_done(self, chunk: int, exc: BaseException | None) -> None:
        if self._done.done():
            return
        if exc is not None:
            raise exc
        now = self._now()
        self._decoding = None
        self.records[chunk].decode_end_s = now
        self._decoder_free = now
        self._set_ready(chunk, now)
        self._start_decode(now)
        self._step()

    def _real_compute_done(self, chunk: int, exc: BaseException | None) -> None:
        if self._done.done():
            return
        if exc is not None:
            raise exc
        now = self._now()
        self._compute_running = None
        self.records[chunk].recompute_end_s = now
        self._compute_free = now
        self._set_ready(chunk, now)
        self._step()

    def _recompute_done(self, chunk: int) -> None:
        if self._done.done():
            return
        if self._compute_running == chunk:
            self._compute_running = None
        self._step()

    def _on_wake(self, when: float) -> None:
        self._wake_times.discard(when)
        self._guard(self._step)

    def _finish(self) -> None:
        if self._done.done():
            return
        if self.lossy_prefix_ratio and TEXT in self._actions:  # text chunks over a lossy prefix
            losses = chunk_quality_losses(self.menus, self._actions, self.lossy_prefix_ratio)
            for rec, loss in zip(self.records, losses):
                rec.quality_loss = loss
        loss = sum(r.quality_loss * r.tokens for r in self.records)
        tokens = sum(r.tokens for r in self.records)
        wire_bits = sum(r.wire_bits for r in self.records if r.wire_bits is not None)
        result = SessionResult(
            policy=self.label, slo_s=self.slo_s, ttft_s=self._last_ready + self.query_prefill_s,
            quality_loss=loss / tokens, bytes_loaded=sum(r.nbytes for r in self.records),
            wire_bytes=wire_bits / 8.0, context_tokens=tokens,
            text_chunks=sum(1 for r in self.records if r.action == TEXT), decisions=self._decisions,
            chunks=tuple(self.records))
        self._done.set_result(result)

    # ------------------------------------------------------------------ the state machine
    def _set_ready(self, chunk: int, t: float) -> None:
        self._ready_at[chunk] = t
        heapq.heappush(self._upcoming, (t, chunk))
        self.records[chunk].ready_s = t
        self._resolved += 1
        if t > self._last_ready:
            self._last_ready = t
        ready_at = self._ready_at
        n = len(ready_at)
        while self._prefix < n and ready_at[self._prefix] is not None:
            if ready_at[self._prefix] > self._prefix_ready:
                self._prefix_ready = ready_at[self._prefix]
            self._prefix += 1

    def _link_idle(self) -> bool:
        return len(self._inflight) < self._max_inflight and not self._link_queue

    def _compute_idle(self) -> bool:
        return self._compute_running is None and not self._compute_queue

    def _step(self) -> None:
        now = self._now()
        self._start_compute(now)
        self._start_transfer(now)
        self._ask(now)

    def _ask(self, now: float) -> None:
        """Ask the policy while some chunk is undecided and the link or the compute unit is idle."""
        while self._pending and (self._link_idle() or self._compute_idle()):
            obs = self._observe(now)
            self._decisions += 1
            decision = self.policy.decide(obs)
            if decision is None:
                self._settle(now, True)
                return
            if decision is PAUSE:
                self._paused = (obs, now)
                return
            self._apply(decision, obs, now)
        self._settle(now, False)

    def _settle(self, now: float, waiting: bool) -> None:
        """After the policy's answers: end the session when all is decided and known, or make sure that a
        policy that waits (`waiting`) is asked again."""
        if not self._pending and self._resolved == len(self.menus):
            if not self._finish_scheduled:
                self._finish_scheduled = True
                self._loop.call_at(self._t0 + self._last_ready + self.query_prefill_s, self._finish)
            return
        if waiting and not self._inflight and self._compute_running is None and self._decoding is None:
            later = [t for t in self._ready_at if t is not None and t > now]
            if not later:
                raise PolicyStalled.waiting(self.label, now, self._pending)
            self._schedule_wake(min(later))

    def _schedule_wake(self, t: float) -> None:
        """Run `_step` again at session time `t` (once per distinct time)."""
        when = self._t0 + t
        if when not in self._wake_times:
            self._wake_times.add(when)
            self._loop.call_at(when, self._on_wake, when)

    def _apply(self, decision: Decision, obs: Observation, now: float) -> None:
        option = validate_decision(obs, decision, self.label)  # PolicyError, as in the dry run
        chunk, action = decision.chunk, decision.action
        quality_loss = 0.0 if option is None else option.quality_loss
        rec = self.records[chunk]
        rec.action = action
        rec.decided_s = now
        rec.quality_loss = quality_loss
        rec.predicted_bps = decision.predicted_bps
        self._actions[chunk] = action
        self._pending.remove(chunk)
        self._decisions_applied += 1
        if action == TEXT:
            heapq.heappush(self._compute_queue, chunk)
            self._start_compute(now)
        else:
            rec.nbytes = option.nbytes
            self._decode_s[chunk] = option.decode_s
            self._link_queue.append(chunk)
            self._start_transfer(now)

    def _start_transfer(self, now: float) -> None:
        while len(self._inflight) < self._max_inflight and self._link_queue:
            chunk = self._link_queue.popleft()
            rec = self.records[chunk]
            rec.transfer_start_s = now
            self._inflight.append(chunk)
            done = partial(self._on_transfer_done, chunk)
            if self._link_takes_requests:
                self.link.send_request(ChunkRequest(chunk, rec.action, rec.nbytes), done)
            else:  # a simulated link needs only the size
                self.link.send(rec.nbytes, done)

    def _start_compute(self, now: float) -> None:
        if self._compute_running is not None or not self._compute_queue:
            return
        chunk = self._compute_queue[0]
        if self._prefix < chunk:
            return  # some chunk before it has no known ready time yet
        start = max(now, self._compute_free, self._prefix_ready if chunk else 0.0)
        if self._real_compute:
            if start > now:  # the prefix is ready later (simulated decoding): start then
                self._schedule_wake(start)
                return
            heapq.heappop(self._compute_queue)
            rec = self.records[chunk]
            rec.recompute_start_s = now
            self._compute_running = chunk
            self._compute_free = now + self.menus[chunk].recompute_s  # the menu's estimate
            self.compute.start(chunk, lambda exc: self._guard(self._real_compute_done, chunk, exc))
            return
        heapq.heappop(self._compute_queue)
        end = start + self.menus[chunk].recompute_s
        rec = self.records[chunk]
        rec.recompute_start_s, rec.recompute_end_s = start, end
        self._compute_running = chunk
        self._compute_free = end
        self._set_ready(chunk, end)
        self._loop.call_at(self._t0 + end, self._on_recompute_done, chunk)

    def _observe(self, now: float) -> Observation:
        link_until = now
        if self._inflight or self._link_queue:
            samples = self._samples
            rtt = self.link.rtt_s
            # the last transfer's payload throughput: its duration less the RTT, which is charged per request
            # below (the sample's own throughput includes the RTT; using it would count the RTT twice)
            est = samples[-1].payload_bps(rtt) if samples else self.prior_throughput_bps
            queued = list(self._link_queue)
            if self._inflight:  # transfers in flight share the link: all done after their bytes in sum
                first = self.records[self._inflight[0]]
                nbytes = first.nbytes if len(self._inflight) == 1 else sum(
                    self.records[c].nbytes for c in self._inflight)
                t_est = first.transfer_start_s + rtt + (nbytes * 8.0 / est if est else 0.0)
                link_until = t_est if t_est > now else now
            for c in queued:
                link_until += rtt + (self.records[c].nbytes * 8.0 / est if est else 0.0)
        compute_until = self._compute_free if self._compute_running is not None else now
        if compute_until < now:
            compute_until = now
        for c in self._compute_queue:
            compute_until += self.menus[c].recompute_s
        # the tuples change only on a decision (pending, actions) or as time passes (ready): reuse them
        if self._obs_cache_key != self._decisions_applied:
            self._pending_t = tuple(self._pending)
            self._actions_t = tuple(self._actions)
            self._obs_cache_key = self._decisions_applied
        upcoming = self._upcoming
        if upcoming and upcoming[0][0] <= now:
            flags = self._ready_flags
            while upcoming and upcoming[0][0] <= now:
                flags[heapq.heappop(upcoming)[1]] = True
            self._ready_t = tuple(flags)
        return Observation(now, self.session, self._pending_t, self._actions_t, self._ready_t,
                           self._link_idle(), self._compute_idle(), link_until,
                           self._decoder_free if self._decoder_free > now else now, compute_until,
                           self._samples)


async def stream_context(policy: Policy, menus: Sequence[ChunkMenu], link: Link, *, slo_s: float,
                         **kwargs: Any) -> SessionResult:
    """Convenience: ``await stream_context(policy, menus, link, slo_s=...)`` runs one `StreamingEngine`."""
    return await StreamingEngine(policy, menus, link, slo_s=slo_s, **kwargs).run()
