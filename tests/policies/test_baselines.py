"""The published and ABR baselines: cake, cake-cachegen, rate and slack."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvcast.policies.base import TEXT, ChunkMenu, LevelOption, Observation, Session, ThroughputSample
from kvcast.policies.cake import CakePolicy
from kvcast.policies.cake_cachegen import CakeCacheGenPolicy, compute_reach
from kvcast.policies.rate import RatePolicy
from kvcast.policies.registry import default_registry
from kvcast.policies.slack import SlackPolicy, size_ladder
from kvcast.streamer.simulate import simulate_session
from kvcast.traces.trace import Trace
from tests.factories import PLANNING_SETTINGS, make_menus

SPECS = ("cake", "cake:l1", "cake:level=l0+inflight=3", "cake:inflight=1", "cake-cachegen",
         "cake-cachegen:levels=menu+window=2", "rate", "rate:1.0", "rate:safety=0.5+window=1", "slack",
         "slack:reservoir=0.3+cushion=0.4")


def test_registry_creates_every_baseline_and_rejects_bad_options():
    reg = default_registry()
    for spec in SPECS:
        assert reg.create(spec).name == spec.split(":")[0]
    assert reg.create("cake:int8").level == "int8" and reg.create("cake").max_inflight == 2
    assert reg.create("cake:level=raw+inflight=4").max_inflight == 4
    assert reg.create("rate:0.8").safety == 0.8
    for bad in ("cake:inflight=0", "cake:speed=2", "cake-cachegen:window=0", "cake-cachegen:levels=all",
                "cake-cachegen:x=1", "rate:1.5", "rate:fast", "rate:window=1.5", "slack:cushion=0", "slack:y=1"):
        with pytest.raises(ValueError):
            reg.create(bad)
    with pytest.raises(ValueError, match="no level 'zz'"):
        reg.create("cake:zz").reset(Session(make_menus(random.Random(0), 3, 2), slo_s=1.0))


def random_trace(rng: random.Random) -> Trace:
    times = [0.0] + sorted(rng.uniform(0.0, 4.0) for _ in range(rng.randint(0, 8))) + [5.0]
    rates = [rng.choice([rng.uniform(1e6, 3e7), rng.uniform(3e7, 4e8)]) for _ in range(len(times) - 1)]
    return Trace(times, rates, wrap=True)


def max_in_flight(result) -> int:
    events = []
    for c in result.chunks:
        if c.transfer_start_s is not None:
            events += [(c.transfer_end_s, -1), (c.transfer_start_s, 1)]
    most = live = 0
    for _, step in sorted(events):
        live += step
        most = max(most, live)
    return most


@PLANNING_SETTINGS
@given(seed=st.integers(0, 10**6), n=st.integers(1, 9), levels=st.integers(1, 4), spec=st.sampled_from(SPECS),
       slo=st.floats(0.05, 3.0), rtt=st.sampled_from([0.0, 0.002, 0.03]), prior=st.booleans(),
       monotone=st.booleans())
def test_baselines_never_decide_illegally_never_stall_and_decide_each_chunk_once(seed, n, levels, spec, slo, rtt,
                                                                                 prior, monotone):
    rng = random.Random(seed)
    menus = make_menus(rng, n, levels, monotone=monotone)
    if spec.startswith("cake:l") and levels < 2:
        spec = "cake:l0"
    trace = random_trace(rng)
    policy = default_registry().create(spec)
    result = simulate_session(policy, menus, trace, slo_s=slo, rtt_s=rtt, offset_s=rng.uniform(0, 5),
                              prior_throughput_bps=trace.mean_bps if prior else None)
    # the engine validates every decision (PolicyError) and detects stalls (PolicyStalled); each chunk once:
    actions = [c.action for c in result.chunks]
    assert None not in actions and len(result.chunks) == n
    assert all(c.decided_s is not None and c.ready_s is not None for c in result.chunks)
    assert max_in_flight(result) <= policy.max_inflight
    if spec.startswith("cake"):
        # the two pointers: text chunks form a prefix, loaded ones a suffix, loaded from the back
        k = sum(a == TEXT for a in actions)
        assert actions[:k] == [TEXT] * k or spec.startswith("cake-cachegen")
        loads = [c for c in result.chunks if c.action != TEXT]
        if spec.startswith("cake:"):
            assert all(a != TEXT for a in actions[k:])
            by_decision = sorted(loads, key=lambda c: (c.decided_s, -c.index))
            assert [c.index for c in by_decision] == sorted((c.index for c in loads), reverse=True)
            assert len({c.action for c in loads}) <= 1
        if spec == "cake":  # default level: the least-loss one
            best = min(o.quality_loss for o in menus[0].levels)
            assert all(menus[0].option(c.action).quality_loss == best for c in loads)


def test_cake_pointers_meet_with_compute_from_the_front_and_batched_loads_from_the_back():
    # 6 chunks; recompute 0.1 s each; 1 MB at 80 Mbit/s = 0.1 s per load + 0.01 s RTT
    options = (LevelOption("raw", 1_000_000, 0.0, 0.0), LevelOption("q", 250_000, 0.0, 0.05))
    menus = tuple(ChunkMenu(i, 100 * i, 100, options, 0.1) for i in range(6))
    trace = Trace([0.0, 100.0], [8e7])
    one = simulate_session(CakePolicy("inflight=1"), menus, trace, slo_s=10.0, rtt_s=0.01)
    assert [c.action for c in one.chunks] == [TEXT] * 3 + ["raw"] * 3  # they meet in the middle
    assert [round(c.transfer_start_s, 9) for c in one.chunks[3:]] == [0.22, 0.11, 0.0]
    assert one.ttft_s == pytest.approx(0.33)
    two = simulate_session(CakePolicy(), menus, trace, slo_s=10.0, rtt_s=0.01)
    assert [c.action for c in two.chunks] == [TEXT] * 3 + ["raw"] * 3
    starts = sorted(c.transfer_start_s for c in two.chunks[3:])
    assert starts[:2] == [0.0, 0.0]  # two requests at once
    assert two.ttft_s < one.ttft_s  # the second request's RTT overlaps the first transfer
    low = simulate_session(CakePolicy("q"), menus, trace, slo_s=10.0, rtt_s=0.01)
    assert {c.action for c in low.chunks if c.action != TEXT} == {"q"}
    assert sum(c.action == TEXT for c in low.chunks) < 3  # smaller chunks: the link takes more of them


def observation(session: Session, *, now: float, pending, samples=(), link_idle=True, compute_idle=True,
                compute_free=None, link_busy=None, actions=None, ready=None) -> Observation:
    n = len(session.menus)
    return Observation(now_s=now, session=session, pending=tuple(pending),
                       actions=tuple(actions or [None if i in pending else TEXT for i in range(n)]),
                       ready=tuple(ready or [False] * n), link_idle=link_idle, compute_idle=compute_idle,
                       link_busy_until_s=now if link_busy is None else link_busy, decoder_free_at_s=now,
                       compute_free_at_s=now if compute_free is None else compute_free,
                       samples=tuple(samples))


LEVELS = (("hi", 4_000_000, 0.0), ("mid", 2_000_000, 0.01), ("lo", 1_000_000, 0.05))


def toy(n: int, recompute_s: float = 1.0) -> tuple[ChunkMenu, ...]:
    options = tuple(LevelOption(name, b, 0.0, q) for name, b, q in LEVELS)
    return tuple(ChunkMenu(i, 100 * i, 100, options, recompute_s) for i in range(n))


@pytest.mark.parametrize("tput, expected", [
    (1.01 * 8e6 * 3 * 4 / 0.9, "hi"),   # the last 3 chunks x 4 MB in 0.9 s
    (0.99 * 8e6 * 3 * 4 / 0.9, "mid"),
    (1.01 * 8e6 * 3 * 2 / 0.9, "mid"),
    (0.99 * 8e6 * 3 * 2 / 0.9, "lo"),
])
def test_cake_cachegen_loads_the_highest_level_that_lets_the_chunks_compute_cannot_reach_finish(tput, expected):
    # 5 chunks, recompute 0.45 s each, SLO 1.0 s, compute free at 0.1: it reaches 2 chunks (0.55, 1.0); the
    # link must load the other 3 by the SLO, from now (0.1)
    session = Session(toy(5, 0.45), slo_s=1.0, prior_throughput_bps=tput)
    policy = CakeCacheGenPolicy("prior_error=0")
    policy.reset(session)
    obs = observation(session, now=0.1, pending=range(5), compute_idle=False, compute_free=0.1)
    assert compute_reach(obs, 1.0) == 2
    decision = policy.decide(obs)
    assert (decision.chunk, decision.action) == (4, expected)
    assert policy.decide(observation(session, now=0.1, pending=range(5))).action == TEXT  # compute idle: front
    assert policy.decide(observation(session, now=0.1, pending=range(5))).chunk == 0


def test_cake_cachegen_gives_the_chunk_to_the_gpu_when_no_level_fits_and_the_gpu_is_sooner():
    session = Session(toy(3, 0.1), slo_s=0.2, prior_throughput_bps=8e6)  # lo: 1 s on the link
    policy = CakeCacheGenPolicy("prior_error=0")
    policy.reset(session)
    obs = observation(session, now=0.0, pending=(1, 2), compute_idle=False, compute_free=0.1)
    assert policy.decide(obs).action == TEXT  # GPU: 0.1 + 0.2 = 0.3 s < 1 s
    slow_gpu = Session(toy(3, 5.0), slo_s=0.2, prior_throughput_bps=8e6)
    policy.reset(slow_gpu)
    assert policy.decide(observation(slow_gpu, now=0.0, pending=(1, 2), compute_idle=False)).action == "lo"


@pytest.mark.parametrize("tput, safety, expected", [
    (8e6 * 4 * 4 / 1.0, 1.0, "hi"),    # share: 1.0 s / 4 chunks = 0.25 s; hi = 4 MB needs 128 Mbit/s
    (8e6 * 4 * 4 / 1.0, 0.9, "mid"),   # the safety factor takes hi out
    (8e6 * 4 * 1 / 1.0, 1.0, "lo"),
    (8e6, 1.0, "lo"),                  # nothing fits: the smallest (text only where the GPU is sooner)
])
def test_rate_takes_the_highest_level_that_fits_the_chunks_share_of_the_time_left(tput, safety, expected):
    session = Session(toy(6, 100.0), slo_s=2.0, prior_throughput_bps=tput)
    policy = RatePolicy(f"safety={safety}")
    policy.reset(session)
    decision = policy.decide(observation(session, now=1.0, pending=(2, 3, 4, 5)))
    assert (decision.chunk, decision.action) == (2, expected)


def test_rate_recomputes_where_the_gpu_is_sooner_and_waits_for_a_busy_link():
    session = Session(toy(4, 0.05), slo_s=2.0, prior_throughput_bps=8e6)  # lo: 1 s on the link; text 0.05 s
    policy = RatePolicy()
    policy.reset(session)
    assert policy.decide(observation(session, now=0.0, pending=range(4))).action == TEXT
    slow_gpu = Session(toy(4, 10.0), slo_s=2.0, prior_throughput_bps=8e6)
    policy.reset(slow_gpu)
    assert policy.decide(observation(slow_gpu, now=0.0, pending=range(4), link_idle=False)) is None
    assert policy.decide(observation(slow_gpu, now=0.0, pending=range(4))).action == "lo"
    # the estimate: safety x harmonic mean of payload throughputs (RTT out)
    policy.reset(Session(toy(4), slo_s=2.0, rtt_s=0.5))
    samples = (ThroughputSample(0, 1_000_000, 0.0, 1.5), ThroughputSample(1, 1_000_000, 1.5, 3.5))
    assert policy.estimate_bps(observation(policy.session, now=3.5, pending=(2, 3), samples=samples)) == \
        pytest.approx(0.9 * 2 / (1 / 8e6 + 1 / 5.3333333e6), rel=1e-6)


def test_slack_maps_the_slack_per_chunk_through_reservoir_and_cushion():
    menus = toy(4, 100.0)
    assert size_ladder(menus, ("hi", "mid", "lo")) == ("lo", "mid", "hi")
    session = Session(menus, slo_s=4.0, prior_throughput_bps=8e6)  # lo: 1 s per chunk on the link
    policy = SlackPolicy("reservoir=0.1+cushion=0.9")
    policy.reset(session)
    # 2 chunks left at t: slack = 4 - t - 2 s, per chunk over a chunk's share (1 s): x = (2 - t) / 2
    for now, x, level in ((1.9, 0.05, "lo"), (1.0, 0.5, "lo"), (0.5, 0.75, "mid"), (0.0, 1.0, "hi")):
        obs = observation(session, now=now, pending=(2, 3))
        assert policy.slack_ratio(obs, 8e6) == pytest.approx(x)
        assert policy.decide(obs).action == level, now
