"""Synthetic generators (reproducibility and statistics) and the shipped default trace set (golden)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kvcast.traces.defaults import (
    DEFAULT_SPECS,
    default_trace_dir,
    default_traces,
    generate_default_traces,
    write_default_traces,
)
from kvcast.traces.synthetic import markov_on_off, random_walk, uniform_chunks
from kvcast.traces.trace import ChunkTrace, Trace


def same(a: Trace, b: Trace) -> bool:
    return np.array_equal(a.boundaries_s, b.boundaries_s) and np.array_equal(a.bandwidth_bps, b.bandwidth_bps)


@pytest.mark.parametrize("make", [
    lambda seed: uniform_chunks(50, seed=seed),
    lambda seed: markov_on_off(60.0, seed=seed),
    lambda seed: random_walk(30.0, seed=seed),
    lambda seed: random_walk(30.0, seed=seed, space="linear"),
])
def test_reproducible_and_seed_dependent(make):
    assert same(make(7), make(7))
    assert not same(make(7), make(8))
    assert same(make(np.random.default_rng(3)), make(3))


def test_uniform_chunks_statistics():
    t = uniform_chunks(20_000, seed=1, low_bps=1e9, high_bps=3e9, chunk_duration_s=0.1)
    assert isinstance(t, ChunkTrace) and t.num_chunks == 20_000 and t.duration_s == pytest.approx(2000.0)
    bw = t.chunk_bps
    assert bw.min() >= 1e9 and bw.max() <= 3e9
    assert t.mean_bps == pytest.approx(2e9, rel=0.01)
    assert t.percentile_bps(10) == pytest.approx(1.2e9, rel=0.02)  # uniform quantiles
    assert t.percentile_bps(90) == pytest.approx(2.8e9, rel=0.02)
    assert abs(np.corrcoef(bw[:-1], bw[1:])[0, 1]) < 0.05  # i.i.d.
    default = uniform_chunks(10, seed=0)  # CacheGen's [0.1, 10] Gbps
    assert default.chunk_bps.min() >= 0.1e9 and default.chunk_bps.max() <= 10e9


def test_markov_on_off_statistics():
    t = markov_on_off(20_000.0, seed=5, on_bps=4e9, off_bps=1e9, mean_on_s=3.0, mean_off_s=1.0)
    assert t.duration_s == pytest.approx(20_000.0)
    assert set(np.unique(t.bandwidth_bps)) == {1e9, 4e9}
    widths = np.diff(t.boundaries_s)
    on = t.bandwidth_bps == 4e9
    assert widths[on].sum() / t.duration_s == pytest.approx(0.75, abs=0.02)
    assert t.mean_bps == pytest.approx(0.75 * 4e9 + 0.25 * 1e9, rel=0.02)
    inner_on, inner_off = widths[1:-1][on[1:-1]], widths[1:-1][~on[1:-1]]  # first/last sojourns are cut
    assert inner_on.mean() == pytest.approx(3.0, rel=0.05)
    assert inner_off.mean() == pytest.approx(1.0, rel=0.05)
    assert np.all(on[1:] != on[:-1])  # states alternate
    assert markov_on_off(10.0, seed=1, start="on").bandwidth_bps[0] == 5e9
    assert markov_on_off(10.0, seed=1, start="off", off_bps=0.0).bandwidth_bps[0] == 0.0


def test_random_walk_log_statistics():
    t = random_walk(2_000.0, seed=9, step_s=0.1, low_bps=1e9, high_bps=8e9, volatility=0.05)
    bw = t.bandwidth_bps
    assert t.num_segments == 20_000 and t.duration_s == pytest.approx(2_000.0)
    assert bw.min() >= 1e9 and bw.max() <= 8e9
    assert bw[0] == pytest.approx(np.sqrt(8e18))  # starts at the geometric middle
    steps = np.diff(np.log(bw))
    free = steps[(bw[:-1] > 1e9) & (bw[:-1] < 8e9) & (bw[1:] > 1e9) & (bw[1:] < 8e9)]
    assert free.std() == pytest.approx(0.05, rel=0.05)  # relative moves of the requested volatility
    assert abs(free.mean()) < 0.005


def test_random_walk_linear_statistics():
    t = random_walk(1_000.0, seed=4, step_s=0.5, low_bps=0.0, high_bps=1e9, volatility=0.02, space="linear",
                    start_bps=0.3e9)
    bw = t.bandwidth_bps
    assert bw[0] == 0.3e9 and bw.min() >= 0 and bw.max() <= 1e9
    steps = np.diff(bw)
    free = steps[(bw[:-1] > 0) & (bw[:-1] < 1e9) & (bw[1:] > 0) & (bw[1:] < 1e9)]
    assert free.std() == pytest.approx(0.02 * 1e9, rel=0.1)


def test_random_walk_partial_last_step():
    t = random_walk(1.05, seed=0, step_s=0.5)
    assert list(t.boundaries_s) == pytest.approx([0.0, 0.5, 1.0, 1.05])


@pytest.mark.parametrize("call", [
    lambda: uniform_chunks(0, seed=1),
    lambda: uniform_chunks(5, seed=1, low_bps=2, high_bps=1),
    lambda: markov_on_off(0.0, seed=1),
    lambda: markov_on_off(5.0, seed=1, mean_on_s=0),
    lambda: markov_on_off(5.0, seed=1, start="maybe"),  # type: ignore[arg-type]
    lambda: random_walk(5.0, seed=1, low_bps=0.0),  # log space needs low > 0
    lambda: random_walk(5.0, seed=1, space="cubic"),  # type: ignore[arg-type]
    lambda: random_walk(5.0, seed=1, volatility=-1),
])
def test_invalid_arguments(call):
    with pytest.raises(ValueError):
        call()


def test_seed_must_be_int_or_generator():
    with pytest.raises(TypeError):
        uniform_chunks(5, seed=1.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- defaults
def test_shipped_defaults_match_their_seeds():
    """Golden: the JSON files in traces/default are exactly what DEFAULT_SPECS generate."""
    shipped = default_traces()
    generated = generate_default_traces()
    assert [t.name for t in shipped] == [s.name for s in DEFAULT_SPECS]
    for a, b in zip(shipped, generated):
        assert type(a) is type(b) and a.source == b.source and a.wrap
        np.testing.assert_allclose(a.bandwidth_bps, b.bandwidth_bps, rtol=1e-12)
        np.testing.assert_allclose(a.boundaries_s, b.boundaries_s, rtol=1e-12, atol=1e-12)


def test_defaults_are_small_and_at_kv_scale():
    files = sorted(default_trace_dir().glob("*.json"))
    assert len(files) == len(DEFAULT_SPECS)
    assert sum(f.stat().st_size for f in files) < 400_000
    for t in default_traces():
        assert 1e9 <= t.mean_bps <= 10e9 and t.duration_s >= 10.0


def test_write_default_traces(tmp_path):
    paths = write_default_traces(tmp_path)
    assert [p.name for p in paths] == [f"{s.name}.json" for s in DEFAULT_SPECS]
    for p in paths:
        made, shipped = json.loads(p.read_text()), json.loads((default_trace_dir() / p.name).read_text())
        # Generated with numpy's libm-backed functions (exp, log): equal up to the last ulp, not bit for bit.
        assert _same_up_to_ulps(made, shipped), p.name


def _same_up_to_ulps(a, b) -> bool:
    """Equal JSON values, floats within a few ulps (relative 1e-12)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_up_to_ulps(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_up_to_ulps(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12)
    return a == b


def test_ulp_comparison_is_not_vacuous():
    assert _same_up_to_ulps({"x": [1.0, 2.0]}, {"x": [1.0, 2.0 * (1 + 1e-15)]})
    assert not _same_up_to_ulps({"x": [1.0, 2.0]}, {"x": [1.0, 2.0 * (1 + 1e-9)]})
    assert not _same_up_to_ulps({"x": [1.0]}, {"x": [1.0, 2.0]})
    assert not _same_up_to_ulps({"name": "a"}, {"name": "b"})
