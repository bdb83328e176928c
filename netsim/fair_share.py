"""Processor sharing of a trace's bandwidth among concurrent transfers, with exact integration.

`FairShareChannel` holds no clock: a driver (`SimPyLink` with SimPy timeouts, `TimerTraceLink` with
``loop.call_at``) tells it the time whenever something happens and asks when the next thing will happen.

Model, per request of ``nbytes`` payload bytes sent at time ``s``:

* the request spends one round-trip time before its first byte flows (``first_byte = s + rtt``);
* it then has to move ``wire_bits = (nbytes + overhead_bytes) * 8 / efficiency`` bits;
* while ``k`` transfers are flowing, each gets ``1/k`` of the trace's bandwidth (fair share); rates are
  recomputed whenever a transfer starts flowing, finishes or is abandoned;
* with a single transfer in the system, its completion is computed in one step
  (``trace.transfer_end_s(first_byte, wire_bits)``): one event per request.

Times given to the channel are the driver's clock; the trace is read at ``t - origin_s``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

from kvcast.traces.trace import Trace

__all__ = ["FairShareChannel", "Flow"]

_REL_TOL = 1e-9


class Flow:
    """One transfer inside a `FairShareChannel`."""

    __slots__ = ("nbytes", "wire_bits", "remaining_bits", "start_s", "first_byte_s", "end_s", "on_done")

    def __init__(self, nbytes: int, wire_bits: float, start_s: float, first_byte_s: float,
                 on_done: Callable[[Flow], None] | None) -> None:
        self.nbytes = nbytes
        self.wire_bits = wire_bits
        self.remaining_bits = wire_bits
        self.start_s = start_s
        self.first_byte_s = first_byte_s
        self.end_s = math.nan
        self.on_done = on_done

    def __repr__(self) -> str:
        return (f"Flow(nbytes={self.nbytes}, remaining_bits={self.remaining_bits:.6g}, "
                f"start_s={self.start_s:.6g}, end_s={self.end_s:.6g})")


class FairShareChannel:
    """Bandwidth of `trace` shared equally among the transfers flowing at each instant.

    Args:
        trace: bandwidth over time (bits/s on the wire).
        origin_s: driver time at which the trace starts (trace time = driver time - origin).
        rtt_s: round-trip time spent by every request before its first byte flows.
        efficiency: payload bytes per wire byte, in (0, 1] (TCP/IP and framing overhead).
        overhead_bytes: extra bytes per request (headers), sent at the same efficiency.
    """

    def __init__(self, trace: Trace, *, origin_s: float = 0.0, rtt_s: float = 0.0, efficiency: float = 1.0,
                 overhead_bytes: int = 0) -> None:
        if not (0.0 < efficiency <= 1.0):
            raise ValueError(f"payload efficiency must be in (0, 1], got {efficiency}")
        if not (rtt_s >= 0.0 and math.isfinite(rtt_s)):
            raise ValueError(f"rtt_s must be finite and >= 0, got {rtt_s}")
        if overhead_bytes < 0:
            raise ValueError(f"overhead_bytes must be >= 0, got {overhead_bytes}")
        self.trace = trace
        self.origin_s = float(origin_s)
        self.rtt_s = float(rtt_s)
        self.efficiency = float(efficiency)
        self.overhead_bytes = int(overhead_bytes)
        self._active: list[Flow] = []
        self._pending: deque[Flow] = deque()  # waiting for their first byte, in arrival order
        self._last_s = self.origin_s
        self._due: tuple[Flow, ...] = ()
        self._due_s = math.inf
        self.delivered_wire_bits = 0.0
        """Wire bits delivered to finished transfers so far."""

    # ------------------------------------------------------------------ queries
    def wire_bits(self, nbytes: int) -> float:
        """Bits on the wire for a request of `nbytes` payload bytes."""
        return (nbytes + self.overhead_bytes) * 8.0 / self.efficiency

    @property
    def flows(self) -> tuple[Flow, ...]:
        """Transfers in the system (flowing first, then those waiting for their first byte)."""
        return (*self._active, *self._pending)

    def solo_transfer_end_s(self, start_s: float, nbytes: int) -> float:
        """Completion time of a request sent at `start_s` that has the link to itself."""
        return self._end_after(start_s + self.rtt_s, self.wire_bits(nbytes))

    def bandwidth_bps(self, t: float) -> float:
        """The trace's bandwidth at driver time `t`."""
        return float(self.trace.bandwidth_at(self._trace_time(t)))

    # ------------------------------------------------------------------ changes
    def set_origin(self, origin_s: float) -> None:
        """Start the trace at driver time `origin_s` (only while no transfer is in the system)."""
        if self._active or self._pending:
            raise RuntimeError("cannot move the origin of a channel with transfers in flight")
        self.origin_s = self._last_s = float(origin_s)

    def add(self, now: float, nbytes: int, on_done: Callable[[Flow], None] | None = None) -> Flow:
        """A request for `nbytes` payload bytes is sent at `now`. Call `next_event_s` afterwards."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if self._active or self._pending:
            self._advance(now)
        elif now > self._last_s:
            self._last_s = now
        flow = Flow(int(nbytes), self.wire_bits(nbytes), now, now + self.rtt_s, on_done)
        if self.rtt_s == 0.0:
            self._active.append(flow)
        else:
            if self._pending and self._pending[-1].first_byte_s > flow.first_byte_s:
                raise ValueError("requests must be added in time order")
            self._pending.append(flow)
        return flow

    def remove(self, now: float, flow: Flow) -> None:
        """Abandon `flow` at `now` (its share goes to the others). Call `next_event_s` afterwards."""
        self._advance(now)
        if flow in self._active:
            self._active.remove(flow)
        elif flow in self._pending:
            self._pending.remove(flow)

    def next_event_s(self, now: float) -> float | None:
        """The next time at which a transfer finishes or starts flowing (None if the channel is empty, inf if
        the bandwidth stays zero forever). Call `complete(t)` when that time comes."""
        active, pending = self._active, self._pending
        n = len(active)
        if n + len(pending) == 0:
            self._due, self._due_s = (), math.inf
            return None
        if n + len(pending) == 1:  # one transfer alone: its end in one step
            flow = active[0] if n else pending[0]
            t = self._end_after(max(now, flow.first_byte_s), max(flow.remaining_bits, 0.0))
            self._due, self._due_s = (flow,), t
            return t
        t_arrival = pending[0].first_byte_s if pending else math.inf
        if n:
            least = max(min(f.remaining_bits for f in active), 0.0)
            t_done = self._end_after(now, least * n)
            if t_done <= t_arrival:
                self._due = tuple(f for f in active if f.remaining_bits <= least + _REL_TOL * f.wire_bits)
                self._due_s = t_done
                return t_done
        self._due, self._due_s = (), math.inf
        return t_arrival

    def complete(self, now: float) -> list[Flow]:
        """Bring the channel to `now` (the time `next_event_s` returned) and return the transfers that
        finished, with `end_s` set. Call `next_event_s` afterwards, then the flows' ``on_done``."""
        active, pending = self._active, self._pending
        if len(self._due) == 1 and now >= self._due_s and len(active) + len(pending) == 1:
            flow = self._due[0]  # alone in the system: no integration needed, it ends exactly now
            active.clear()
            pending.clear()
            self._due, self._last_s = (), now
            flow.remaining_bits = 0.0
            flow.end_s = now
            self.delivered_wire_bits += flow.wire_bits
            return [flow]
        self._advance(now)
        done: list[Flow] = []
        if self._due and now >= self._due_s:
            for flow in self._due:
                if flow in self._active:
                    flow.remaining_bits = 0.0
            self._due = ()
        for flow in self._active:
            if flow.remaining_bits <= _REL_TOL * flow.wire_bits:
                flow.end_s = now
                done.append(flow)
                self.delivered_wire_bits += flow.wire_bits
        if done:
            self._active = [f for f in self._active if f.remaining_bits > _REL_TOL * f.wire_bits]
        return done

    # ------------------------------------------------------------------ internals
    def _trace_time(self, t: float) -> float:
        tt = t - self.origin_s
        if tt < 0.0:
            if tt > -1e-9:
                return 0.0
            raise ValueError(f"time {t} is before the link's origin {self.origin_s}")
        return tt

    def _end_after(self, start_s: float, bits: float) -> float:
        if bits <= 0.0:
            return start_s
        return self.trace.transfer_end_s(self._trace_time(start_s), bits) + self.origin_s

    def _share(self, t0: float, t1: float) -> None:
        active = self._active
        bits = self.trace.delivered_bits(self._trace_time(t0), self._trace_time(t1)) / len(active)
        for flow in active:
            flow.remaining_bits -= bits

    def _advance(self, now: float) -> None:
        """Deliver the bits of [last event, now] to the flowing transfers, starting pending ones on time."""
        t = self._last_s
        if now <= t:
            now = t
        pending, active = self._pending, self._active
        while pending and pending[0].first_byte_s <= now:
            flow = pending.popleft()
            if active and flow.first_byte_s > t:
                self._share(t, flow.first_byte_s)
            if flow.first_byte_s > t:
                t = flow.first_byte_s
            active.append(flow)
        if active and now > t:
            self._share(t, now)
        self._last_s = now
