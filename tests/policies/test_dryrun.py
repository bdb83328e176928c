"""The dry-run executor (`kvcast.policies.dryrun`) against the streaming engine: same decisions, same times."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvcast.policies.base import (
    TEXT,
    ChunkMenu,
    Decision,
    LevelOption,
    Policy,
    PolicyError,
    PolicyStalled,
    Session,
)
from kvcast.policies.dryrun import dry_run
from kvcast.policies.planning import ConstantThroughput, KnownFuture
from kvcast.policies.registry import default_registry
from kvcast.streamer.simulate import simulate_session
from kvcast.traces.trace import Trace
from tests.factories import PLANNING_SETTINGS, Idle, QueuedPlan, ScriptedAnswers, make_menus


def uniform_menus(n: int, raw_bytes: int, decode_s: float, recompute_s: float) -> tuple[ChunkMenu, ...]:
    """`n` equal chunks with one lossless level, "raw"."""
    return tuple(ChunkMenu(i, 100 * i, 100, (LevelOption("raw", raw_bytes, decode_s, 0.0),), recompute_s)
                 for i in range(n))


def engine_and_dry_run(make_policy, menus, trace: Trace, *, slo_s: float, rtt_s: float,
                       prior_bps: float | None):
    """Run fresh policies from `make_policy` on the engine (`trace`, one flow) and on the dry run."""
    engine = simulate_session(make_policy(), menus, trace, slo_s=slo_s, rtt_s=rtt_s,
                              prior_throughput_bps=prior_bps)

    def transfer_end(start_s: float, nbytes: int) -> float:
        return trace.transfer_end_s(start_s + rtt_s, nbytes * 8.0)

    session = Session(menus, slo_s, rtt_s, prior_bps, future_bandwidth_bps=trace.bandwidth_at,
                      future_transfer_end_s=transfer_end)
    dry = dry_run(make_policy(), session, KnownFuture(transfer_end))
    return engine, dry


def assert_same_session(engine, dry):
    assert [c.action for c in engine.chunks] == list(dry.actions)
    assert [c.decided_s for c in engine.chunks] == pytest.approx(list(dry.decision_times_s), abs=1e-9)
    assert [c.ready_s for c in engine.chunks] == pytest.approx(list(dry.ready_s), abs=1e-9)
    assert engine.ttft_s == pytest.approx(dry.ttft_s, abs=1e-9)
    assert engine.quality_loss == pytest.approx(dry.quality_loss)
    loads = sorted(dry.samples, key=lambda s: s.start_s)
    assert [c.index for c in sorted(engine.chunks, key=lambda c: c.transfer_start_s or -1.0)
            if c.transfer_start_s is not None] == [s.chunk for s in loads]


def test_text_chunks_run_lowest_index_first_whatever_the_decision_order():
    # recompute 0.1 s each; chunk 4 loads in 0.25 s (1 Gbit/s), no decode
    menus = uniform_menus(5, 31_250_000, 0.0, 0.1)
    plan = [(3, TEXT), (1, TEXT), (2, TEXT), (0, TEXT), (4, "raw")]  # all queued at t = 0
    trace = Trace([0.0, 1e6], [1e9])
    engine, dry = engine_and_dry_run(lambda: QueuedPlan(plan), menus, trace, slo_s=1.0, rtt_s=0.0, prior_bps=None)
    assert dry.decision_order == (3, 1, 2, 0, 4) and dry.decision_times_s == (0.0,) * 5
    # compute runs 0, 1, 2, 3 back to back (a FIFO unit would wait forever on chunk 3's prefix)
    assert dry.ready_s == pytest.approx((0.1, 0.2, 0.3, 0.4, 0.25))
    assert_same_session(engine, dry)


def test_waiting_policy_is_asked_again_when_the_next_chunk_is_ready():
    class LoadThenWaitForIt(Policy):
        """Loads chunk 1, then answers None until it is ready, then recomputes chunk 0."""

        def decide(self, obs):
            if obs.actions[1] is None:
                return Decision(1, "raw")
            return Decision(0, TEXT) if obs.ready[1] else None

    menus = uniform_menus(2, 12_500_000, 0.05, 0.2)
    engine, dry = engine_and_dry_run(LoadThenWaitForIt, menus, Trace([0.0, 1e6], [1e9]), slo_s=1.0,
                                     rtt_s=0.01, prior_bps=1e9)
    # transfer 0-0.11 s, decode to 0.16 s: chunk 0 is decided at the decode's end (a wake, not an event)
    assert dry.decision_times_s == pytest.approx((0.16, 0.0))
    assert dry.ready_s == pytest.approx((0.36, 0.16))
    assert_same_session(engine, dry)


def test_policy_that_waits_for_nothing_stalls():
    menus = make_menus(random.Random(0), 2, 1)
    with pytest.raises(PolicyStalled, match="returned None"):
        dry_run(Idle(), Session(menus, 1.0), ConstantThroughput(1e9))


def engine_and_dry_run_errors(make_policy, menus, trace: Trace) -> tuple[BaseException, BaseException]:
    """The exceptions that fresh policies from `make_policy` raise on the engine and on the dry run."""
    with pytest.raises(Exception) as engine:
        simulate_session(make_policy(), menus, trace, slo_s=1.0)

    def transfer_end(start_s: float, nbytes: int) -> float:
        return trace.transfer_end_s(start_s, nbytes * 8.0)

    session = Session(menus, 1.0, future_bandwidth_bps=trace.bandwidth_at, future_transfer_end_s=transfer_end)
    with pytest.raises(Exception) as dry:
        dry_run(make_policy(), session, KnownFuture(transfer_end))
    return engine.value, dry.value


@pytest.mark.parametrize("answers, message", [
    ([Decision(0, "zz")], r"policy 'scripted' chose level 'zz' for chunk 0 at t=0 s; the menu has \['l0', 'l1'\]"),
    ([Decision(0, "l0"), Decision(0, "l1")], r"decided chunk 0 at t=0 s, which is not pending \(pending: \[1, 2\]\)"),
    ([Decision(0, TEXT), Decision(0, TEXT)], "decided chunk 0 at t=0 s, which is not pending"),
    ([Decision(3, TEXT)], "decided chunk 3 at t=0 s, which is not pending"),
    ([Decision(-1, "l0")], "decided chunk -1 at t=0 s, which is not pending"),
    ([(0, "l0")], r"returned \(0, 'l0'\) at t=0 s; expected a Decision or None"),
    (["l0"], "expected a Decision or None"),
    ([], r"returned None at t=0 s with nothing in flight \(pending chunks \[0, 1, 2\]\); it would wait forever"),
])
def test_the_same_policy_bug_raises_the_same_policy_error_in_the_engine_and_the_dry_run(answers, message):
    menus = make_menus(random.Random(0), 3, 2)
    engine, dry = engine_and_dry_run_errors(lambda: ScriptedAnswers(answers), menus, Trace([0.0, 1e6], [1e9]))
    assert isinstance(engine, PolicyError) and isinstance(dry, PolicyError)
    assert type(engine) is type(dry)
    assert str(engine) == str(dry)
    assert re.search(message, str(dry)), str(dry)


def test_a_policy_that_stalls_after_loading_raises_policy_stalled_in_both():
    menus = make_menus(random.Random(1), 3, 2)
    engine, dry = engine_and_dry_run_errors(lambda: ScriptedAnswers([Decision(2, "l1")]), menus,
                                            Trace([0.0, 1e6], [1e9]))
    for error in (engine, dry):
        assert isinstance(error, PolicyStalled) and isinstance(error, PolicyError)
        assert re.search(r"policy 'scripted' returned None at t=\S+ s with nothing in flight \(pending chunks "
                         r"\[0, 1\]\); it would wait forever", str(error)), str(error)


def test_engine_and_dry_run_share_one_policy_error_class():
    from kvcast import streamer
    from kvcast.streamer import engine

    assert streamer.PolicyError is engine.PolicyError is PolicyError
    assert issubclass(PolicyStalled, PolicyError) and issubclass(PolicyError, RuntimeError)


def test_dry_run_refuses_a_policy_that_needs_the_future_without_one():
    class Oracle(Policy):
        name = "needs-future"
        needs_future = True

        def decide(self, obs):
            return None

    menus = make_menus(random.Random(0), 2, 1)
    with pytest.raises(PolicyError, match="needs the future"):
        dry_run(Oracle(), Session(menus, 1.0), ConstantThroughput(1e9))


@PLANNING_SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 8))
def test_random_plans_in_any_decision_order_match_the_engine(seed, n):
    rng = random.Random(seed)
    menus = make_menus(rng, n, 2)
    plan = [(i, rng.choice(["l0", "l1", TEXT])) for i in range(n)]
    rng.shuffle(plan)
    trace = Trace([0.0, 1e6], [rng.uniform(1e8, 1e9)])
    engine, dry = engine_and_dry_run(lambda: QueuedPlan(plan), menus, trace, slo_s=1.0,
                                     rtt_s=rng.choice([0.0, 0.003]), prior_bps=None)
    assert_same_session(engine, dry)


@PLANNING_SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 10),
       spec=st.sampled_from(["mpc", "hybrid", "oracle", "cachegen", "cachegen-code", "text", "fixed:l1"]),
       piecewise=st.booleans(), prior=st.one_of(st.none(), st.floats(1e7, 1e10)))
def test_policies_decide_the_same_in_the_dry_run_and_the_engine(seed, n, spec, piecewise, prior):
    rng = random.Random(seed)
    menus = make_menus(rng, n, 3)
    if piecewise:  # a bandwidth that changes every 50 ms
        trace = Trace([0.05 * k for k in range(201)], [rng.uniform(1e7, 2e9) for _ in range(200)])
    else:
        trace = Trace([0.0, 1e6], [rng.uniform(1e8, 1e10)])
    registry = default_registry()
    engine, dry = engine_and_dry_run(lambda: registry.create(spec), menus, trace,
                                     slo_s=rng.uniform(0.1, 2.0), rtt_s=rng.choice([0.0, 0.005]),
                                     prior_bps=prior)
    assert_same_session(engine, dry)
