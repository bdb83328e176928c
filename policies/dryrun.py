"""Run a policy against the execution model of `kvcast.policies.base`, without SimPy, asyncio or a network.

`dry_run(policy, session, transfer)` is a minimal discrete-event executor that follows the streaming engine
(`kvcast.streamer.engine.StreamingEngine`) step for step: one transfer at a time on the link, in decision
order; a FIFO decoder; a compute unit that runs the queued text chunk with the *lowest index* first,
scheduled once every chunk before it has a known ready time and started when they are all ready. The
policy is asked at the same points as in the engine (a transfer or a recompute ending, and, after a ``None``
answer with nothing in flight, the next chunk becoming ready) and sees the same `Observation` estimates.
Transfers take ``transfer.transfer_end_s(start, nbytes)``, a `kvcast.policies.planning.TransferModel` (a
constant throughput, or any function of time such as a trace's), in place of the engine's link.

A policy author can unit test a controller with it in microseconds; kvcast's tests do, and check it against
the engine. The engine in `streamer/` is the real executor (SimPy or real links, per-chunk logs, sweeps).
A policy bug raises the same `kvcast.policies.base.PolicyError` here as in the engine, with the same message
(`kvcast.policies.base.validate_decision`; `PolicyStalled` for a policy that would wait forever).

Four chunks recomputed from text, 50 ms each, one after the other:

>>> from kvcast.policies.base import ChunkMenu, LevelOption, Session
>>> from kvcast.policies.planning import ConstantThroughput
>>> from kvcast.policies.text import TextPolicy
>>> menus = tuple(ChunkMenu(i, 1024 * i, 1024, (LevelOption("raw", 4_000_000, 0.001, 0.0),), 0.05)
...               for i in range(4))
>>> result = dry_run(TextPolicy(), Session(menus, slo_s=0.5), ConstantThroughput(1e9))
>>> result.actions, round(result.ttft_s, 9), result.slo_met
(('text', 'text', 'text', 'text'), 0.2, True)
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

from kvcast.policies.base import (
    TEXT,
    Observation,
    Policy,
    PolicyError,
    PolicyStalled,
    Session,
    ThroughputSample,
    validate_decision,
)
from kvcast.policies.planning import TransferModel, session_quality_loss

__all__ = ["DryRunResult", "PolicyError", "PolicyStalled", "dry_run"]

_TRANSFER, _RECOMPUTE, _WAKE = 0, 1, 2  # event kinds


@dataclass(frozen=True, slots=True)
class DryRunResult:
    """What happened in one dry-run session."""

    actions: tuple[str, ...]
    """Per chunk: the action taken."""
    decision_order: tuple[int, ...]
    """Chunks in the order they were decided."""
    decision_times_s: tuple[float, ...]
    """When each chunk (by index) was decided."""
    ready_s: tuple[float, ...]
    """Per chunk: when its KV was ready."""
    ttft_s: float
    slo_met: bool
    quality_loss: float
    """Token-weighted mean quality loss (`kvcast.policies.planning.session_quality_loss`)."""
    decisions: int
    """Calls of ``decide`` that returned a decision."""
    samples: tuple[ThroughputSample, ...]


def dry_run(policy: Policy, session: Session, transfer: TransferModel, max_events: int = 1_000_000, *,
            label: str | None = None) -> DryRunResult:
    """Play one session: ``policy.reset(session)``, then ``decide`` at every decision point until done.

    Raises `PolicyError` for an answer that is not allowed (`kvcast.policies.base.validate_decision`) or a
    ``needs_future`` policy on a session without the link's future, and its subclass `PolicyStalled` if the
    session cannot finish. `label` names the policy in messages (default: ``policy.name`` or its class
    name, as in the engine).
    """
    return _DryRun(policy, session, transfer, label).run(max_events)


class _DryRun:
    """One session's state; the methods mirror `StreamingEngine`'s state machine."""

    def __init__(self, policy: Policy, session: Session, transfer: TransferModel, label: str | None = None
                 ) -> None:
        n = len(session.menus)
        self.policy, self.session, self.transfer = policy, session, transfer
        self.label = label or policy.name or type(policy).__name__
        self.menus = session.menus
        self.actions: list[str | None] = [None] * n
        self.pending: list[int] = list(range(n))
        self.decided_at = [math.nan] * n
        self.ready_at: list[float | None] = [None] * n  # known once the chunk's end is scheduled
        self.order: list[int] = []
        self.samples: list[ThroughputSample] = []
        self.decisions = 0
        self.now = 0.0
        self.events: list[tuple[float, int, int, int]] = []  # (time, sequence, kind, chunk)
        self.sequence = 0
        self.wake_times: set[float] = set()
        self.link_queue: deque[int] = deque()
        self.in_flight: int | None = None
        self.transfer_start = 0.0
        self.decoder_free = 0.0
        self.compute_queue: list[int] = []  # heap of chunk indices: lowest first
        self.compute_running: int | None = None
        self.compute_free = 0.0
        self.known_prefix = 0  # chunks 0..known_prefix-1 all have known ready times
        self.known_prefix_ready = 0.0  # the latest of those

    def run(self, max_events: int) -> DryRunResult:
        session = self.session
        if self.policy.needs_future and session.future_transfer_end_s is None and \
                session.future_bandwidth_bps is None:
            raise PolicyError(f"policy {self.label!r} needs the future of the link, and the session has none "
                              "(Session.future_transfer_end_s)")
        if getattr(self.policy, "max_inflight", 1) != 1:
            raise PolicyError(f"policy {self.label!r} keeps {self.policy.max_inflight} transfers in flight; the dry "
                              "run executes one at a time (use the streaming engine)")
        self.policy.reset(session)
        self.step()
        for _ in range(max_events):
            if not self.events:
                break
            t, _, kind, chunk = heapq.heappop(self.events)
            if math.isinf(t):
                raise PolicyStalled(f"policy {self.label!r}: chunk {chunk}'s transfer never ends "
                                    "(zero bandwidth)")
            self.now = t
            if kind == _TRANSFER:
                self.transfer_done(chunk)
            elif kind == _RECOMPUTE:
                if self.compute_running == chunk:
                    self.compute_running = None
            else:
                self.wake_times.discard(t)
            self.step()
        else:
            raise RuntimeError(f"dry run did not finish within {max_events} events")
        if self.pending or None in self.ready_at:
            raise PolicyStalled(f"policy {self.label!r}: nothing left to run with chunks undecided "
                                f"or not ready")
        ready = tuple(math.nan if t is None else t for t in self.ready_at)
        ttft = max(ready, default=0.0)
        return DryRunResult(actions=tuple(self.actions), decision_order=tuple(self.order),
                            decision_times_s=tuple(self.decided_at), ready_s=ready, ttft_s=ttft,
                            slo_met=ttft <= self.session.slo_s,
                            quality_loss=session_quality_loss(self.menus, self.actions,
                                                                 session.lossy_prefix_ratio),
                            decisions=self.decisions, samples=tuple(self.samples))

    def schedule(self, t: float, kind: int, chunk: int) -> None:
        heapq.heappush(self.events, (t, self.sequence, kind, chunk))
        self.sequence += 1

    def set_ready(self, chunk: int, t: float) -> None:
        self.ready_at[chunk] = t
        n = len(self.ready_at)
        while self.known_prefix < n and self.ready_at[self.known_prefix] is not None:
            self.known_prefix_ready = max(self.known_prefix_ready, self.ready_at[self.known_prefix])
            self.known_prefix += 1

    def transfer_done(self, chunk: int) -> None:
        self.in_flight = None
        option = self.menus[chunk].option(self.actions[chunk])
        self.samples.append(ThroughputSample(chunk, option.nbytes, self.transfer_start, self.now))
        self.decoder_free = max(self.now, self.decoder_free) + option.decode_s
        self.set_ready(chunk, self.decoder_free)

    def link_idle(self) -> bool:
        return self.in_flight is None and not self.link_queue

    def compute_idle(self) -> bool:
        return self.compute_running is None and not self.compute_queue

    def step(self) -> None:
        """Start what can start, then ask the policy while the link or the compute unit is idle."""
        self.start_compute()
        self.start_transfer()
        waiting = False
        while self.pending and (self.link_idle() or self.compute_idle()):
            obs = self.observe()
            decision = self.policy.decide(obs)
            if decision is None:
                waiting = True
                break
            validate_decision(obs, decision, self.label)
            self.apply(decision.chunk, decision.action)
        if waiting and self.in_flight is None and self.compute_running is None:
            later = [t for t in self.ready_at if t is not None and t > self.now]
            if not later:
                raise PolicyStalled.waiting(self.label, self.now, self.pending)
            when = min(later)
            if when not in self.wake_times:
                self.wake_times.add(when)
                self.schedule(when, _WAKE, -1)

    def apply(self, chunk: int, action: str) -> None:
        self.decisions += 1
        self.actions[chunk] = action
        self.pending.remove(chunk)
        self.decided_at[chunk] = self.now
        self.order.append(chunk)
        if action == TEXT:
            heapq.heappush(self.compute_queue, chunk)
            self.start_compute()
        else:
            self.link_queue.append(chunk)
            self.start_transfer()

    def start_transfer(self) -> None:
        if self.in_flight is not None or not self.link_queue:
            return
        chunk = self.link_queue.popleft()
        self.in_flight, self.transfer_start = chunk, self.now
        nbytes = self.menus[chunk].option(self.actions[chunk]).nbytes
        self.schedule(self.transfer.transfer_end_s(self.now, nbytes), _TRANSFER, chunk)

    def start_compute(self) -> None:
        """Schedule the lowest queued text chunk once every chunk before it has a known ready time."""
        if self.compute_running is not None or not self.compute_queue:
            return
        chunk = self.compute_queue[0]
        if self.known_prefix < chunk:
            return
        heapq.heappop(self.compute_queue)
        start = max(self.now, self.compute_free, self.known_prefix_ready if chunk else 0.0)
        self.compute_free = start + self.menus[chunk].recompute_s
        self.compute_running = chunk
        self.set_ready(chunk, self.compute_free)
        self.schedule(self.compute_free, _RECOMPUTE, chunk)

    def observe(self) -> Observation:
        """The engine's observation, estimates included (`StreamingEngine._observe`)."""
        now, menus = self.now, self.menus
        link_until = now
        if not self.link_idle():
            rtt = self.session.rtt_s
            # payload throughput of the last transfer (RTT out: `duration` adds it once per request)
            bps = self.samples[-1].payload_bps(rtt) if self.samples else self.session.prior_throughput_bps

            def duration(chunk: int) -> float:
                return rtt + (menus[chunk].option(self.actions[chunk]).nbytes * 8.0 / bps if bps else 0.0)

            if self.in_flight is not None:
                link_until = max(now, self.transfer_start + duration(self.in_flight))
            for chunk in self.link_queue:
                link_until += duration(chunk)
        compute_until = max(now, self.compute_free) if self.compute_running is not None else now
        compute_until += sum(menus[c].recompute_s for c in self.compute_queue)
        ready = tuple(t is not None and t <= now for t in self.ready_at)
        return Observation(now_s=now, session=self.session, pending=tuple(self.pending),
                           actions=tuple(self.actions), ready=ready, link_idle=self.link_idle(),
                           compute_idle=self.compute_idle(), link_busy_until_s=link_until,
                           decoder_free_at_s=max(now, self.decoder_free), compute_free_at_s=compute_until,
                           samples=tuple(self.samples))
