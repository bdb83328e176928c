"""The planning controllers `mpc`, `hybrid`, `oracle` and the planning model they share."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kvcast.policies import mpc as M
from kvcast.policies.base import (
    TEXT,
    ChunkMenu,
    LevelOption,
    Observation,
    Session,
    ThroughputSample,
)
from kvcast.policies.dryrun import dry_run
from kvcast.policies.estimate import RobustThroughputEstimator
from kvcast.policies.hybrid import HybridPolicy
from kvcast.policies.mpc.cost import tail_evaluator
from kvcast.policies.oracle import OraclePolicy, best_plan
from kvcast.policies.planning import (
    ConstantThroughput,
    PlanState,
    parse_options,
    plan_cake,
    plan_in_order,
    simulate_plan,
)
from kvcast.policies.registry import default_registry
from kvcast.streamer.simulate import simulate_session
from kvcast.traces.trace import Trace
from tests.factories import PLANNING_SETTINGS, PlanPlayer, make_menus

# ----------------------------------------------------------------------------------------- helpers

def random_state(rng: random.Random, menus, decided_share: float) -> PlanState:
    """A mid-session state: some chunks decided (loaded) with ready estimates, resources busy a while."""
    n = len(menus)
    actions, ready = [], []
    for i in range(n):
        if rng.random() < decided_share:
            actions.append(rng.choice([o.level for o in menus[i].levels] + [TEXT]))
            ready.append(rng.uniform(0, 1))
        else:
            actions.append(None)
            ready.append(math.nan)
    now = rng.uniform(0, 0.2)
    return PlanState(now_s=now, menus=menus, actions=tuple(actions), ready_s=tuple(ready),
                     link_free_s=now + rng.choice([0.0, rng.uniform(0, 0.3)]),
                     decoder_free_s=now + rng.choice([0.0, rng.uniform(0, 0.3)]),
                     compute_free_s=now + rng.choice([0.0, rng.uniform(0, 0.3)]))


def key(result_ttft: float, quality: float, slo: float) -> tuple[float, float]:
    return (max(0.0, result_ttft - slo), quality)


# ----------------------------------------------------------------------------------------- mpc search

@PLANNING_SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 8), levels=st.integers(1, 3),
       horizon=st.integers(1, 4), weight=st.sampled_from([0.05, 1.0, 20.0, 500.0]),
       bw=st.sampled_from([0.0, 1e7, 1e8, 1e9, 1e12]), decided=st.sampled_from([0.0, 0.3]),
       monotone=st.booleans())
def test_mpc_search_picks_the_enumerated_plan(seed, n, levels, horizon, weight, bw, decided, monotone):
    rng = random.Random(seed)
    menus = make_menus(rng, n, levels, monotone=monotone)
    session = Session(menus, slo_s=rng.uniform(0.05, 2.0), rtt_s=0.001)
    state = random_state(rng, menus, decided)
    pending = state.pending
    assume(pending)
    problem = M.build_problem(M.SessionTables.of(session), pending, state, ConstantThroughput(bw, 0.001),
                              session.slo_s, weight, horizon)
    expected = M.enumerate_plan(problem)
    assert M.search_plan(problem) == expected
    # hints only seed the incumbent: any hint, same answer
    hint = tuple(rng.randrange(problem.n_actions) for _ in range(problem.horizon))
    assert M.search_plan(problem, [hint]) == expected


@PLANNING_SETTINGS
@given(seed=st.integers(0, 2**32 - 1), m=st.integers(0, 9), weight=st.sampled_from([0.01, 1.0, 20.0]))
def test_mpc_fast_tail_split_equals_trying_every_split(seed, m, weight):
    rng = random.Random(seed)
    menus = make_menus(rng, m + 1, 3)
    session = Session(menus, slo_s=rng.uniform(0.05, 1.5))
    state = PlanState.initial(session)
    problem = M.build_problem(M.SessionTables.of(session), range(m + 1), state,
                              ConstantThroughput(rng.uniform(1e7, 1e9)), session.slo_s, weight, 1)
    for _ in range(20):
        link, ready, q = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0, 100)
        for b in range(problem.n_actions):
            level = problem.text_tail_level if b == problem.n_levels else b
            fast = tail_evaluator(problem, b)(link, ready, q)
            assert fast == M.tail_split(problem, level, link, ready, q)[1]


def test_mpc_model_matches_the_planning_model_without_tail():
    """With every undecided chunk in the horizon, MPC's cost is the planning model's TTFT and quality."""
    rng = random.Random(7)
    for _ in range(30):
        menus = make_menus(rng, 4, 2)
        session = Session(menus, slo_s=rng.uniform(0.1, 1.0))
        tp = ConstantThroughput(rng.uniform(1e7, 1e9))
        state = PlanState.initial(session)
        tables = M.SessionTables.of(session)
        problem = M.build_problem(tables, range(4), state, tp, session.slo_s, 20.0, 4)
        for plan in itertools.product(range(problem.n_actions), repeat=4):
            names = [(*tables.names, TEXT)[a] for a in plan]
            res = simulate_plan(state, list(zip(range(4), names)), tp)
            expected = res.quality_loss + problem.mu * res.overrun_s(session.slo_s)
            assert M.plan_cost(problem, plan) == pytest.approx(expected, rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------------------- invariants

POLICIES = ("mpc", "hybrid", "oracle")


def run(spec: str, menus, slo: float, tp: ConstantThroughput, prior: float | None):
    session = Session(menus, slo_s=slo, rtt_s=tp.rtt_s, prior_throughput_bps=prior,
                      future_transfer_end_s=tp.transfer_end_s)
    return dry_run(default_registry().create(spec), session, tp)


@PLANNING_SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 10), spec=st.sampled_from(POLICIES),
       bw=st.floats(1e6, 1e10), prior=st.one_of(st.none(), st.floats(1e6, 1e10)))
def test_decisions_are_valid_and_complete(seed, n, spec, bw, prior):
    rng = random.Random(seed)
    menus = make_menus(rng, n, rng.randint(1, 4))
    result = run(spec, menus, rng.uniform(0.05, 3.0), ConstantThroughput(bw, 0.002), prior)
    # dry_run validates every decision (pending chunk, known level); every chunk decided exactly once
    assert sorted(result.decision_order) == list(range(n))
    assert all(a == TEXT or a in {o.level for o in menus[i].levels} for i, a in enumerate(result.actions))
    assert result.ttft_s >= max(result.ready_s) - 1e-12


@pytest.mark.parametrize("monotone", [True, False])
@pytest.mark.parametrize("spec", POLICIES)
def test_huge_bandwidth_means_the_best_level_everywhere(spec, monotone):
    rng = random.Random(3)
    for _ in range(10):
        menus = make_menus(rng, rng.randint(1, 8), 3, decode=False, monotone=monotone)
        slo = min(m.recompute_s for m in menus) * 0.9  # recomputing any chunk misses it; loads take ~RTTs
        tp = ConstantThroughput(1e15, 1e-6)
        result = run(spec, menus, slo, tp, 1e15)
        # the best quality on every chunk (levels of equal loss are equally good), wherever it is on the menu
        assert TEXT not in result.actions
        assert [m.option(a).quality_loss for m, a in zip(menus, result.actions)] == \
            [min(o.quality_loss for o in m.levels) for m in menus]


@pytest.mark.parametrize("spec", POLICIES)
def test_zero_bandwidth_means_text_everywhere(spec):
    rng = random.Random(4)
    for _ in range(10):
        menus = make_menus(rng, rng.randint(1, 8), 3)
        result = run(spec, menus, 0.5, ConstantThroughput(0.0, 0.001), 0.0)
        assert set(result.actions) == {TEXT}
        assert result.ttft_s == pytest.approx(sum(m.recompute_s for m in menus))


# ----------------------------------------------------------------------------------------- oracle

def family_keys(menus, actions, slo, tp) -> list[tuple[float, float]]:
    """A realised assignment played in the oracle's two orders: in order, and (for a text prefix) Cake's."""
    state = PlanState.initial(Session(menus, slo))
    loads = [(i, a) for i, a in enumerate(actions) if a != TEXT]
    texts = [(i, TEXT) for i, a in enumerate(actions) if a == TEXT]
    keys = []
    res = simulate_plan(state, loads + texts, tp)
    keys.append(key(res.ttft_s, res.quality_loss, slo))
    if all(a == TEXT for a in actions[:len(texts)]):
        res = simulate_plan(state, loads[::-1] + texts, tp)
        keys.append(key(res.ttft_s, res.quality_loss, slo))
    return keys


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 8), levels=st.integers(1, 3),
       decode=st.booleans())
def test_oracle_is_never_worse_than_any_policy(seed, n, levels, decode):
    rng = random.Random(seed)
    menus = make_menus(rng, n, levels, decode)
    slo = rng.uniform(0.05, 1.5)
    tp = ConstantThroughput(rng.choice([1e6, 1e7, 1e8, 1e9]) * rng.uniform(1, 10), 0.002)
    prior = tp.bps * rng.uniform(0.3, 3)
    oracle = run("oracle", menus, slo, tp, prior)
    ok = key(oracle.ttft_s, oracle.quality_loss, slo)
    # the oracle does what it planned: its dry run equals its plan
    plan = best_plan(PlanState.initial(Session(menus, slo)), tp, slo)
    assert oracle.ttft_s == pytest.approx(plan.ttft_s, abs=1e-9)
    assert oracle.quality_loss == pytest.approx(plan.quality_loss, abs=1e-12)
    specs = ["mpc", "hybrid", "cachegen", "text", "raw", "mpc:margin=0+prior_error=0",
             "hybrid:margin=0+prior_error=0"] + [f"fixed:l{a}" for a in range(levels)]
    for spec in specs:
        if spec == "raw":
            continue  # these menus have no raw level
        other = run(spec, menus, slo, tp, prior)
        theirs = key(other.ttft_s, other.quality_loss, slo)
        # exact over its plan families: never worse than the policy's assignment played in them
        for k in family_keys(menus, other.actions, slo, tp):
            assert ok[0] <= k[0] + 1e-9 and (ok[0] < k[0] - 1e-9 or ok[1] <= k[1] + 1e-12), (spec, ok, k)
        if not decode:  # without decoding the load order does not matter: never worse than what they did
            assert ok[0] <= theirs[0] + 1e-9 and (ok[0] < theirs[0] - 1e-9 or ok[1] <= theirs[1] + 1e-12), \
                (spec, ok, theirs)


def brute_force_in_order(state: PlanState, tp, slo) -> tuple[float, float, float]:
    pending = state.pending
    menus = state.menus
    best = (math.inf, math.inf, math.inf)
    for acts in itertools.product(*[[o.level for o in menus[c].levels] + [TEXT] for c in pending]):
        loads = [(c, a) for c, a in zip(pending, acts) if a != TEXT]
        texts = [(c, a) for c, a in zip(pending, acts) if a == TEXT]
        res = simulate_plan(state, loads + texts, tp)
        best = min(best, (res.overrun_s(slo), res.quality_loss, res.ttft_s))
    return best


def brute_force_cake(state: PlanState, tp, slo) -> tuple[float, float, float]:
    pending = state.pending
    menus = state.menus
    best = (math.inf, math.inf, math.inf)
    for j in range(len(pending) + 1):
        back = pending[j:]
        for acts in itertools.product(*[[o.level for o in menus[c].levels] for c in back]):
            loads = list(zip(back, acts))[::-1]
            res = simulate_plan(state, loads + [(c, TEXT) for c in pending[:j]], tp)
            best = min(best, (res.overrun_s(slo), res.quality_loss, res.ttft_s))
    return best


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 5), levels=st.integers(1, 3), monotone=st.booleans())
def test_oracle_searches_are_exact_over_their_families(seed, n, levels, monotone):
    rng = random.Random(seed)
    menus = make_menus(rng, n, levels, monotone=monotone)
    slo = rng.uniform(0.02, 1.0)
    tp = ConstantThroughput(rng.uniform(1e7, 1e9), 0.001)
    state = PlanState.initial(Session(menus, slo))
    got = plan_in_order(state, tp, slo)
    want = brute_force_in_order(state, tp, slo)
    assert got.key[0] == pytest.approx(want[0], abs=1e-9) and got.key[1] == pytest.approx(want[1], abs=1e-12)
    got = plan_cake(state, tp, slo)
    want = brute_force_cake(state, tp, slo)
    assert got.key[0] == pytest.approx(want[0], abs=1e-9) and got.key[1] == pytest.approx(want[1], abs=1e-12)


def test_oracle_follows_its_plan_on_a_real_trace_link():
    """On the engine over a SimPy link replaying a varying trace, the oracle's plan is exact: no re-plan."""
    from kvcast.streamer.menus import ModelShape, build_menus, recompute_cost
    from kvcast.streamer.profile import default_profile

    menus = build_menus(default_profile(), ModelShape.named("mistral-7b"), 14000, 1536,
                        recompute_cost("h100/mistral-7b"))
    rng = random.Random(5)
    times = [0.0] + sorted(rng.uniform(0, 3) for _ in range(30)) + [3.5]
    trace = Trace(times, [rng.uniform(0.2e9, 6e9) for _ in range(len(times) - 1)], wrap=True)
    policy = OraclePolicy()
    result = simulate_session(policy, menus, trace, slo_s=0.6, rtt_s=0.01, efficiency=0.95,
                              overhead_bytes=400)
    assert policy.replans == 0
    assert result.ttft_s == pytest.approx(policy.plan.ttft_s, abs=1e-9)
    for spec in ("text", "cachegen", "mpc", "hybrid"):
        other = simulate_session(default_registry().create(spec), menus, trace, slo_s=0.6, rtt_s=0.01,
                                 efficiency=0.95, overhead_bytes=400, prior_throughput_bps=2e9)
        assert result.overrun_s <= other.overrun_s + 1e-9


# ----------------------------------------------------------------------------------------- hybrid

def meet_menus(recompute, link_s: float) -> tuple[ChunkMenu, ...]:
    """Chunks with one lossless level that takes `link_s` on a 1 Gbit/s link and no decoding."""
    nbytes = int(link_s * 1e9 / 8)
    return tuple(ChunkMenu(i, 100 * i, 100, (LevelOption("raw", nbytes, 0.0, 0.0),), r)
                 for i, r in enumerate(recompute))


def test_hybrid_meets_where_compute_and_load_balance():
    # recompute 0.10, 0.12, ..., 0.24 s; loading a chunk 0.15 s. Text prefix k, loads from the back:
    # TTFT(k) = max(sum of the first k recomputes, 0.15 * (8 - k)) = 0.75, 0.60, 0.70 for k = 3, 4, 5,
    # so the meet point is k = 4 with TTFT 0.60 s (the SLO cannot be met: the earliest TTFT wins).
    menus = meet_menus([0.10 + 0.02 * i for i in range(8)], 0.15)
    tp = ConstantThroughput(1e9, 0.0)
    result = run("hybrid:margin=0+prior_error=0", menus, 0.01, tp, 1e9)
    assert result.actions == (TEXT,) * 4 + ("raw",) * 4
    assert result.ttft_s == pytest.approx(0.60)
    # loads go from the back, text from the front
    loads = [c for c in result.decision_order if result.actions[c] != TEXT]
    assert loads == [7, 6, 5, 4]


def test_hybrid_moves_the_meet_point_when_the_link_is_slower_than_predicted():
    menus = meet_menus([0.10 + 0.02 * i for i in range(8)], 0.15)
    slow = ConstantThroughput(1e9 * 0.15 / 0.28, 0.0)  # each load takes 0.28 s, not the predicted 0.15 s
    result = run("hybrid:margin=0+prior_error=0", menus, 0.01, slow, 1e9)
    # planned at first for 0.15 s loads (k = 4); for the real link max(sum r[:k], 0.28 * (8 - k)) is
    # 0.84 at k = 5 and 0.90 at k = 6: the text prefix grew to the real meet point
    assert result.actions == (TEXT,) * 5 + ("raw",) * 3
    assert result.ttft_s == pytest.approx(0.84)


def test_hybrid_uses_levels_to_meet_the_slo_with_the_best_quality():
    # 6 chunks recomputed in 0.1 s each; a chunk loads in 0.3 s at "hi" (lossless), 0.1 s at "lo" (loss 0.05)
    menus = tuple(ChunkMenu(i, 100 * i, 100, (LevelOption("hi", int(0.3e9 / 8), 0.0, 0.0),
                                              LevelOption("lo", int(0.1e9 / 8), 0.0, 0.05)), 0.1)
                  for i in range(6))
    tp = ConstantThroughput(1e9, 0.0)
    result = run("hybrid:margin=0+prior_error=0", menus, 0.4, tp, 1e9)
    # meeting 0.4 s: 4 text chunks (0.4 s) + 2 loads; both at "hi" take 0.6 s, "hi"+"lo" 0.4 s
    assert result.ttft_s <= 0.4 + 1e-9
    assert sorted(result.actions) == sorted([TEXT] * 4 + ["hi", "lo"])


# ----------------------------------------------------------------------------------------- planning model

@PLANNING_SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 7))
def test_planning_model_matches_the_engine(seed, n):
    """simulate_plan's ready times are the streaming engine's, for any plan, on a constant-rate link."""
    rng = random.Random(seed)
    menus = make_menus(rng, n, 2)
    acts = [rng.choice(["l0", "l1", TEXT]) for _ in range(n)]
    loads = [(i, a) for i, a in enumerate(acts) if a != TEXT]
    rng.shuffle(loads)
    plan = loads + [(i, TEXT) for i, a in enumerate(acts) if a == TEXT]
    bw, rtt = rng.uniform(1e8, 1e9), rng.choice([0.0, 0.003])
    expected = simulate_plan(PlanState.initial(Session(menus, 1.0)), plan, ConstantThroughput(bw, rtt))
    result = simulate_session(PlanPlayer(plan), menus, Trace([0.0, 1e6], [bw]), slo_s=1.0, rtt_s=rtt)
    assert [c.ready_s for c in result.chunks] == pytest.approx(list(expected.ready_s), abs=1e-9)
    assert result.quality_loss == pytest.approx(expected.quality_loss)
    # and the dry-run executor agrees too
    dry = dry_run(PlanPlayer(plan), Session(menus, 1.0, rtt), ConstantThroughput(bw, rtt))
    assert list(dry.ready_s) == pytest.approx(list(expected.ready_s), abs=1e-9)


def test_simulate_plan_by_hand():
    opts = (LevelOption("a", 125_000_000, 0.05, 0.01),)  # 1 Gbit: 1 s on a 1 Gbit/s link
    menus = tuple(ChunkMenu(i, 10 * i, 10, opts, 0.4) for i in range(3))
    state = PlanState.initial(Session(menus, 2.0))
    # load 2 (transfer 0-1.1 with a 0.1 s RTT, decode to 1.15), text 0 (0-0.4), text 1 (0.4-0.8)
    res = simulate_plan(state, [(2, "a"), (0, TEXT), (1, TEXT)], ConstantThroughput(1e9, 0.1))
    assert res.ready_s == pytest.approx((0.4, 0.8, 1.15))
    assert res.ttft_s == pytest.approx(1.15)
    assert res.quality_loss == pytest.approx(0.01 / 3)
    # text 2 waits for the loaded chunk 1 (ready 1.15), then 0.4 s
    res = simulate_plan(state, [(1, "a"), (0, TEXT), (2, TEXT)], ConstantThroughput(1e9, 0.1))
    assert res.ready_s == pytest.approx((0.4, 1.15, 1.55))
    undecided = simulate_plan(state, [(1, "a")], ConstantThroughput(1e9, 0.1))
    assert math.isnan(undecided.ttft_s)
    with pytest.raises(ValueError):
        simulate_plan(state, [(1, "a"), (1, TEXT)], ConstantThroughput(1e9))


def test_robust_estimator_by_hand():
    est = RobustThroughputEstimator(window=5, rtt_s=0.0, prior_bps=100.0, prior_error=0.5)
    assert est.predict_bps() == pytest.approx(100 / 1.5)
    samples = [ThroughputSample(i, n, 0.0, 1.0) for i, n in enumerate((10, 20, 40))]  # 80, 160, 320 bit/s
    est.observe(samples[:1])
    assert est.predict_bps() == pytest.approx(80.0)  # first sample: no error yet (the prior's is not counted)
    est.observe(samples)
    hm2 = 2 / (1 / 80 + 1 / 160)
    errors = [abs(80 - 160) / 160, abs(hm2 - 320) / 320]
    hm3 = 3 / (1 / 80 + 1 / 160 + 1 / 320)
    assert est.predict_bps() == pytest.approx(hm3 / (1 + max(errors)))


def test_policy_specs_and_errors():
    reg = default_registry()
    assert {"mpc", "hybrid", "oracle"} <= set(reg.names())
    assert reg.create("mpc:margin=0.1+weight=30").overrun_weight == 30
    assert reg.create("mpc:50").overrun_weight == 50
    assert reg.create("hybrid:0.2").slo_margin == 0.2
    assert parse_options("", {"a": 1.0}, "p") == {"a": 1.0}
    for bad in ("mpc:foo=1", "mpc:weight=x", "mpc:weight=-1", "hybrid:margin=1.5", "mpc:horizon=0"):
        with pytest.raises(ValueError):
            reg.create(bad)
    with pytest.raises(ValueError, match="future"):
        OraclePolicy().reset(Session(make_menus(random.Random(0), 2, 1), 1.0))
    assert HybridPolicy.needs_future is False and OraclePolicy.needs_future is True


# ----------------------------------------------------------------------------------------- non-monotone menus

def shuffled_menu(order: tuple[str, ...]) -> tuple[ChunkMenu, ...]:
    """Three chunks with the measured profile's pattern: per level (bytes, decode, loss) listed in `order`;
    "dom" is beaten on everything by "good", "fast" decodes fastest but is large."""
    table = {"good": (2_000_000, 0.004, 0.005), "dom": (3_000_000, 0.004, 0.010),
             "fast": (8_000_000, 0.0005, 0.0001), "tiny": (1_000_000, 0.004, 0.08)}
    return tuple(ChunkMenu(i, 100 * i, 100, tuple(LevelOption(n, *table[n]) for n in order), 0.05 + 0.01 * i)
                 for i in range(3))


def test_undominated_levels_and_orders_ignore_the_menu_order():
    from kvcast.policies.base import by_quality, smallest, undominated_levels

    for order in (("dom", "good", "tiny", "fast"), ("fast", "tiny", "dom", "good"), ("tiny", "good", "fast", "dom")):
        menus = shuffled_menu(order)
        assert undominated_levels(menus) == tuple(n for n in order if n != "dom")
        assert by_quality(menus) == ("fast", "good", "dom", "tiny")
        assert smallest(menus) == "tiny"
    # equal options: the first in menu order stays
    opts = (LevelOption("a", 10, 0.0, 0.1), LevelOption("b", 10, 0.0, 0.1))
    assert undominated_levels((ChunkMenu(0, 0, 10, opts, 1.0),)) == ("a",)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 7), levels=st.integers(2, 4),
       horizon=st.integers(1, 3), weight=st.sampled_from([0.05, 1.0, 20.0, 500.0]),
       bw=st.sampled_from([1e7, 1e8, 1e9]), decided=st.sampled_from([0.0, 0.3]))
def test_mpc_pruning_dominated_levels_keeps_the_best_cost(seed, n, levels, horizon, weight, bw, decided):
    """On a non-monotone menu with dominated levels, the pruned problem's best cost is the unpruned one's."""
    rng = random.Random(seed)
    menus = make_menus(rng, n, levels, monotone=False)
    # add a level dominated by a random one (bigger, slower, worse), somewhere in the menu
    src = rng.randrange(levels)
    at = rng.randrange(levels + 1)
    menus = tuple(ChunkMenu(m.index, m.start_token, m.tokens, m.levels[:at] + (LevelOption(
        "worse", m.levels[src].nbytes + rng.randint(0, 10**5), m.levels[src].decode_s * rng.uniform(1, 2),
        m.levels[src].quality_loss + rng.choice([0.0, 0.01])),) + m.levels[at:], m.recompute_s) for m in menus)
    session = Session(menus, slo_s=rng.uniform(0.05, 2.0), rtt_s=0.001)
    state = random_state(rng, menus, decided)
    assume(state.pending)
    tp = ConstantThroughput(bw, 0.001)
    pruned_tables = M.SessionTables.of(session)
    full_tables = M.SessionTables.of(session, prune=False)
    assert "worse" not in pruned_tables.names and pruned_tables.q_span == full_tables.q_span
    pruned = M.build_problem(pruned_tables, state.pending, state, tp, session.slo_s, weight, horizon)
    full = M.build_problem(full_tables, state.pending, state, tp, session.slo_s, weight, horizon)
    plan, cost = M.search_plan(pruned)
    assert (plan, cost) == M.enumerate_plan(pruned)
    assert cost == M.enumerate_plan(full)[1]
    assert M.search_plan(full) == M.enumerate_plan(full)


def test_mpc_tail_after_text_loads_the_best_fitting_level_not_the_first():
    menus = shuffled_menu(("tiny", "dom", "good", "fast"))
    session = Session(menus, slo_s=1.0)
    tables = M.SessionTables.of(session)
    assert tables.names == ("tiny", "good", "fast")
    problem = M.build_problem(tables, range(3), PlanState.initial(session), ConstantThroughput(1e12), 1.0,
                              horizon=1)
    assert tables.names[problem.text_tail_level] == "fast"  # everything fits: the least loss
    problem = M.build_problem(tables, range(3), PlanState.initial(session), ConstantThroughput(2e8), 1.0,
                              horizon=1)
    # 2 chunks at 200 Mbit/s: fast 0.64 s, good 0.16 s, tiny 0.08 s all fit 1 s; fast has the least loss
    assert tables.names[problem.text_tail_level] == "fast"
    problem = M.build_problem(tables, range(3), PlanState.initial(session), ConstantThroughput(4e7), 1.0,
                              horizon=1)
    # at 40 Mbit/s: good 0.8 s fits, fast (3.2 s) does not; tiny fits too but loses more
    assert tables.names[problem.text_tail_level] == "good"


@pytest.mark.parametrize("spec", ["mpc", "hybrid"])
def test_probe_without_any_estimate_uses_the_smallest_level(spec):
    menus = shuffled_menu(("fast", "tiny", "good", "dom"))  # the smallest is not the last
    session = Session(menus, slo_s=1.0, rtt_s=0.001)
    policy = default_registry().create(spec)
    result = dry_run(policy, session, ConstantThroughput(1e9, 0.001))
    first_load = next(c for c in result.decision_order if result.actions[c] != TEXT)
    assert result.actions[first_load] == "tiny"


@pytest.mark.parametrize("order", [("dom", "good", "tiny", "fast"), ("fast", "tiny", "dom", "good")])
def test_cachegen_on_a_non_monotone_menu_takes_the_least_loss_that_fits(order):
    from kvcast.policies.cachegen import CacheGenPolicy

    menus = shuffled_menu(order)
    for bw, expected in ((1e12, "fast"), (1.2e8, "good"), (6e7, "tiny"), (1e6, TEXT)):
        session = Session(menus, slo_s=0.6, prior_throughput_bps=bw)
        policy = CacheGenPolicy(levels="menu")
        policy.reset(session)
        assert policy.tried == ("fast", "good", "dom", "tiny")
        obs = Observation(0.0, session, (0, 1, 2), (None,) * 3, (False,) * 3, True, True, 0.0, 0.0, 0.0)
        assert policy.decide(obs).action == expected, bw
    policy = CacheGenPolicy("levels=menu")
    policy.reset(Session(menus, slo_s=0.6))  # no prior: the most compressed level
    obs = Observation(0.0, policy.session, (0, 1, 2), (None,) * 3, (False,) * 3, True, True, 0.0, 0.0, 0.0)
    assert policy.decide(obs).action == "tiny"


def real_menus(levels=None):
    from kvcast.streamer.menus import ModelShape, build_menus, recompute_cost
    from kvcast.streamer.profile import default_profile

    return build_menus(default_profile(), ModelShape.named("mistral-7b"), 16000, 1536,
                       recompute_cost("h100/mistral-7b"), levels=levels)


def test_cachegen_controllers_use_cachegens_levels_by_default():
    from kvcast.policies.cachegen import CACHEGEN_LEVELS

    menus = real_menus()  # every level of the measured profile
    reg = default_registry()
    for spec in ("cachegen", "cachegen-code"):
        policy = reg.create(spec)
        policy.reset(Session(menus, 0.6, future_bandwidth_bps=lambda t: 1e9))
        assert policy.tried == ("cachegen-3", "cachegen-2", "cachegen-1")  # 3 -> 2 -> 1, never raw
        menu_policy = reg.create(f"{spec}:levels=menu" if spec == "cachegen" else f"{spec}:menu")
        menu_policy.reset(Session(menus, 0.6, future_bandwidth_bps=lambda t: 1e9))
        assert set(menu_policy.tried) == {o.level for o in menus[0].levels}
        losses = [menus[0].option(n).quality_loss for n in menu_policy.tried]
        assert losses == sorted(losses)
    rng = random.Random(2)
    times = [0.0] + sorted(rng.uniform(0, 3) for _ in range(30)) + [3.5]
    trace = Trace(times, [rng.uniform(0.3e9, 8e9) for _ in range(len(times) - 1)], wrap=True)
    for spec in ("cachegen", "cachegen:3", "cachegen-code"):
        result = simulate_session(reg.create(spec), menus, trace, slo_s=0.6, rtt_s=0.01, prior_throughput_bps=2e9)
        assert {c.action for c in result.chunks} <= set(CACHEGEN_LEVELS) | {TEXT}
    # a menu without CacheGen's levels: the rule runs on the menu's levels
    policy = reg.create("cachegen")
    policy.reset(Session(real_menus("kvcast"), 0.6))
    # best first by the first chunk's loss (far from the end, where the basis levels' coarser token steps show)
    assert policy.tried == ("kvcast-4", "kvcast-basis-3", "kvcast-3", "kvcast-2", "kvcast-basis-2", "kvcast-basis-1",
                            "kvcast-1")
    policy.reset(Session(real_menus("kvcast,baselines"), 0.6))
    # best first by the first chunk's loss: with the position-dependent profile that chunk holds the attention
    # sinks, which int8 rounds and the kvcast-* levels keep exact, so kvcast-3 comes before int8 there
    assert policy.tried == ("raw", "kvcast-4", "kvcast-basis-3", "kvcast-3", "int8", "kvcast-2", "kvcast-basis-2",
                            "kvcast-basis-1", "kvcast-1")
    with pytest.raises(ValueError, match="levels must be"):
        reg.create("cachegen:levels=fast")


def test_planning_controllers_on_the_measured_menu_avoid_dominated_levels():
    """Every level of the measured profile on the menu (with the H100-measured GPU decode speeds, CacheGen's
    levels decode 2.6-4x faster per value than kvcast's, so only a level beaten on size, loss and decode time
    at once is dominated; menu order monotone in nothing): mpc, hybrid and oracle never load a dominated level,
    and the oracle is never worse on overrun."""
    from kvcast.policies.base import undominated_levels

    menus = real_menus()
    keep = set(undominated_levels(menus))
    levels = {o.level for o in menus[0].levels}
    assert "kvcast-3" in keep and keep <= levels
    for dropped in levels - keep:   # each dropped level really is beaten on every count by one that stays
        mine = [m.option(dropped) for m in menus]
        assert any(all(m.option(k).nbytes <= o.nbytes and m.option(k).quality_loss <= o.quality_loss and
                       m.option(k).decode_s <= o.decode_s for m, o in zip(menus, mine)) for k in keep), dropped
    rng = random.Random(11)
    for _ in range(3):
        times = [0.0] + sorted(rng.uniform(0, 3) for _ in range(30)) + [3.5]
        trace = Trace(times, [rng.uniform(0.2e9, 6e9) for _ in range(len(times) - 1)], wrap=True)
        results = {spec: simulate_session(default_registry().create(spec), menus, trace, slo_s=0.6, rtt_s=0.01,
                                          efficiency=0.95, overhead_bytes=400, prior_throughput_bps=2e9)
                   for spec in ("mpc", "hybrid", "oracle", "cachegen")}
        for spec in ("mpc", "hybrid", "oracle"):
            assert {c.action for c in results[spec].chunks} <= keep | {TEXT}, spec
            assert results["oracle"].overrun_s <= results[spec].overrun_s + 1e-9
        assert results["oracle"].overrun_s <= results["cachegen"].overrun_s + 1e-9
