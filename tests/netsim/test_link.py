"""Properties of the trace-replaying links against analytic integrals of random piecewise traces."""

from __future__ import annotations

import asyncio
import math

import pytest
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcast.netsim import SimPyLink, TimerTraceLink, VirtualTimeLoop, run_virtual
from kvcast.traces.trace import Trace

REL = 1e-9


@st.composite
def piecewise_traces(draw, max_segments: int = 8) -> Trace:
    n = draw(st.integers(1, max_segments))
    durations = draw(st.lists(st.floats(0.05, 5.0), min_size=n, max_size=n))
    rates = draw(st.lists(st.one_of(st.just(0.0), st.floats(1e5, 1e9)), min_size=n, max_size=n))
    if all(r == 0.0 for r in rates):
        rates[draw(st.integers(0, n - 1))] = draw(st.floats(1e5, 1e9))
    bounds = [0.0]
    for d in durations:
        bounds.append(bounds[-1] + d)
    return Trace(bounds, rates, name="random")


def close(a: float, b: float, rel: float = REL) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


def run_transfers(trace: Trace, requests: list[tuple[float, int]], **link_kw) -> list:
    """Start each (time, nbytes) request at its time on one SimPyLink; return the timings in request order."""
    loop = VirtualTimeLoop()
    link = SimPyLink(loop.env, trace, **link_kw)

    async def main():
        futures = []
        for when, nbytes in sorted(requests, key=lambda r: r[0]):
            delay = when - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            futures.append(link.start_transfer(nbytes))
        return await asyncio.gather(*futures)

    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


@settings(max_examples=60, deadline=None)
@given(trace=piecewise_traces(), nbytes=st.integers(0, 10**8), start=st.floats(0.0, 20.0),
       rtt=st.floats(0.0, 0.3), efficiency=st.floats(0.5, 1.0), overhead=st.integers(0, 2000))
def test_single_flow_matches_the_trace_integral(trace, nbytes, start, rtt, efficiency, overhead):
    (timing,) = run_transfers(trace, [(start, nbytes)], rtt_s=rtt, efficiency=efficiency,
                              overhead_bytes=overhead)
    wire_bits = (nbytes + overhead) * 8 / efficiency
    assert close(timing.wire_bits, wire_bits)
    assert close(timing.start_s, start)
    assert close(timing.first_byte_s, start + rtt)
    assert close(timing.end_s, trace.transfer_end_s(start + rtt, wire_bits))
    assert math.isclose(trace.delivered_bits(timing.first_byte_s, timing.end_s), wire_bits, rel_tol=1e-7,
                        abs_tol=1e-3)


@settings(max_examples=60, deadline=None)
@given(trace=piecewise_traces(), nbytes=st.integers(1, 10**7), n=st.integers(2, 6),
       start=st.floats(0.0, 10.0), rtt=st.floats(0.0, 0.2))
def test_equal_flows_started_together_finish_together_at_the_time_of_n_times_the_bytes(
        trace, nbytes, n, start, rtt):
    timings = run_transfers(trace, [(start, nbytes)] * n, rtt_s=rtt)
    expected = trace.transfer_end_s(start + rtt, n * nbytes * 8.0)
    for t in timings:
        assert close(t.end_s, expected, 1e-8)
    assert len({t.end_s for t in timings}) == 1


@settings(max_examples=60, deadline=None)
@given(trace=piecewise_traces(), sizes=st.lists(st.integers(1, 10**7), min_size=1, max_size=6),
       start=st.floats(0.0, 10.0))
def test_processor_sharing_completion_times_for_simultaneous_flows(trace, sizes, start):
    """Flows of sizes s1 <= ... <= sn started together: flow k ends when sum_{j<=k} s_j + (n-k) s_k bits
    have crossed the link (every flow still in the system gets the same share)."""
    timings = run_transfers(trace, [(start, s) for s in sizes])
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    n = len(sizes)
    done = 0.0
    for rank, i in enumerate(order):
        bits = sizes[i] * 8.0
        expected = trace.transfer_end_s(start, done + bits * (n - rank))
        assert close(timings[i].end_s, expected, 1e-7)
        done += bits


@settings(max_examples=60, deadline=None)
@given(trace=piecewise_traces(), requests=st.lists(st.tuples(st.floats(0.0, 20.0), st.integers(0, 10**7)),
                                                    min_size=1, max_size=8))
def test_work_conservation_makespan_equals_fifo(trace, requests):
    """Processor sharing is work-conserving: the last completion equals that of a FIFO queue on the trace."""
    timings = run_transfers(trace, requests)
    free = 0.0
    for when, nbytes in sorted(requests, key=lambda r: r[0]):
        free = trace.transfer_end_s(max(free, when), nbytes * 8.0)
    assert close(max(t.end_s for t in timings), free, 1e-7)
    for t in timings:  # nobody finishes before it could have alone
        assert t.end_s >= trace.transfer_end_s(t.start_s, t.wire_bits) * (1 - 1e-9) - 1e-9


def test_flow_joining_later_slows_the_first_one_exactly():
    trace = Trace([0.0, 100.0], [8e6])  # 1 MB/s
    a, b = run_transfers(trace, [(0.0, 2_000_000), (1.0, 500_000)])
    # a alone for 1 s (1 MB), then both at 0.5 MB/s: b done after 1 s more; a's last 0.5 MB alone
    assert close(b.end_s, 2.0)
    assert close(a.end_s, 2.5)


def test_cancelled_transfer_releases_its_share():
    trace = Trace([0.0, 100.0], [8e6])
    loop = VirtualTimeLoop()
    link = SimPyLink(loop.env, trace)

    async def main():
        a = link.start_transfer(1_000_000)
        b = link.start_transfer(1_000_000)
        await asyncio.sleep(1.0)  # each got 0.5 MB
        b.cancel()
        return await a

    timing = loop.run_until_complete(main())
    assert close(timing.end_s, 1.5)


def test_simpy_processes_share_the_link_with_asyncio_code():
    trace = Trace([0.0, 100.0], [8e6])
    env = simpy.Environment()
    loop = VirtualTimeLoop(env)
    link = SimPyLink(env, trace)
    seen = []

    def cross_traffic(env):
        timing = yield link.request(1_000_000)
        seen.append(timing.end_s)

    env.process(cross_traffic(env))
    timing = loop.run_until_complete(link.transfer(1_000_000))
    env.run()  # the SimPy process resumes on the environment's next step
    # the SimPy flow's end comes out of the link's float sums (shares, trace integrals), like timing.end_s
    assert close(timing.end_s, 2.0) and seen == [pytest.approx(2.0, rel=1e-12)]


def test_zero_byte_request_costs_one_rtt():
    (t,) = run_transfers(Trace([0.0, 1.0], [1e6]), [(0.5, 0)], rtt_s=0.2)
    assert close(t.end_s, 0.7)


def test_link_origin_and_oracle():
    trace = Trace([0.0, 1.0, 2.0], [8e6, 16e6])
    loop = VirtualTimeLoop()
    link = SimPyLink(loop.env, trace, rtt_s=0.1, origin_s=-1.0)  # env time 0 = trace time 1
    oracle = link.oracle()
    assert oracle.bandwidth_bps(0.0) == 16e6
    assert close(oracle.transfer_end_s(0.0, 1_000_000), 0.1 + 0.5)
    timing = loop.run_until_complete(link.transfer(1_000_000))
    assert close(timing.end_s, oracle.transfer_end_s(0.0, 1_000_000))


def test_bad_link_parameters():
    trace = Trace([0.0, 1.0], [1e6])
    env = simpy.Environment()
    with pytest.raises(ValueError, match="efficiency"):
        SimPyLink(env, trace, efficiency=0.0)
    with pytest.raises(ValueError, match="rtt"):
        SimPyLink(env, trace, rtt_s=-1.0)


def test_timer_link_runs_in_wall_clock_time():
    trace = Trace([0.0, 10.0], [8e6])  # 1 MB/s: 20 kB = 20 ms

    async def main():
        link = TimerTraceLink(trace, rtt_s=0.01)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        timing = await link.transfer(20_000)
        return timing, loop.time() - t0

    timing, wall = asyncio.run(main())
    assert close(timing.end_s - timing.start_s, 0.03, 1e-6)
    assert 0.028 <= wall < 0.5


# ---------------------------------------------------------------------------------------------- virtual time
def test_virtual_loop_sleeps_without_waiting_and_orders_timers():
    order = []

    async def sleeper(name, delay):
        await asyncio.sleep(delay)
        order.append((name, asyncio.get_running_loop().time()))

    async def main():
        await asyncio.gather(sleeper("b", 2.0), sleeper("a", 1.0), sleeper("c", 3600.0))
        return asyncio.get_running_loop().time()

    assert run_virtual(main) == 3600.0
    assert order == [("a", 1.0), ("b", 2.0), ("c", 3600.0)]


def test_virtual_loop_reports_a_deadlock():
    from kvcast.netsim import VirtualTimeDeadlock

    async def main():
        await asyncio.get_running_loop().create_future()

    with pytest.raises(VirtualTimeDeadlock, match="never completed"):
        run_virtual(main)


def test_virtual_loop_new_timeline_restarts_at_zero():
    loop = VirtualTimeLoop()
    loop.run_until_complete(asyncio.sleep(5.0))
    assert loop.time() == 5.0
    loop.new_timeline()
    assert loop.time() == 0.0
    loop.run_until_complete(asyncio.sleep(1.0))
    assert loop.time() == 1.0
    loop.close()


def test_cancelled_timer_does_not_fire():
    fired = []

    async def main():
        loop = asyncio.get_running_loop()
        handle = loop.call_later(1.0, fired.append, 1)
        loop.call_later(0.5, handle.cancel)
        await asyncio.sleep(2.0)

    run_virtual(main)
    assert fired == []
