"""Links that replay a throughput `Trace`: `SimPyLink` (virtual time) and `TimerTraceLink` (the loop's clock).

Both share one model (`kvcast.netsim.fair_share.FairShareChannel`): RTT per request, payload efficiency,
per-request overhead bytes, processor sharing among concurrent transfers, exact integration of the
piecewise-constant trace. They differ only in how they wait for the next event.

One megabyte over a constant 8 Mbps trace with a 10 ms RTT, in virtual time:

>>> from kvcast.netsim import SimPyLink, VirtualTimeLoop
>>> from kvcast.traces import Trace
>>> loop = VirtualTimeLoop()
>>> link = SimPyLink(loop.env, Trace([0.0, 60.0], [8e6]), rtt_s=0.01)
>>> timing = loop.run_until_complete(link.transfer(1_000_000))
>>> round(loop.time(), 6)
1.01
>>> loop.close()
"""

from __future__ import annotations

import asyncio
import math
from functools import partial
from typing import Any

import simpy

from kvcast.netsim.fair_share import FairShareChannel, Flow
from kvcast.netsim.link import Link, TransferTiming
from kvcast.traces.trace import Trace

__all__ = ["SimPyLink", "TimerTraceLink", "TraceLinkOracle"]


class _TransferFuture(asyncio.Future):
    """A transfer's future; cancelling it abandons the transfer."""

    __slots__ = ("_abandon",)

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        abandon = getattr(self, "_abandon", None)
        if abandon is not None:
            abandon()
        return True


def _resolve(future: asyncio.Future, flow: Flow) -> None:
    if not future.done():
        future.set_result(_timing(flow))


def _timing(flow: Flow) -> TransferTiming:
    return TransferTiming(flow.nbytes, flow.wire_bits, flow.start_s, flow.first_byte_s, flow.end_s)


class TraceLinkOracle:
    """The future of a trace-replaying link (`kvcast.netsim.LinkOracle`)."""

    def __init__(self, channel: FairShareChannel) -> None:
        self._channel = channel

    def bandwidth_bps(self, t: float) -> float:
        return self._channel.bandwidth_bps(t)

    def transfer_end_s(self, t: float, nbytes: int) -> float:
        return self._channel.solo_transfer_end_s(t, nbytes)


class _TraceLink(Link):
    channel: FairShareChannel

    def __init__(self, trace: Trace, *, rtt_s: float, efficiency: float, overhead_bytes: int,
                 origin_s: float) -> None:
        self.channel = FairShareChannel(trace, origin_s=origin_s, rtt_s=rtt_s, efficiency=efficiency,
                                        overhead_bytes=overhead_bytes)
        self.rtt_s = self.channel.rtt_s
        self._version = 0

    @property
    def trace(self) -> Trace:
        return self.channel.trace

    def _now(self) -> float:
        raise NotImplementedError

    def _schedule(self, when: float, version: int) -> None:
        raise NotImplementedError

    def _add(self, nbytes: int, on_done: Any) -> Flow:
        now = self._now()
        flow = self.channel.add(now, nbytes, on_done)
        self._reschedule(now)
        return flow

    def _reschedule(self, now: float) -> None:
        self._version += 1
        when = self.channel.next_event_s(now)
        if when is not None and when != math.inf:
            self._schedule(when, self._version)

    def _wake(self, version: int, when: float, *_: Any) -> None:
        if version != self._version:
            return  # superseded by a later change
        done = self.channel.complete(when)
        self._reschedule(when)
        for flow in done:
            if flow.on_done is not None:
                flow.on_done(flow)

    def _abandon(self, flow: Flow) -> None:
        now = self._now()
        self.channel.remove(now, flow)
        self._reschedule(now)

    def start_transfer(self, nbytes: int) -> asyncio.Future[TransferTiming]:
        future = _TransferFuture(loop=asyncio.get_running_loop())
        flow = self._add(nbytes, partial(_resolve, future))
        future._abandon = partial(self._abandon, flow)
        return future

    def send(self, nbytes: int, on_done: Any) -> None:
        self._add(nbytes, lambda flow: on_done(_timing(flow)))

    def oracle(self) -> TraceLinkOracle:
        return TraceLinkOracle(self.channel)


class SimPyLink(_TraceLink):
    """A `Trace` replayed in the virtual time of a SimPy environment.

    Use it from asyncio code running on a `kvcast.netsim.VirtualTimeLoop` over the same environment
    (``await link.transfer(n)``), or from SimPy processes (``timing = yield link.request(n)``), e.g. to add
    cross traffic that shares the bandwidth with the engine's transfers.

    Args:
        env: the SimPy environment (its ``now`` is the clock).
        trace: bandwidth over time, bits/s on the wire; it starts at `origin_s`.
        rtt_s: round-trip time per request, spent before the first byte flows.
        efficiency: payload bytes per wire byte, in (0, 1] (Pensieve uses 0.95).
        overhead_bytes: extra bytes per request (request and response headers).
        origin_s: environment time at which the trace starts (default: ``env.now`` at construction).
    """

    def __init__(self, env: simpy.Environment, trace: Trace, *, rtt_s: float = 0.0, efficiency: float = 1.0,
                 overhead_bytes: int = 0, origin_s: float | None = None) -> None:
        self.env = env
        super().__init__(trace, rtt_s=rtt_s, efficiency=efficiency, overhead_bytes=overhead_bytes,
                         origin_s=env.now if origin_s is None else origin_s)

    def _now(self) -> float:
        return self.env.now

    def _schedule(self, when: float, version: int) -> None:
        delay = when - self.env.now
        timeout = self.env.timeout(delay if delay > 0.0 else 0.0)
        timeout.callbacks.append(partial(self._wake, version, when))

    def request(self, nbytes: int) -> simpy.Event:
        """SimPy API: an event that succeeds with the `TransferTiming` when `nbytes` are delivered."""
        event = self.env.event()
        self._add(nbytes, lambda flow: event.succeed(_timing(flow)))
        return event


class TimerTraceLink(_TraceLink):
    """A `Trace` replayed with the running loop's timers: in wall-clock time on a normal asyncio loop (an
    emulated network for demos and tests of the real-time path), in virtual time on a `VirtualTimeLoop`.

    Same arguments as `SimPyLink` without `env`; `origin_s` defaults to the loop time of the first request.
    """

    def __init__(self, trace: Trace, *, rtt_s: float = 0.0, efficiency: float = 1.0, overhead_bytes: int = 0,
                 origin_s: float | None = None) -> None:
        super().__init__(trace, rtt_s=rtt_s, efficiency=efficiency, overhead_bytes=overhead_bytes,
                         origin_s=0.0 if origin_s is None else origin_s)
        self._origin_pending = origin_s is None

    def _now(self) -> float:
        now = asyncio.get_running_loop().time()
        if self._origin_pending:
            self.channel.set_origin(now)
            self._origin_pending = False
        return now

    def _schedule(self, when: float, version: int) -> None:
        asyncio.get_running_loop().call_at(when, self._wake, version, when)

    def oracle(self) -> TraceLinkOracle:
        self._now()
        return super().oracle()
