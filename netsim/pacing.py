"""`TracePacer`: real-time pacing of a live server's sends by a throughput `Trace` (pure asyncio).

A server that emulates a network (``kvcast serve --trace``) awaits ``pacer.wait(nbytes)`` before writing each
piece of a response. The pacer is one shared link: every stream of the process reserves its bytes on the same
timeline, so together they never get more than the trace's bandwidth, however many there are.

Model (the `kvcast.netsim.FairShareChannel` one, in wall-clock time):

* trace time is ``clock() - epoch``; `reset` sets the epoch to now (a client session starts the trace at t = 0);
* the link is a token bucket whose fill rate is the trace's piecewise-constant bandwidth: ``wait(n)`` reserves
  ``n * 8 / efficiency`` wire bits starting where the previous reservation ended (or now, if the link is idle)
  and returns at the moment the trace would have delivered them (`Trace.transfer_end_s`, exact integration);
  `burst_bytes` (default 0) lets up to that many bytes of unused capacity accumulate while the link idles;
* streams that reserve in turn share the bandwidth in proportion to their pieces (with equal pieces, equally);
* ``await pacer.round_trip()`` sleeps `rtt_s` (call it once per request, before the first byte: the
  round trip that netem would add); during it other streams keep the link busy.

A waiter that is cancelled (its client went away) gives back its reservation if nothing was reserved after it.

>>> import asyncio
>>> from kvcast.traces import Trace
>>> now = [0.0]
>>> async def fake_sleep(s):
...     now[0] += s
>>> pacer = TracePacer(Trace([0.0, 10.0], [8e6]), clock=lambda: now[0], sleep=fake_sleep)
>>> asyncio.run(pacer.wait(1_000_000))  # 8 Mbit at 8 Mbps
>>> now[0]
1.0
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

from kvcast.traces.trace import Trace

__all__ = ["TracePacer"]


class TracePacer:
    """Paces byte sends to a throughput trace in real time, shared by every concurrent stream.

    Args:
        trace: bandwidth over time (bits per second); past its end it wraps or keeps its last bandwidth
            (`Trace.wrap`). It must deliver every byte eventually (`ValueError` otherwise).
        rtt_s: round-trip time slept by `round_trip` (seconds, >= 0).
        efficiency: payload bytes per wire byte, in (0, 1]: ``n`` bytes cost ``n * 8 / efficiency`` bits.
        burst_bytes: unused capacity kept while the link idles (token-bucket depth, bytes, >= 0).
        slack_s: a send reserved at most this late after the link went idle continues the link's timeline
            instead of starting a new one (seconds, >= 0): the event loop's scheduling delay between the pieces
            of one stream then costs no capacity, while a real pause (an RTT, no request) still does.
        clock: monotonic seconds (`time.monotonic`; the asyncio loop's clock in real use).
        sleep: coroutine function sleeping that many seconds of `clock` (`asyncio.sleep`).
    """

    def __init__(self, trace: Trace, *, rtt_s: float = 0.0, efficiency: float = 1.0, burst_bytes: int = 0,
                 slack_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        if not isinstance(trace, Trace):
            raise TypeError(f"trace must be a kvcast Trace, got {type(trace).__name__}")
        if not (trace.total_bits > 0 if trace.wrap else float(trace.bandwidth_bps[-1]) > 0):
            raise ValueError(f"trace {trace.name or trace.source or ''!r} stops delivering bytes at some point "
                             "(zero bandwidth throughout, or a last segment of 0 without wrap)")
        if not (0.0 <= rtt_s < math.inf):
            raise ValueError(f"rtt_s must be finite and >= 0, got {rtt_s}")
        if not (0.0 < efficiency <= 1.0):
            raise ValueError(f"efficiency must be in (0, 1], got {efficiency}")
        if not (isinstance(burst_bytes, int) and burst_bytes >= 0):
            raise ValueError(f"burst_bytes must be an int >= 0, got {burst_bytes!r}")
        self.trace = trace
        self.rtt_s = float(rtt_s)
        self.efficiency = float(efficiency)
        self.burst_bytes = burst_bytes
        if not (0.0 <= slack_s < math.inf):
            raise ValueError(f"slack_s must be finite and >= 0, got {slack_s}")
        self.slack_s = float(slack_s)
        self._clock = clock
        self._sleep = sleep
        self._epoch = clock()
        self._generation = 0
        self._busy_until = 0.0  # trace time at which the reserved bits are all delivered
        self.bytes_paced = 0
        """Payload bytes granted since the last `reset`."""

    def now(self) -> float:
        """Trace time: seconds since the last `reset` (or since construction)."""
        return max(self._clock() - self._epoch, 0.0)

    def reset(self) -> None:
        """Restart the trace at t = 0 with an idle link. Waiters already sleeping finish on the old timeline."""
        self._epoch = self._clock()
        self._generation += 1
        self._busy_until = 0.0
        self.bytes_paced = 0

    def reserve(self, nbytes: int) -> float:
        """Reserve `nbytes` on the link now; returns the trace time at which they are delivered (no sleeping)."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        now = self.now()
        bits = nbytes * 8.0 / self.efficiency
        if self._busy_until <= now and now - self._busy_until <= self.slack_s and self._busy_until > 0:
            start = self._busy_until  # late by scheduling only: the stream goes on where it was
        elif self._busy_until <= now:
            if self.burst_bytes:  # capacity accumulated while idle, at most the bucket's depth
                idle = self.trace.delivered_bits(self._busy_until, now)
                bits = max(bits - min(idle, self.burst_bytes * 8.0), 0.0)
            start = now
        else:
            start = self._busy_until
        end = self.trace.transfer_end_s(start, bits)
        self._busy_until = end
        self.bytes_paced += nbytes
        return end

    async def wait(self, nbytes: int) -> None:
        """Return when the trace would have delivered `nbytes` more bytes on the shared link."""
        generation = self._generation
        before = self._busy_until
        end = self.reserve(nbytes)
        delay = end - self.now()
        if delay <= 0:
            return
        try:
            await self._sleep(delay)
        except asyncio.CancelledError:
            if self._generation == generation and self._busy_until == end:  # nothing reserved after us
                self._busy_until = before
                self.bytes_paced -= nbytes
            raise

    async def round_trip(self) -> None:
        """Sleep one round-trip time (a request's wait before its first byte)."""
        if self.rtt_s > 0:
            await self._sleep(self.rtt_s)

    def __repr__(self) -> str:
        return (f"TracePacer(trace={self.trace.name or self.trace.source!r}, rtt_s={self.rtt_s}, "
                f"efficiency={self.efficiency}, burst_bytes={self.burst_bytes})")
