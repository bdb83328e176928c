"""Golden tests of the streaming engine on hand-computable scenarios, and decision validation."""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcast.netsim import Link, SimPyLink, TimerTraceLink, VirtualTimeLoop
from kvcast.policies.base import TEXT, ChunkMenu, Decision, LevelOption, Policy
from kvcast.policies.fixed import FixedLevelPolicy
from kvcast.streamer.engine import PolicyError, StreamingEngine
from kvcast.traces.trace import Trace
from tests.factories import MB, Idle, QueuedPlan, big_small_menus

ONE_MB_PER_S = Trace([0.0, 1000.0], [8e6])  # 1 MB/s, constant


def run(policy, chunk_menus, trace=ONE_MB_PER_S, slo_s=10.0, **link_kw):
    loop = VirtualTimeLoop()
    link = SimPyLink(loop.env, trace, **link_kw)
    try:
        return loop.run_until_complete(StreamingEngine(policy, chunk_menus, link, slo_s=slo_s).run())
    finally:
        loop.close()


def test_pipelined_transfers_and_decodes_constant_bandwidth():
    # transfers of 1 s after a 0.1 s RTT, back to back; decode 0.5 s overlaps the next transfer
    result = run(FixedLevelPolicy("small"), big_small_menus(3), rtt_s=0.1)
    ends = [c.transfer_end_s for c in result.chunks]
    assert ends == pytest.approx([1.1, 2.2, 3.3])
    assert [c.transfer_start_s for c in result.chunks] == pytest.approx([0.0, 1.1, 2.2])
    assert [c.decode_end_s for c in result.chunks] == pytest.approx([1.6, 2.7, 3.8])
    assert result.ttft_s == pytest.approx(3.8)
    assert result.bytes_loaded == 3 * MB
    assert result.quality_loss == pytest.approx(0.01)
    assert all(c.measured_bps == pytest.approx(8e6 / 1.1) for c in result.chunks)


def test_decoder_backlog_when_decoding_is_slower_than_the_link():
    result = run(FixedLevelPolicy("small"), big_small_menus(3, decode_s=1.5), rtt_s=0.1)
    assert [c.decode_start_s for c in result.chunks] == pytest.approx([1.1, 2.6, 4.1])
    assert result.ttft_s == pytest.approx(5.6)


def test_text_chunk_waits_for_its_prefix_while_later_chunks_load():
    policy = QueuedPlan([(0, "small"), (1, TEXT), (2, "small")])
    result = run(policy, big_small_menus(3), rtt_s=0.1)
    c0, c1, c2 = result.chunks
    assert c0.ready_s == pytest.approx(1.6)
    assert (c1.recompute_start_s, c1.recompute_end_s) == pytest.approx((1.6, 1.9))  # waits for chunk 0
    assert (c2.transfer_start_s, c2.transfer_end_s) == pytest.approx((1.1, 2.2))   # the link moves on
    assert result.ttft_s == pytest.approx(2.7)
    assert result.text_chunks == 1
    assert result.quality_loss == pytest.approx(0.01 * 2 / 3)  # token-weighted, text counts 0


def test_compute_from_the_front_load_from_the_back():
    # Cake-style: chunk 0 recomputed from t=0 while chunk 2 loads; chunk 1 recomputed after chunk 0
    policy = QueuedPlan([(2, "small"), (0, TEXT), (1, TEXT)])
    result = run(policy, big_small_menus(3), rtt_s=0.0)
    c0, c1, c2 = result.chunks
    assert (c0.recompute_start_s, c0.recompute_end_s) == pytest.approx((0.0, 0.3))
    assert (c1.recompute_start_s, c1.recompute_end_s) == pytest.approx((0.3, 0.6))
    assert c2.ready_s == pytest.approx(1.5)
    assert result.ttft_s == pytest.approx(1.5)


def test_compute_runs_the_lowest_queued_text_chunk_first():
    policy = QueuedPlan([(1, TEXT), (0, TEXT)])
    result = run(policy, big_small_menus(2))
    assert result.chunks[0].recompute_start_s == pytest.approx(0.0)
    assert result.chunks[1].recompute_start_s == pytest.approx(0.3)


def test_slo_met_and_overrun():
    result = run(FixedLevelPolicy("small"), big_small_menus(3), rtt_s=0.1, slo_s=3.0)
    assert not result.slo_met and result.overrun_s == pytest.approx(0.8)
    result = run(FixedLevelPolicy("small"), big_small_menus(3), rtt_s=0.1, slo_s=4.0)
    assert result.slo_met and result.overrun_s == 0.0


def test_observations_describe_the_state():
    class Watcher(Policy):
        def reset(self, session):
            super().reset(session)
            self.seen = []

        def decide(self, obs):
            self.seen.append(obs)
            if not obs.link_idle:
                return None
            return Decision(obs.pending[0], "small", predicted_bps=1.0)

    policy = Watcher()
    result = run(policy, big_small_menus(2), rtt_s=0.1)
    first = policy.seen[0]
    assert first.now_s == 0.0 and first.pending == (0, 1) and first.ready == (False, False)
    assert first.link_idle and first.compute_idle and first.samples == ()
    busy = policy.seen[1]  # asked again at once: the compute unit is idle
    assert busy.now_s == 0.0 and not busy.link_idle and busy.actions == ("small", None)
    later = policy.seen[2]  # chunk 0 delivered at 1.1
    assert later.now_s == pytest.approx(1.1) and later.link_idle and len(later.samples) == 1
    assert later.decoder_free_at_s == pytest.approx(1.6)
    assert later.samples[0].throughput_bps == pytest.approx(8e6 / 1.1)
    assert result.chunks[0].predicted_bps == 1.0


@pytest.mark.parametrize("decision, message", [
    (Decision(5, "small"), "not pending"),
    (Decision(0, "huge"), "chose level 'huge'"),
    ("small", "expected a Decision"),
])
def test_invalid_decisions_are_rejected(decision, message):
    class Bad(Policy):
        def decide(self, obs):
            return decision

    with pytest.raises(PolicyError, match=message):
        run(Bad(), big_small_menus(2))


def test_decided_chunk_cannot_be_decided_again():
    with pytest.raises(PolicyError, match="not pending"):
        run(QueuedPlan([(0, "small"), (0, "small")]), big_small_menus(2))


def test_returning_none_with_nothing_in_flight_is_an_error():
    with pytest.raises(PolicyError, match="wait forever"):
        run(Idle(), big_small_menus(2))


def test_waiting_policy_is_woken_by_the_decoder_when_nothing_else_runs():
    class WaitForDecoder(Policy):
        def decide(self, obs):
            if not obs.link_idle or obs.decoder_free_at_s > obs.now_s:
                return None
            return Decision(obs.pending[0], "small")

    result = run(WaitForDecoder(), big_small_menus(2, decode_s=2.0))
    assert result.chunks[1].transfer_start_s == pytest.approx(3.0)  # after chunk 0's decode (1 + 2)


def test_oracle_policy_needs_a_link_that_knows_the_future():
    class Oracle(Policy):
        needs_future = True

        def decide(self, obs):
            assert obs.session.future_bandwidth_bps(0.5) == 8e6
            assert obs.session.future_transfer_end_s(0.0, MB) == pytest.approx(1.0)
            return Decision(obs.pending[0], "small") if obs.link_idle else None

    assert run(Oracle(), big_small_menus(1)).ttft_s == pytest.approx(1.5)

    class Blind(Link):
        def start_transfer(self, nbytes):
            raise AssertionError("not reached")

    loop = VirtualTimeLoop()
    with pytest.raises(PolicyError, match="needs the future"):
        loop.run_until_complete(StreamingEngine(Oracle(), big_small_menus(1), Blind(), slo_s=1.0).run())


def test_two_sessions_share_one_link_fairly():
    loop = VirtualTimeLoop()
    link = SimPyLink(loop.env, ONE_MB_PER_S)

    async def both():
        a = StreamingEngine(FixedLevelPolicy("small"), big_small_menus(1, decode_s=0.0), link, slo_s=5.0).run()
        b = StreamingEngine(FixedLevelPolicy("small"), big_small_menus(1, decode_s=0.0), link, slo_s=5.0).run()
        return await asyncio.gather(a, b)

    ra, rb = loop.run_until_complete(both())
    assert ra.ttft_s == pytest.approx(2.0) and rb.ttft_s == pytest.approx(2.0)


def test_same_engine_runs_in_real_time_over_a_wall_clock_link():
    trace = Trace([0.0, 100.0], [8e8])  # 100 MB/s: 1 MB = 10 ms
    chunk_menus = big_small_menus(3, decode_s=0.005, recompute_s=0.01)
    plan = [(0, "small"), (1, TEXT), (2, "small")]
    virtual = run(QueuedPlan(plan), chunk_menus, trace=trace, rtt_s=0.002)

    async def real():
        link = TimerTraceLink(trace, rtt_s=0.002)
        return await StreamingEngine(QueuedPlan(plan), chunk_menus, link, slo_s=1.0).run()

    wall = asyncio.run(real())
    assert virtual.ttft_s == pytest.approx(0.024 + 0.005)
    assert wall.ttft_s == pytest.approx(virtual.ttft_s, abs=0.02)  # timer jitter only
    assert [c.action for c in wall.chunks] == [c.action for c in virtual.chunks]


def test_engine_is_deterministic():
    trace = Trace([0.0, 0.3, 0.7, 2.0], [8e6, 2e6, 20e6])
    a = run(QueuedPlan([(0, "small"), (1, TEXT), (2, "big")]), big_small_menus(3), trace=trace, rtt_s=0.01)
    b = run(QueuedPlan([(0, "small"), (1, TEXT), (2, "big")]), big_small_menus(3), trace=trace, rtt_s=0.01)
    assert [c.to_dict() for c in a.chunks] == [c.to_dict() for c in b.chunks]


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 5 * MB), min_size=1, max_size=8), decode=st.floats(0.0, 2.0),
       rtt=st.floats(0.0, 0.2))
def test_fixed_policy_ttft_equals_the_pipeline_recurrence(sizes, decode, rtt):
    """Constant 1 MB/s: transfer_i = rtt + size_i/1e6 back to back; decode starts at
    max(arrival, decoder free)."""
    chunk_menus = tuple(ChunkMenu(i, 10 * i, 10, (LevelOption("small", s, decode, 0.0),), 0.1)
                        for i, s in enumerate(sizes))
    result = run(FixedLevelPolicy("small"), chunk_menus, rtt_s=rtt)
    link_free = decoder_free = 0.0
    for s in sizes:
        link_free += rtt + s / MB
        decoder_free = max(link_free, decoder_free) + decode
    assert math.isclose(result.ttft_s, decoder_free, rel_tol=1e-9, abs_tol=1e-9)


def test_links_with_only_start_transfer_work_through_the_default_send():
    class FutureOnly(Link):
        def __init__(self, inner):
            self.inner = inner
            self.rtt_s = inner.rtt_s

        def start_transfer(self, nbytes):
            return self.inner.start_transfer(nbytes)

    loop = VirtualTimeLoop()
    link = FutureOnly(SimPyLink(loop.env, ONE_MB_PER_S, rtt_s=0.1))
    engine = StreamingEngine(FixedLevelPolicy("small"), big_small_menus(3), link, slo_s=9.0)
    result = loop.run_until_complete(engine.run())
    assert result.ttft_s == pytest.approx(3.8)


def test_a_failed_transfer_ends_the_session_with_its_error():
    class Broken(Link):
        def start_transfer(self, nbytes):
            future = asyncio.get_running_loop().create_future()
            future.set_exception(ConnectionResetError("peer went away"))
            return future

    loop = VirtualTimeLoop()
    with pytest.raises(ConnectionResetError, match="peer went away"):
        engine = StreamingEngine(FixedLevelPolicy("small"), big_small_menus(2), Broken(), slo_s=1.0)
        loop.run_until_complete(engine.run())


class _Concurrent(FixedLevelPolicy):
    """`FixedLevelPolicy` keeping `k` transfers in flight."""

    def __init__(self, level: str, k: int) -> None:
        super().__init__(level)
        self.max_inflight = k


def test_several_requests_in_flight_share_the_link_and_save_round_trips():
    # 3 x 1 MB at 1 MB/s with a 0.5 s RTT: one at a time pays three RTTs; three at once share the link after one
    one = run(_Concurrent("small", 1), big_small_menus(3, decode_s=0.0), rtt_s=0.5)
    three = run(_Concurrent("small", 3), big_small_menus(3, decode_s=0.0), rtt_s=0.5)
    assert [c.transfer_end_s for c in one.chunks] == pytest.approx([1.5, 3.0, 4.5])
    assert [c.transfer_start_s for c in three.chunks] == pytest.approx([0.0, 0.0, 0.0])
    assert [c.transfer_end_s for c in three.chunks] == pytest.approx([3.5, 3.5, 3.5])  # fair share, one RTT
    assert three.ttft_s == pytest.approx(3.5) and one.ttft_s == pytest.approx(4.5)
    two = run(_Concurrent("small", 2), big_small_menus(3, decode_s=0.0), rtt_s=0.5)
    assert sorted(c.transfer_end_s for c in two.chunks) == pytest.approx([2.5, 2.5, 4.0])


def test_the_dry_run_refuses_several_requests_in_flight():
    from kvcast.policies.base import Session
    from kvcast.policies.dryrun import dry_run
    from kvcast.policies.planning import ConstantThroughput

    with pytest.raises(PolicyError, match="one at a time"):
        dry_run(_Concurrent("small", 2), Session(big_small_menus(2), slo_s=1.0), ConstantThroughput(8e6, 0.0))


class _LoadsOneByOneThenWatches(Policy):
    """Loads chunk 0, then, when the link is idle again, chunk 1; records the observation that follows (the
    compute unit is idle, so the engine asks again at once) and loads chunk 2 then."""

    def reset(self, session):
        super().reset(session)
        self.watched = None

    def decide(self, obs):
        if obs.link_idle:
            return Decision(obs.pending[0], "small")
        if len(obs.samples) == 1 and self.watched is None:
            self.watched = obs
        return None


@pytest.mark.parametrize("executor", ["engine", "dry run"])
def test_link_busy_estimate_counts_the_round_trip_once(executor):
    # 1 MB chunks at 1 MB/s with a 0.5 s RTT: chunk 0 takes 1.5 s (goodput 8e6/1.5 bit/s); chunk 1 starts at 1.5
    # and ends at 1.5 + 0.5 + 1.0 = 3.0. Dividing by the goodput (RTT inside) and adding the RTT again said 3.5.
    menus = big_small_menus(3, decode_s=0.0)
    policy = _LoadsOneByOneThenWatches()
    if executor == "engine":
        run(policy, menus, rtt_s=0.5)
    else:
        from kvcast.policies.base import Session
        from kvcast.policies.dryrun import dry_run
        from kvcast.policies.planning import ConstantThroughput

        dry_run(policy, Session(menus, slo_s=10.0, rtt_s=0.5), ConstantThroughput(8e6, 0.5))
    obs = policy.watched
    assert obs.now_s == pytest.approx(1.5) and obs.actions[:2] == ("small", "small")
    assert obs.link_busy_until_s == pytest.approx(3.0)


def test_a_text_chunk_over_a_lossy_prefix_scores_part_of_its_loss():
    plan = [(0, "small"), (1, TEXT), (2, "small")]
    lossless = run(QueuedPlan(plan), big_small_menus(3), rtt_s=0.1)
    assert [c.quality_loss for c in lossless.chunks] == [0.01, 0.0, 0.01]  # the default: text is exact
    loop = VirtualTimeLoop()
    link = SimPyLink(loop.env, ONE_MB_PER_S, rtt_s=0.1)
    engine = StreamingEngine(QueuedPlan(plan), big_small_menus(3), link, slo_s=10.0, lossy_prefix_ratio=0.5)
    scored = loop.run_until_complete(engine.run())
    assert [c.quality_loss for c in scored.chunks] == pytest.approx([0.01, 0.005, 0.01])
    assert scored.quality_loss == pytest.approx(0.025 / 3)
    assert scored.ttft_s == lossless.ttft_s  # scoring only
    from kvcast.policies.base import Session
    from kvcast.policies.dryrun import dry_run
    from kvcast.policies.planning import ConstantThroughput

    dry = dry_run(QueuedPlan(plan), Session(big_small_menus(3), slo_s=10.0, rtt_s=0.1, lossy_prefix_ratio=0.5),
                  ConstantThroughput(8e6, 0.1))
    assert dry.quality_loss == pytest.approx(scored.quality_loss)
    with pytest.raises(ValueError, match="lossy_prefix_ratio"):
        StreamingEngine(QueuedPlan(plan), big_small_menus(3), link, slo_s=1.0, lossy_prefix_ratio=-1.0)
