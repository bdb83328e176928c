"""The `Link` interface: send one chunk's bytes, learn when they were delivered.

A link is the only network-facing object the streaming engine touches. Every time is a reading of the
running asyncio loop's clock (``loop.time()``): virtual seconds under `kvcast.netsim.VirtualTimeLoop`, monotonic wall
seconds under a normal event loop. The same engine code therefore runs over `kvcast.netsim.SimPyLink` (a trace
replayed in virtual time) and over a real network link.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["ChunkRequest", "Link", "LinkFailure", "LinkOracle", "TransferOutcome", "TransferTiming"]


class LinkFailure(Exception):
    """A real link gave up on a transfer (retries spent, deadline passed, the server refused): the engine
    recomputes the chunk from text instead."""


@dataclass(frozen=True, slots=True)
class TransferTiming:
    """How one transfer went. Times are the loop clock's seconds."""

    nbytes: int
    """Payload bytes asked for."""
    wire_bits: float
    """Bits that crossed the bottleneck (payload plus per-request overhead, over the payload efficiency)."""
    start_s: float
    """When the request was sent."""
    first_byte_s: float
    """When data started to flow (``start_s`` plus the round-trip time)."""
    end_s: float
    """When the last byte was delivered."""
    payload: bytes | None = None
    """The bytes themselves, from a real link (a simulated link moves byte counts only)."""

    @property
    def duration_s(self) -> float:
        """Request to last byte, RTT included (what a client measures)."""
        return self.end_s - self.start_s

    @property
    def throughput_bps(self) -> float:
        """Payload goodput over the whole request, RTT included (bits/s)."""
        return self.nbytes * 8.0 / max(self.end_s - self.start_s, 1e-12)


@dataclass(frozen=True, slots=True)
class ChunkRequest:
    """What the engine asks a link for: chunk `chunk` encoded at `level`, `nbytes` long."""

    chunk: int
    level: str
    nbytes: int


TransferOutcome = TransferTiming | BaseException
"""What `Link.send` hands its callback: the timing, or the exception that ended the transfer."""


class LinkOracle(Protocol):
    """The future of a simulated link, for oracle policies. Times are loop-clock seconds."""

    def bandwidth_bps(self, t: float) -> float:
        """Bandwidth of the bottleneck (bits/s on the wire) at time `t`."""

    def transfer_end_s(self, t: float, nbytes: int) -> float:
        """When a request for `nbytes` payload bytes sent at time `t` would complete if it had the link to
        itself (RTT, per-request overhead and payload efficiency included)."""


class Link(abc.ABC):
    """Moves a chunk's bytes from the store to the GPU host; one request per call.

    Implementations: `kvcast.netsim.SimPyLink` (a throughput trace in virtual time),
    `kvcast.netsim.TimerTraceLink` (a trace in the running loop's own clock, real time included) and, in a later
    issue, an aiohttp link.
    """

    rtt_s: float = 0.0
    """Configured round-trip time per request (policies may use it as a prior)."""

    @abc.abstractmethod
    def start_transfer(self, nbytes: int) -> asyncio.Future[TransferTiming]:
        """Send a request for `nbytes` payload bytes now; the future completes when the last byte arrives.

        Must be called from a coroutine or callback running on the event loop. Cancelling the future abandons
        the transfer (its share of the bandwidth goes to the other transfers).
        """

    async def transfer(self, nbytes: int) -> TransferTiming:
        """``await link.transfer(n)``: send `nbytes` and wait until they are delivered."""
        return await self.start_transfer(nbytes)

    def send(self, nbytes: int, on_done: Callable[[TransferOutcome], None]) -> None:
        """Callback style (as ``loop.call_at``): send `nbytes` now and call ``on_done(timing)`` when they are
        delivered, or ``on_done(exception)`` if the transfer fails. Called on the event loop.

        The default wraps `start_transfer`; a simulated link overrides it to call back directly from its own
        event, without a future (the streaming engine uses this method).
        """
        def done(future: asyncio.Future[TransferTiming]) -> None:
            if future.cancelled():
                on_done(asyncio.CancelledError())
            elif future.exception() is not None:
                on_done(future.exception())
            else:
                on_done(future.result())

        self.start_transfer(nbytes).add_done_callback(done)

    def send_request(self, request: ChunkRequest, on_done: Callable[[TransferOutcome], None]) -> None:
        """Send the request for one chunk's object (the engine calls this). A simulated link only needs the
        size (this default calls `send`); a real link fetches the object the request names and returns its
        bytes in `TransferTiming.payload`."""
        self.send(request.nbytes, on_done)

    def oracle(self) -> LinkOracle | None:
        """The link's future, if it can tell it (a simulated link can, a real network cannot)."""
        return None
