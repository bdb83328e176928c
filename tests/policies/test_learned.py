"""The `learned` policy: the shipped weights load, every decision is legal on any menu and state, a weights file
is checked, and ``learned:PATH`` runs in `kvcast simulate`."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kvcast.cli import app
from kvcast.policies.base import Observation, Session, ThroughputSample, validate_decision
from kvcast.policies.features import FEATURES, ActionSpace, FeatureEncoder
from kvcast.policies.learned import LearnedPolicy, WeightsError, load_weights, save_weights
from kvcast.policies.registry import default_registry
from kvcast.streamer.simulate import simulate_session
from kvcast.traces.trace import Trace
from tests.factories import make_menus


def test_shipped_weights_load_and_are_small():
    policy = default_registry().create("learned")
    w = policy.weights
    assert w.metadata["format"] == "kvcast-learned-policy/1"
    assert w.metadata["features"] == ",".join(FEATURES)
    assert w.w1.shape == (len(FEATURES), w.hidden)
    assert all(np.isfinite(getattr(w, k)).all() for k in ("w1", "b1", "w2", "b2", "w3", "b3", "mean", "std"))


@st.composite
def observations(draw):
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(1, 12))
    menus = make_menus(rng, n, draw(st.integers(1, 7)), monotone=draw(st.booleans()))
    if draw(st.booleans()) and n > 1:  # some chunk lacks a level
        drop = draw(st.integers(0, n - 1))
        m = menus[drop]
        if len(m.levels) > 1:
            menus = (*menus[:drop], type(m)(m.index, m.start_token, m.tokens, m.levels[1:], m.recompute_s),
                     *menus[drop + 1:])
    decided = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    pending = tuple(i for i in range(n) if not decided[i]) or (n - 1,)
    actions = tuple(None if i in pending else "text" for i in range(n))
    link_idle = draw(st.booleans())
    compute_idle = draw(st.booleans()) or not link_idle  # the engine asks only when one is idle
    now = draw(st.floats(0.0, 3.0))
    samples = tuple(ThroughputSample(i, draw(st.integers(1, 10**8)), 0.1 * i, 0.1 * i + draw(st.floats(1e-4, 1.0)))
                    for i in range(draw(st.integers(0, 4))))
    session = Session(menus, slo_s=draw(st.floats(0.05, 5.0)), rtt_s=draw(st.floats(0.0, 0.05)),
                      prior_throughput_bps=draw(st.one_of(st.none(), st.floats(1e6, 1e11))))
    return Observation(now, session, pending, actions, tuple(False for _ in range(n)), link_idle, compute_idle,
                       now + draw(st.floats(0.0, 1.0)), now + draw(st.floats(0.0, 1.0)),
                       now + draw(st.floats(0.0, 1.0)), samples)


@settings(max_examples=300, deadline=None)
@given(observations())
def test_every_decision_is_legal_on_any_menu(obs):
    policy = LearnedPolicy()
    policy.reset(obs.session)
    decision = policy.decide(obs)
    if decision is None:
        assert not (obs.link_idle and obs.compute_idle)  # waits only while something is in flight
    else:
        validate_decision(obs, decision, "learned")
        if decision.action == "text":
            assert decision.chunk == obs.pending[0]
        else:
            assert decision.chunk == obs.pending[-1]
    space = ActionSpace.of_session(obs.session)
    encoder = FeatureEncoder(space)
    rows = encoder.encode(obs)
    assert rows.shape == (space.size, len(FEATURES)) and np.isfinite(rows).all()
    assert (encoder.mask(obs) == space.mask(obs)).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(1e6, 1e10), st.floats(0.05, 3.0))
def test_sessions_always_finish(seed, bps, slo_s):
    rng = random.Random(seed)
    menus = make_menus(rng, rng.randint(1, 10), rng.randint(1, 6), monotone=False)
    trace = Trace([0.0, 0.5, 1.0, 1.5], [bps, bps * rng.uniform(0.05, 2.0), bps], wrap=True)
    result = simulate_session(LearnedPolicy(), menus, trace, slo_s=slo_s, rtt_s=0.01, prior_throughput_bps=bps)
    assert len(result.chunks) == len(menus) and all(r.ready_s is not None for r in result.chunks)


def test_bad_weights_files_are_refused(tmp_path):
    good = load_weights()
    tensors = {k: getattr(good, k) for k in ("mean", "std", "w1", "b1", "w2", "b2", "w3", "b3")}
    path = tmp_path / "ok.safetensors"
    save_weights(path, tensors, {"note": "copy"})
    assert LearnedPolicy(str(path)).weights.metadata["note"] == "copy"
    from safetensors.numpy import save_file

    other = tmp_path / "other.safetensors"
    save_file({k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}, str(other),
              metadata={"format": "kvcast-learned-policy/1", "features": "a,b"})
    with pytest.raises(WeightsError, match="other features"):
        load_weights(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_weights(junk)
    with pytest.raises(WeightsError, match="missing.safetensors"):
        load_weights(tmp_path / "missing.safetensors")


def test_learned_path_runs_in_simulate(tmp_path):
    good = load_weights()
    path = tmp_path / "mine.safetensors"
    save_weights(path, {k: getattr(good, k) for k in ("mean", "std", "w1", "b1", "w2", "b2", "w3", "b3")}, {})
    traces = tmp_path / "traces"
    traces.mkdir()
    (traces / "steady").write_text("".join(f"{t}\t{3.0}\n" for t in range(0, 31)))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["simulate", "--traces", str(traces), "--policies", f"learned,learned:{path},text",
                                      "--contexts", "3", "--out", str(out), "--no-chunk-log"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "sessions.jsonl").read_text().splitlines()]
    by_policy = {}
    for row in rows:
        by_policy.setdefault(row["policy"], []).append(row)
    assert len(by_policy["learned"]) == 3 and len(by_policy[f"learned:{path}"]) == 3
    # the same weights, the same sessions: the same outcomes
    assert [r["ttft_s"] for r in by_policy["learned"]] == [r["ttft_s"] for r in by_policy[f"learned:{path}"]]
    bad = CliRunner().invoke(app, ["simulate", "--traces", str(traces), "--policies", "learned:/nonexistent.st",
                                   "--contexts", "1", "--out", str(out)])
    assert bad.exit_code != 0 and "nonexistent" in bad.output
