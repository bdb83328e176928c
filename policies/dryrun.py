"""Run a policy against the execution model of `policies.base`, without SimPy, asyncio or a network.

`dry_run(policy, session, transfer)` is a minimal discrete-event executor of the documented model: one
transfer at a time on the link (decision order), a FIFO decoder, a FIFO compute unit whose text chunks wait
for their prefix. Transfers take `transfer.transfer_end_s(start, nbytes)`, a `policies.planning`
`TransferModel` (a constant throughput, or any function of time such as a trace's). A policy author can unit
test a controller with it in microseconds; kvcast's tests and ``python -m policies.bench_mpc`` use it. The
streaming engine in `streamer/` is the real executor (SimPy or real links, per-chunk logs, parallel sweeps).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

from policies.base import TEXT, Observation, Policy, Session, ThroughputSample, validate_decision
from policies.planning import TransferModel, session_quality_loss

__all__ = ["DryRunResult", "dry_run", "PolicyStalled"]


class PolicyStalled(RuntimeError):
    """The policy returned ``None`` while nothing was running, so the session could never finish."""


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
    """Token-weighted mean quality loss (`policies.planning.session_quality_loss`)."""
    decisions: int
    """Calls of ``decide`` that returned a decision."""
    samples: tuple[ThroughputSample, ...]


def dry_run(policy: Policy, session: Session, transfer: TransferModel, max_events: int = 1_000_000
            ) -> DryRunResult:
    """Play one session: ``policy.reset(session)``, then ``decide`` at every decision point until done."""
    menus = session.menus
    n = len(menus)
    actions: list[str | None] = [None] * n
    ready = [False] * n
    ready_at = [math.nan] * n
    decided_at = [math.nan] * n
    order: list[int] = []
    samples: list[ThroughputSample] = []
    link_queue: deque[int] = deque()
    link_busy: int | None = None  # chunk in flight
    link_start = 0.0
    dec_queue: deque[int] = deque()
    dec_busy: int | None = None
    dec_free = 0.0
    comp_queue: deque[int] = deque()
    comp_busy: int | None = None
    comp_free = 0.0
    events: list[tuple[float, int, str, int]] = []  # (time, seq, kind, chunk)
    seq = 0
    now = 0.0
    decisions = 0
    policy.reset(session)

    def push(t: float, kind: str, chunk: int) -> None:
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, chunk))
        seq += 1

    def start_work() -> None:
        nonlocal link_busy, link_start, dec_busy, dec_free, comp_busy, comp_free
        if link_busy is None and link_queue:
            link_busy = link_queue.popleft()
            link_start = now
            nbytes = menus[link_busy].option(actions[link_busy]).nbytes
            push(transfer.transfer_end_s(now, nbytes), "transfer", link_busy)
        if dec_busy is None and dec_queue:
            dec_busy = dec_queue.popleft()
            dec_free = now + menus[dec_busy].option(actions[dec_busy]).decode_s
            push(dec_free, "decode", dec_busy)
        if comp_busy is None and comp_queue:
            head = comp_queue[0]
            if all(ready[:head]):
                comp_queue.popleft()
                comp_busy = head
                comp_free = now + menus[head].recompute_s
                push(comp_free, "compute", head)

    def link_estimate() -> float:
        if link_busy is None and not link_queue:
            return now
        bps = samples[-1].throughput_bps if samples else (session.prior_throughput_bps or 0.0)
        left = sum(menus[c].option(actions[c]).nbytes for c in link_queue)
        if link_busy is not None:
            left += menus[link_busy].option(actions[link_busy]).nbytes
        return now + (left * 8.0 / bps if bps > 0 else math.inf)

    def decoder_estimate() -> float:
        t = dec_free if dec_busy is not None else now
        for c in dec_queue:
            t += menus[c].option(actions[c]).decode_s
        return t

    def compute_estimate() -> float:
        t = comp_free if comp_busy is not None else now
        for c in comp_queue:
            t += menus[c].recompute_s
        return t

    def ask() -> None:
        nonlocal decisions
        while True:
            pending = tuple(i for i in range(n) if actions[i] is None)
            link_idle = link_busy is None and not link_queue
            compute_idle = comp_busy is None and not comp_queue
            if not pending or not (link_idle or compute_idle):
                return
            obs = Observation(now_s=now, session=session, pending=pending, actions=tuple(actions),
                              ready=tuple(ready), link_idle=link_idle, compute_idle=compute_idle,
                              link_busy_until_s=link_estimate(), decoder_free_at_s=decoder_estimate(),
                              compute_free_at_s=compute_estimate(), samples=tuple(samples))
            decision = policy.decide(obs)
            if decision is None:
                return
            validate_decision(obs, decision)
            decisions += 1
            actions[decision.chunk] = decision.action
            decided_at[decision.chunk] = now
            order.append(decision.chunk)
            (comp_queue if decision.action == TEXT else link_queue).append(decision.chunk)
            start_work()

    ask()
    start_work()
    for _ in range(max_events):
        if not events:
            if all(ready):
                break
            raise PolicyStalled(f"{type(policy).__name__} returned None at t={now:.6f}s with nothing running "
                                f"(undecided: {[i for i in range(n) if actions[i] is None]})")
        t, _, kind, chunk = heapq.heappop(events)
        if math.isinf(t):
            raise PolicyStalled(f"{type(policy).__name__}: chunk {chunk}'s {kind} never ends "
                                "(zero bandwidth)")
        now = t
        if kind == "transfer":
            nbytes = menus[chunk].option(actions[chunk]).nbytes
            samples.append(ThroughputSample(chunk, nbytes, link_start, now))
            link_busy = None
            dec_queue.append(chunk)
        elif kind == "decode":
            dec_busy = None
            ready[chunk], ready_at[chunk] = True, now
        else:
            comp_busy = None
            ready[chunk], ready_at[chunk] = True, now
        # Handle every event at this instant before asking the policy.
        if events and events[0][0] == now:
            continue
        start_work()
        ask()
        start_work()
    else:
        raise RuntimeError(f"dry run did not finish within {max_events} events")
    ttft = max(ready_at, default=0.0)
    return DryRunResult(actions=tuple(actions), decision_order=tuple(order),
                        decision_times_s=tuple(decided_at), ready_s=tuple(ready_at), ttft_s=ttft,
                        slo_met=ttft <= session.slo_s, quality_loss=session_quality_loss(menus, actions),
                        decisions=decisions, samples=tuple(samples))
