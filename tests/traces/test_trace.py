"""Property tests of `kvcast.traces.trace.Trace`: integration against a brute-force reference, inversion, wrap-around,
scaling and the derived-trace operations."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kvcast.traces.trace import ChunkTrace, Trace, TraceError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

widths_st = st.floats(min_value=1e-3, max_value=50.0, allow_nan=False, allow_infinity=False)
# positive bandwidths span five decades; far smaller ones make times ill-conditioned (bits / bps)
bw_st = st.one_of(st.just(0.0), st.floats(min_value=1e5, max_value=1e10, allow_nan=False))


@st.composite
def traces(draw, wrap=None, min_segments=1, max_segments=12):
    n = draw(st.integers(min_segments, max_segments))
    widths = draw(st.lists(widths_st, min_size=n, max_size=n))
    bws = draw(st.lists(bw_st, min_size=n, max_size=n))
    if wrap is None:
        wrap = draw(st.booleans())
    return Trace(np.concatenate([[0.0], np.cumsum(widths)]), bws, name="t", wrap=wrap)


def reference_bits(trace: Trace, t0: float, t1: float) -> float:
    """Integral by walking every (unrolled) segment that overlaps [t0, t1]: no cumulative sums."""
    b, bw, d = trace.boundaries_s, trace.bandwidth_bps, trace.duration_s
    total = 0.0
    if not trace.wrap:
        for i in range(len(bw)):
            lo, hi = b[i], (b[i + 1] if i + 1 < len(bw) else math.inf)
            total += bw[i] * max(0.0, min(t1, hi) - max(t0, lo))
        return total
    for k in range(int(t0 // d) - 1, int(t1 // d) + 2):
        for i in range(len(bw)):
            lo, hi = k * d + b[i], k * d + b[i + 1]
            total += bw[i] * max(0.0, min(t1, hi) - max(t0, lo))
    return total


def close(a: float, b: float, scale: float) -> bool:
    return abs(a - b) <= 1e-9 * scale + 1e-9


def times_for(trace: Trace, data, periods: float = 4.0) -> tuple[float, float]:
    hi = trace.duration_s * periods
    t0 = data.draw(st.floats(min_value=0.0, max_value=hi))
    t1 = data.draw(st.floats(min_value=t0, max_value=hi + trace.duration_s))
    return t0, t1


def scale_of(trace: Trace, t: float) -> float:
    return float(trace.bandwidth_bps.max()) * (t + trace.duration_s)


# ---------------------------------------------------------------------------------------------- basics
def test_basic_values():
    t = Trace([0, 1, 3, 4], [10, 0, 5], name="x")
    assert t.duration_s == 4 and t.total_bits == 15 and t.mean_bps == 3.75 and len(t) == 3
    assert t.bandwidth_at(0) == 10 and t.bandwidth_at(1) == 0 and t.bandwidth_at(3.5) == 5
    assert t.bandwidth_at(4) == 10  # wraps
    assert t.with_wrap(False).bandwidth_at(100) == 5
    assert t.delivered_bits(0.5, 9) == pytest.approx(35)
    assert t.transfer_end_s(0, 10) == pytest.approx(1.0)  # the zero stretch [1, 3) is not needed
    assert t.transfer_end_s(0, 10.5) == pytest.approx(3.1)  # ... but here it is skipped
    assert t.transfer_end_s(0, 15) == pytest.approx(4.0)
    assert t.transfer_end_s(3.5, 100) == pytest.approx(28.75)
    assert t.with_wrap(False).transfer_end_s(0, 25) == pytest.approx(6.0)
    assert t.transfer_end_s(2.0, 0) == 2.0


def test_percentile_is_time_weighted():
    t = Trace([0, 1, 10], [100.0, 1.0])  # 1.0 holds 90% of the time
    assert t.percentile_bps(0) == 1.0
    assert t.percentile_bps(50) == 1.0
    assert t.percentile_bps(90) == 1.0
    assert t.percentile_bps(91) == 100.0
    assert t.percentile_bps(100) == 100.0
    with pytest.raises(ValueError):
        t.percentile_bps(101)


@pytest.mark.parametrize("args, fragment", [
    (([0, 1], [-1.0]), "negative"),
    (([0, 1, 1], [1.0, 2.0]), "strictly increasing"),
    (([0, 2, 1], [1.0, 2.0]), "strictly increasing"),
    (([0], []), "at least one segment"),
    (([0, 1], [math.nan]), "not finite"),
    (([0, 1], [math.inf]), "not finite"),
    (([0, math.inf], [1.0]), "not finite"),
    (([1, 2], [1.0]), "must be 0"),
    (([0, 1, 2], [1.0]), "entries"),
    (([[0, 1]], [1.0]), "one-dimensional"),
    ((["a", "b"], [1.0]), "numbers"),
])
def test_invalid_traces_raise(args, fragment):
    with pytest.raises(TraceError, match=fragment):
        Trace(*args)


def test_arrays_are_read_only_and_copied():
    b = np.array([0.0, 1.0])
    t = Trace(b, [5.0])
    b[1] = 7.0
    assert t.duration_s == 1.0
    with pytest.raises(ValueError):
        t.bandwidth_bps[0] = 1.0


def test_all_zero_never_delivers():
    z = Trace([0, 1, 2], [0.0, 0.0])
    assert z.transfer_end_s(0.3, 1.0) == math.inf
    assert z.with_wrap(False).transfer_end_s(0.3, 1.0) == math.inf
    assert z.transfer_end_s(0.3, 0.0) == 0.3
    assert np.all(np.isinf(z.transfer_end_s(np.array([0.0, 5.0]), 1.0)))
    with pytest.raises(TraceError):
        z.scaled_to_mean(1e6)


def test_non_wrap_trace_with_zero_tail_ends_at_its_bits():
    t = Trace([0, 1, 2], [4.0, 0.0], wrap=False)
    assert t.transfer_end_s(0, 4.0) == pytest.approx(1.0)
    assert t.transfer_end_s(0, 4.0001) == math.inf


def test_bad_arguments():
    t = Trace([0, 1], [1.0])
    for call in (lambda: t.delivered_bits(2, 1), lambda: t.delivered_bits(-1, 1),
                 lambda: t.transfer_end_s(-1, 1), lambda: t.transfer_end_s(0, -1),
                 lambda: t.scaled(-1), lambda: t.sliced(1, 1), lambda: t.repeated(0),
                 lambda: t.bandwidth_at(-0.5), lambda: t.offset(math.nan)):
        with pytest.raises(ValueError):
            call()


# ---------------------------------------------------------------------------------------------- properties
@SETTINGS
@given(trace=traces(), data=st.data())
def test_delivered_bits_matches_reference(trace, data):
    t0, t1 = times_for(trace, data)
    got = trace.delivered_bits(t0, t1)
    assert close(got, reference_bits(trace, t0, t1), scale_of(trace, t1))


@SETTINGS
@given(trace=traces(), data=st.data())
def test_delivered_bits_additive_and_monotone(trace, data):
    hi = 3 * trace.duration_s
    a, b, c = sorted(data.draw(st.floats(0.0, hi)) for _ in range(3))
    ab, bc, ac = trace.delivered_bits(a, b), trace.delivered_bits(b, c), trace.delivered_bits(a, c)
    assert ab >= 0 and bc >= 0
    assert close(ab + bc, ac, scale_of(trace, c))
    assert ac >= ab - 1e-9 * scale_of(trace, c)


@SETTINGS
@given(trace=traces(), data=st.data())
def test_transfer_end_inverts_delivered_bits(trace, data):
    assume(trace.total_bits > 0 or not trace.wrap)
    start = data.draw(st.floats(0.0, 3 * trace.duration_s))
    frac = data.draw(st.floats(0.0, 3.0))
    bits = frac * max(trace.total_bits, 1.0)
    end = trace.transfer_end_s(start, bits)
    if math.isinf(end):
        assert not trace.wrap and trace.bandwidth_bps[-1] == 0
        assert trace.delivered_bits(start, start + 10 * trace.duration_s) < bits
        return
    assert end >= start
    assert close(trace.delivered_bits(start, end), bits, scale_of(trace, end))


@SETTINGS
@given(trace=traces(), data=st.data())
def test_transfer_end_is_the_earliest_time(trace, data):
    s, t = times_for(trace, data, periods=2.0)
    bits = trace.delivered_bits(s, t)
    end = trace.transfer_end_s(s, bits)
    tol = 1e-9 * (t + trace.duration_s) + 1e-9
    assert s <= end <= t + tol
    if bits > 0:
        # nothing in between: the link delivers no bits on (end, t]
        assert trace.delivered_bits(min(end, t), t) <= 1e-9 * scale_of(trace, t) + 1e-6


@SETTINGS
@given(trace=traces(), data=st.data())
def test_transfer_end_monotone_in_bits(trace, data):
    start = data.draw(st.floats(0.0, 2 * trace.duration_s))
    x1, x2 = sorted(data.draw(st.floats(0.0, 3 * max(trace.total_bits, 1.0))) for _ in range(2))
    assert trace.transfer_end_s(start, x1) <= trace.transfer_end_s(start, x2)


@SETTINGS
@given(trace=traces(), data=st.data(), factor=st.floats(min_value=1e-3, max_value=1e3))
def test_scaling_laws(trace, data, factor):
    t0, t1 = times_for(trace, data)
    scaled = trace.scaled(factor)
    assert close(scaled.delivered_bits(t0, t1), factor * trace.delivered_bits(t0, t1),
                 factor * scale_of(trace, t1))
    assert scaled.mean_bps == pytest.approx(factor * trace.mean_bps, rel=1e-12, abs=1e-300)
    bits = trace.delivered_bits(t0, t1)
    # the inverse scales too; compared in bits (time is ill-conditioned where the bandwidth is tiny)
    end = scaled.transfer_end_s(t0, factor * bits)
    assert close(trace.delivered_bits(t0, end), bits, scale_of(trace, max(end, t1)))
    if trace.total_bits > 0:
        assert trace.scaled_to_mean(2.5e9).mean_bps == pytest.approx(2.5e9, rel=1e-12)


@SETTINGS
@given(trace=traces(wrap=True), data=st.data(), periods=st.integers(1, 50))
def test_wrap_around_is_periodic(trace, data, periods):
    d = trace.duration_s
    t0, t1 = times_for(trace, data, periods=1.0)
    shifted = trace.delivered_bits(t0 + periods * d, t1 + periods * d)
    assert close(shifted, trace.delivered_bits(t0, t1), scale_of(trace, t1 + periods * d))
    assert close(trace.delivered_bits(0, periods * d), periods * trace.total_bits,
                 scale_of(trace, periods * d))
    end = trace.transfer_end_s(t0 + periods * d, trace.total_bits)
    one_period_later = t0 + (periods + 1) * d
    if trace.total_bits > 0:  # one period's bits take at most one period (less if it ends in a zero stretch)
        assert end <= one_period_later * (1 + 1e-9) + 1e-9
        assert trace.delivered_bits(min(end, one_period_later), one_period_later) <= \
            1e-9 * scale_of(trace, one_period_later) + 1e-6


@SETTINGS
@given(trace=traces(wrap=False), data=st.data())
def test_non_wrap_continues_with_last_bandwidth(trace, data):
    d = trace.duration_s
    extra = data.draw(st.floats(0.0, 100.0))
    got = trace.delivered_bits(0, d + extra)
    assert close(got, trace.total_bits + trace.bandwidth_bps[-1] * extra, scale_of(trace, d + extra))


@SETTINGS
@given(trace=traces(), data=st.data())
def test_vectorised_matches_scalar(trace, data):
    pairs = [times_for(trace, data) for _ in range(5)]
    t0 = np.array([p[0] for p in pairs])
    t1 = np.array([p[1] for p in pairs])
    vec = trace.delivered_bits(t0, t1)
    for i in range(5):
        assert close(vec[i], trace.delivered_bits(t0[i], t1[i]), scale_of(trace, t1[i]))
    bits = vec * 0.7
    ends = trace.transfer_end_s(t0, bits)
    for i in range(5):
        scalar = trace.transfer_end_s(t0[i], bits[i])
        assert ends[i] == pytest.approx(scalar, rel=1e-9, abs=1e-9)
    at = trace.bandwidth_at(t1)
    assert all(at[i] == trace.bandwidth_at(float(t1[i])) for i in range(5))


@SETTINGS
@given(trace=traces(), data=st.data())
def test_offset_and_sliced_preserve_integrals(trace, data):
    d = trace.duration_s
    o = data.draw(st.floats(0.0, 2 * d))
    x = data.draw(st.floats(0.0, 2 * d))
    rotated = trace.offset(o)
    assert close(rotated.delivered_bits(0, x), trace.delivered_bits(o, o + x), scale_of(trace, o + x))
    if trace.wrap:
        assert rotated.duration_s == pytest.approx(d, rel=1e-12)
        assert rotated.mean_bps == pytest.approx(trace.mean_bps, rel=1e-9, abs=1e-6)
    a = data.draw(st.floats(0.0, 2 * d))
    length = data.draw(st.floats(1e-3, 2 * d))
    piece = trace.sliced(a, a + length)
    assert piece.duration_s == pytest.approx(length, rel=1e-9)
    y = data.draw(st.floats(0.0, length))
    assert close(piece.delivered_bits(0, y), trace.delivered_bits(a, a + y), scale_of(trace, a + y))


@SETTINGS
@given(trace=traces(), times=st.integers(1, 5), data=st.data())
def test_repeated(trace, times, data):
    rep = trace.repeated(times)
    assert rep.duration_s == pytest.approx(times * trace.duration_s, rel=1e-12)
    assert rep.total_bits == pytest.approx(times * trace.total_bits, rel=1e-9, abs=1e-6)
    t0, t1 = times_for(trace, data, periods=times)
    if trace.wrap:
        assert close(rep.delivered_bits(t0, t1), trace.delivered_bits(t0, t1), scale_of(trace, t1))


@SETTINGS
@given(trace=traces())
def test_percentile_bounds_and_monotone(trace):
    qs = [0, 10, 50, 90, 100]
    ps = [trace.percentile_bps(q) for q in qs]
    assert ps == sorted(ps)
    assert ps[0] == trace.bandwidth_bps.min() and ps[-1] == trace.bandwidth_bps.max()
    widths = np.diff(trace.boundaries_s)
    for q, p in zip(qs, ps):  # at least q% of the time at or below p
        assert widths[trace.bandwidth_bps <= p].sum() >= q / 100 * widths.sum() * (1 - 1e-9)


@SETTINGS
@given(trace=traces())
def test_json_round_trip(trace):
    obj = json.loads(json.dumps(trace.to_jsonable()))
    back = Trace.from_jsonable(obj)
    assert back.wrap == trace.wrap and back.name == trace.name
    assert np.array_equal(back.bandwidth_bps, trace.bandwidth_bps)
    np.testing.assert_allclose(back.boundaries_s, trace.boundaries_s, rtol=1e-12)


# ---------------------------------------------------------------------------------------------- ChunkTrace
def test_chunk_trace():
    c = ChunkTrace([1e9, 2e9, 4e9], 0.5, name="c", source="x")
    assert c.num_chunks == 3 and c.chunk_duration_s == 0.5 and c.duration_s == 1.5
    assert list(c.chunk_bps) == [1e9, 2e9, 4e9]
    assert c.bandwidth_of_chunk(4) == 2e9 and c.with_wrap(False).bandwidth_of_chunk(4) == 4e9
    assert c.delivered_bits(0.25, 1.25) == pytest.approx(0.25e9 + 1e9 + 1e9)
    s = c.scaled(2)
    assert isinstance(s, ChunkTrace) and list(s.chunk_bps) == [2e9, 4e9, 8e9]
    assert isinstance(c.scaled_to_mean(1e9), ChunkTrace)
    assert isinstance(c.repeated(2), ChunkTrace) and c.repeated(2).num_chunks == 6
    assert not isinstance(c.offset(0.25), ChunkTrace)
    back = Trace.from_jsonable(json.loads(json.dumps(c.to_jsonable())))
    assert isinstance(back, ChunkTrace) and back == c
    with pytest.raises(TraceError):
        ChunkTrace([1.0], 0.0)
    with pytest.raises(IndexError):
        c.bandwidth_of_chunk(-1)


@pytest.mark.parametrize("mutate, fragment", [
    (lambda o: o.update(format="other"), "not a kvcast trace"),
    (lambda o: o.update(version=99), "unsupported"),
    (lambda o: o.update(durations_s="x"), "must be a list"),
    (lambda o: o.update(durations_s=[1.0, -1.0]), "durations_s\\[1\\]"),
    (lambda o: o.update(bandwidth_bps=[1.0]), "entries"),
    (lambda o: o.update(wrap="yes"), "wrap"),
    (lambda o: o.update(name=3), "name"),
])
def test_from_jsonable_rejects_malformed(mutate, fragment):
    obj = Trace([0, 1, 2], [1.0, 2.0], name="n").to_jsonable()
    mutate(obj)
    with pytest.raises(TraceError, match=fragment):
        Trace.from_jsonable(obj)


def test_trace_error_keeps_path_and_line_through_pickle():
    err = TraceError("bad value", path="a/b.txt", line=7)
    assert str(err) == "a/b.txt, line 7: bad value"
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.line, str(back)) == ("a/b.txt", 7, str(err))
    assert isinstance(err, ValueError)
