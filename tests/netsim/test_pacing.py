"""`TracePacer`: exact timings in virtual time and on a hand-set clock; one short real-time run."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from kvcast.netsim import run_virtual
from kvcast.netsim.pacing import TracePacer
from kvcast.traces.trace import Trace

MB = 1_000_000


def virtual(main):
    """Run `main(pacer_factory)` in virtual time (`VirtualTimeLoop`): asyncio.sleep returns at once and
    `loop.time()` jumps, so timings are exact; returns (result, the virtual time at the end)."""

    async def runner():
        loop = asyncio.get_running_loop()
        result = await main(lambda trace, **kw: TracePacer(trace, clock=loop.time, **kw))
        return result, loop.time()

    return run_virtual(runner)


class Clock:
    """A clock the test sets by hand (for `reserve`, which never sleeps)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_stream_ends_at_the_trace_integral():
    async def main(make):
        p = make(Trace([0.0, 2.0, 4.0], [8e6, 2e6], wrap=False))
        await p.wait(2 * MB + 250_000)  # 16 Mbit in 2 s at 8 Mbps, then 2 Mbit at 2 Mbps
        return p.bytes_paced

    paced, end = virtual(main)
    assert math.isclose(end, 3.0) and paced == 2 * MB + 250_000


def test_pieces_queue_behind_each_other_and_idle_time_is_not_banked():
    clock = Clock()
    p = TracePacer(Trace([0.0, 100.0], [8e6]), clock=clock)
    assert p.reserve(MB) == pytest.approx(1.0)
    assert p.reserve(MB) == pytest.approx(2.0)  # one shared link: the second reservation starts at 1 s
    clock.now = 10.0  # idle for 8 s
    assert p.reserve(MB) == pytest.approx(11.0)


def test_burst_spends_idle_capacity_up_to_the_bucket_depth():
    clock = Clock()
    p = TracePacer(Trace([0.0, 100.0], [8e6]), clock=clock, burst_bytes=500_000)
    clock.now = 5.0
    assert p.reserve(MB) == pytest.approx(5.5)  # half a megabyte came out of the bucket


def test_slack_continues_a_stream_reserved_a_little_late_but_not_after_a_pause():
    clock = Clock()
    p = TracePacer(Trace([0.0, 100.0], [8e6]), clock=clock, slack_s=0.005)
    assert p.reserve(MB) == pytest.approx(1.0)
    clock.now = 1.004  # the next piece is reserved 4 ms late (the event loop was busy): no capacity lost
    assert p.reserve(MB) == pytest.approx(2.0)
    clock.now = 2.010  # 10 ms after the link went idle (an RTT, say): a new timeline starts now
    assert p.reserve(MB) == pytest.approx(3.010)
    clock = Clock()
    strict = TracePacer(Trace([0.0, 100.0], [8e6]), clock=clock)
    strict.reserve(MB)
    clock.now = 1.004
    assert strict.reserve(MB) == pytest.approx(2.004)  # without slack the 4 ms are lost
    with pytest.raises(ValueError, match="slack_s"):
        TracePacer(Trace([0.0, 100.0], [8e6]), slack_s=-1.0)


def test_concurrent_streams_share_the_trace():
    piece = 100_000

    async def main(make):
        p = make(Trace([0.0, 100.0], [8e6]))
        loop = asyncio.get_running_loop()

        async def stream(pieces: int) -> float:
            for _ in range(pieces):
                await p.wait(piece)
            return loop.time()

        return await asyncio.gather(stream(10), stream(10), stream(5))

    ends, _ = virtual(main)
    # 2.5 MB in total at 1 MB/s: the link is the bottleneck; the streams take turns piece by piece
    assert max(ends) == pytest.approx(2.5)
    assert ends[2] == pytest.approx(1.5)  # 5 pieces, each behind one piece of each other stream
    assert ends[0] == pytest.approx(2.4) and ends[1] == pytest.approx(2.5)


def test_efficiency_and_rtt():
    async def main(make):
        p = make(Trace([0.0, 100.0], [8e6]), rtt_s=0.05, efficiency=0.5)
        await p.round_trip()
        await p.wait(MB)

    assert virtual(main)[1] == pytest.approx(0.05 + 2.0)


def test_reset_restarts_the_trace_at_zero():
    clock = Clock()
    p = TracePacer(Trace([0.0, 1.0, 2.0], [8e6, 80e6], wrap=False), clock=clock)
    clock.now = 1.5  # in the fast segment
    assert p.reserve(MB) == pytest.approx(1.6)
    p.reset()
    assert p.now() == 0.0 and p.bytes_paced == 0
    assert p.reserve(MB) == pytest.approx(1.0)  # the slow segment again; the old reservation is forgotten


def test_a_cancelled_waiter_gives_its_reservation_back():
    async def main(make):
        p = make(Trace([0.0, 100.0], [8e6]))
        task = asyncio.create_task(p.wait(MB))
        await asyncio.sleep(0.25)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert p.bytes_paced == 0
        return p.reserve(MB)

    end, now = virtual(main)
    assert now == pytest.approx(0.25) and end == pytest.approx(1.25)


@pytest.mark.parametrize("kw", [{"rtt_s": -1.0}, {"efficiency": 0.0}, {"efficiency": 1.5}, {"burst_bytes": -1}])
def test_bad_settings(kw):
    with pytest.raises(ValueError):
        TracePacer(Trace([0.0, 1.0], [8e6]), **kw)


def test_a_trace_that_stops_delivering_is_refused():
    with pytest.raises(ValueError, match="stops delivering"):
        TracePacer(Trace([0.0, 1.0], [0.0]))
    with pytest.raises(ValueError, match="stops delivering"):
        TracePacer(Trace([0.0, 1.0, 2.0], [8e6, 0.0], wrap=False))
    TracePacer(Trace([0.0, 1.0, 2.0], [8e6, 0.0], wrap=True))  # wraps: delivers again


def test_real_time_delivery_follows_the_trace():
    """Two streams of 50 kB pieces through 0.6 s at 4 Mbps then 16 Mbps: bytes delivered by each moment
    match the trace's integral within two pieces and 30 ms."""
    trace = Trace([0.0, 0.6, 10.0], [4e6, 16e6], wrap=False)
    piece = 50_000
    total_bytes = 1_500_000  # 0.3 MB in the first 0.6 s, 1.2 MB at 2 MB/s: done at 1.2 s
    samples: list[tuple[float, int]] = []

    async def main() -> float:
        p = TracePacer(trace, clock=asyncio.get_running_loop().time)
        delivered = 0

        async def stream() -> None:
            nonlocal delivered
            while delivered < total_bytes:
                delivered += piece
                await p.wait(piece)
                samples.append((p.now(), delivered))

        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.gather(stream(), stream()), timeout=2.0)
        return time.monotonic() - t0

    wall = asyncio.run(main())
    assert wall == pytest.approx(trace.transfer_end_s(0.0, (total_bytes + piece) * 8), abs=0.1)
    for t, delivered in samples:  # `delivered` bytes were reserved, so they are out by the time we woke
        assert delivered * 8 <= trace.delivered_bits(0.0, t + 0.03) + 2 * piece * 8
        assert delivered * 8 >= trace.delivered_bits(0.0, max(t - 0.03, 0.0)) - 2 * piece * 8
