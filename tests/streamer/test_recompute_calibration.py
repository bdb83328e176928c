"""scripts/calibrate_recompute.py: the NNLS fit, the rescaling, the cost-table writer, and the measurement loop on a
tiny CPU model (the GPU measurement itself runs only on a CUDA machine)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.factories import REPO_ROOT

ROOT = REPO_ROOT
RUN = ROOT / "docs" / "recompute-calibration" / "h100-2026-11-22-run2"


def _load():
    name = "calibrate_recompute_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "calibrate_recompute.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


cal = _load()

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(st.integers(3, 12).flatmap(lambda m: st.tuples(
    st.lists(st.lists(finite, min_size=3, max_size=3), min_size=m, max_size=m),
    st.lists(finite, min_size=m, max_size=m))))
# Columns of subnormal values: their least-squares coefficient overflows to inf once unscaled.
@example(([[-1.1125369292536007e-308, 1.0, 1.0]] * 5, [0.0, 0.0, 0.0, 0.0, -10.0]))
@example(([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, -1.1125369292536007e-308]], [0.0, 0.0, -2.0]))
def test_nnls_satisfies_the_optimality_conditions(data):
    a, y = (np.array(v, dtype=float) for v in data)
    x = cal.nnls(a, y)
    grad = a.T @ (a @ x - y)
    scale = 1e-6 * (1 + np.abs(a).sum() * (1 + np.abs(y).sum() + np.abs(a @ x).sum()))  # float round-off of the solver
    assert np.isfinite(x).all() and (x >= 0).all()
    assert (grad >= -scale).all()  # no descent direction into the feasible set
    assert np.all(np.abs(x * grad) <= scale * (1 + np.abs(x)))  # complementary slackness


def test_nnls_matches_unconstrained_solution_when_it_is_feasible():
    rng = np.random.default_rng(1)
    a = rng.uniform(0.1, 1, size=(20, 3))
    x_true = np.array([0.5, 2.0, 0.25])
    assert np.allclose(cal.nnls(a, a @ x_true), x_true)


def test_nnls_rejects_bad_input():
    with pytest.raises(ValueError, match="shapes"):
        cal.nnls(np.ones((4, 3)), np.ones(3))
    with pytest.raises(ValueError, match="non-finite"):
        cal.nnls(np.ones((4, 3)), np.array([1, 2, np.nan, 4]))


GRID = [(p, n) for p in (0, 2048, 4096, 8192, 16384, 24576) for n in (256, 512, 1024, 1536, 2048)]


@settings(max_examples=60, deadline=None)
@given(st.floats(1e-7, 1e-3), st.floats(1e-11, 1e-7), st.floats(1e-4, 0.1), st.integers(0, 2**32 - 1))
def test_fit_recovers_the_coefficients_of_noisy_synthetic_timings(a, b, c, seed):
    rng = np.random.default_rng(seed)
    truth = (a, b, c)
    noise = rng.uniform(0.99, 1.01, size=len(GRID))  # +-1 % multiplicative
    fit = cal.fit_recompute_cost([(p, n, cal.predict_s(truth, p, n) * e) for (p, n), e in zip(GRID, noise)])
    assert fit.max_abs_rel <= 0.03
    # The fitted model predicts every grid point within a few per cent of the truth.
    for p, n in GRID:
        assert cal.predict_s(fit.coef, p, n) == pytest.approx(cal.predict_s(truth, p, n), rel=0.03)
    # Beyond the grid the error grows with the distance: n = 8192 lies (8192 - 256) / (2048 - 256) = 4.4 grid
    # widths out, so a ~2 % error at the grid's edge may become ~9 % there (seen: 4.1 % with a = 1e-7, c = 0.06).
    for p, n in [(0, 8192), (28672, 2048)]:
        assert cal.predict_s(fit.coef, p, n) == pytest.approx(cal.predict_s(truth, p, n), rel=0.10)


def test_fit_is_exact_on_exact_data_and_keeps_coefficients_non_negative():
    truth = (1.6e-5, 2.4e-9, 0.0)  # no fixed cost: an unconstrained fit of noisy data could go negative
    pts = [(p, n, cal.predict_s(truth, p, n)) for p, n in GRID]
    fit = cal.fit_recompute_cost(pts)
    assert fit.coef == pytest.approx(truth, rel=1e-9, abs=1e-15)
    assert fit.max_abs_rel < 1e-9
    # Timings with a negative intercept pull c below zero without the constraint.
    skewed = [(p, n, t - 0.004) for p, n, t in [(p, n, cal.predict_s((2e-5, 2e-9, 0), p, n)) for p, n in GRID]
              if t > 0.01]
    fit = cal.fit_recompute_cost(skewed)
    assert min(fit.coef) >= 0 and fit.c_s == 0.0


def test_fit_rejects_bad_points():
    with pytest.raises(ValueError, match="at least 3"):
        cal.fit_recompute_cost([(0, 256, 0.01), (0, 512, 0.02)])
    with pytest.raises(ValueError, match="len=0"):
        cal.fit_recompute_cost([(0, 256, 0.01), (0, 512, 0.02), (0, 0, 0.02)])
    with pytest.raises(ValueError, match="seconds=-0.1"):
        cal.fit_recompute_cost([(0, 256, 0.01), (0, 512, 0.02), (0, 1024, -0.1)])


def test_prefix_term_diagnostic_finds_a_pure_prefix_cost():
    truth = (2e-5, 2e-9, 0.01)
    d = 1e-6
    pts = [(p, n, cal.predict_s(truth, p, n) + d * p) for p, n in GRID]
    coef, resid = cal.fit_with_prefix_term(pts)
    assert coef == pytest.approx(truth + (d,), rel=1e-6)
    assert max(map(abs, resid)) < 1e-9
    assert cal.fit_recompute_cost(pts).max_abs_rel > 0.01  # the three-term model cannot express it


def test_shapes_match_published_parameter_counts():
    # Decoder matrix weights plus embeddings (and an untied output head) = the models' published sizes.
    def total(s):
        emb = s.vocab_size * s.hidden_size * (1 if s.extra.get("tie_word_embeddings") else 2)
        return s.layers * s.params_per_layer() + emb

    assert total(cal.SHAPES["mistral-7b"]) == pytest.approx(7.24e9, rel=0.01)
    assert total(cal.SHAPES["llama-3.1-8b"]) == pytest.approx(8.03e9, rel=0.01)
    assert total(cal.SHAPES["llama-3-70b"]) == pytest.approx(70.55e9, rel=0.01)
    assert total(cal.SHAPES["llama-2-70b"]) == pytest.approx(68.98e9, rel=0.01)
    assert total(cal.SHAPES["smollm2-135m"]) == pytest.approx(0.1345e9, rel=0.02)
    assert cal.SHAPES["llama-3-70b@16L"].layer_scale == 5
    assert cal.SHAPES["llama-3-70b@16L"].table_model == "llama-3-70b"


def test_rescale_by_work_counts():
    src, dst = cal.SHAPES["mistral-7b"], cal.SHAPES["llama-3-70b"]
    ra, rb, rc = cal.rescale_factors(src, dst)
    assert rb == (80 * 8192) / (32 * 4096) and rc == 80 / 32
    assert ra == pytest.approx(68.45e9 / 6.98e9, rel=0.01)
    assert cal.rescale_cost((1.0, 2.0, 3.0), src, dst) == pytest.approx((ra, 2 * rb, 3 * rc))
    assert cal.rescale_factors(dst, cal.SHAPES["llama-2-70b"]) == (1.0, 1.0, 1.0)


def test_table_format_round_trips_and_merges():
    table = json.loads((ROOT / "streamer" / "recompute_costs.json").read_text())
    assert json.loads(cal.format_table(table)) == json.loads(json.dumps(table))
    new = {"gpu": "h100", "model": "mistral-7b", "a_s_per_token": 1.0, "b_s_per_token_pair": 0.0, "c_s": 2.0,
           "provisional": False, "source": "x"}
    extra = dict(new, gpu="h200")
    merged = cal.merge_entries(table, [new, extra])
    keys = [(e["gpu"], e["model"]) for e in merged["entries"]]
    assert keys == [(e["gpu"], e["model"]) for e in table["entries"]] + [("h200", "mistral-7b")]
    assert merged["entries"][keys.index(("h100", "mistral-7b"))] == new
    assert table["entries"] != merged["entries"]  # the input is not modified in place


def test_shipped_h100_entries_are_the_fits_of_the_committed_measurements():
    """Golden: streamer/recompute_costs.json's measured h100 entries come from the raw data in docs/."""
    table = {(e["gpu"], e["model"]): e
             for e in json.loads((ROOT / "streamer" / "recompute_costs.json").read_text())["entries"]}
    for path in sorted(RUN.glob("calibration-*.json")):
        record = cal.load_record(path)
        shape = cal.SHAPES[record["model"]]
        fit, rows = cal.fit_record(record)
        entry = table[("h100", shape.table_model)]
        scaled = [x * shape.layer_scale for x in fit.coef]
        for key, value in zip(("a_s_per_token", "b_s_per_token_pair", "c_s"), scaled):
            assert entry[key] == pytest.approx(value, rel=1e-3, abs=1e-12), (path.name, key)
        assert entry["provisional"] is (shape.layers_measured is not None)
        assert "scripts/calibrate_recompute.py" in entry["source"]
        assert record["environment"]["gpu"] in entry["source"]
        assert all(math.isfinite(r["rel_residual"]) for r in rows)


def test_load_record_names_the_file_on_bad_input(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"format": ')
    with pytest.raises(SystemExit, match=r"x\.json:1: not JSON"):
        cal.load_record(bad)
    bad.write_text('{"format": "other"}')
    with pytest.raises(SystemExit, match="not a kvcast-recompute-calibration/1 file"):
        cal.load_record(bad)


def _tiny_measure(device):
    return cal.measure_shape(cal.SHAPES["tiny"], device=device, attn="sdpa", lengths=[8, 16], positions=[0, 24],
                             holdout=[(12, 4)], warmup=1, reps=2, prefix_chunk=10, seed=0, log=lambda s: None)


def test_measure_loop_on_a_tiny_cpu_model():
    pytest.importorskip("transformers")
    record = _tiny_measure("cpu")
    points = [(p["pos"], p["len"], p["role"]) for p in record["points"]]
    assert points == [(0, 8, "fit"), (0, 16, "fit"), (12, 4, "holdout"), (24, 8, "fit"), (24, 16, "fit")]
    assert all(len(p["times_s"]) == 2 and len(p["warmup_s"]) == 1 and p["median_s"] > 0 for p in record["points"])
    fit, rows = cal.fit_record(record)
    assert min(fit.coef) >= 0 and len(rows) == 5


def test_truncated_cache_gives_the_same_output_as_a_fresh_prefix():
    """The timing loop reuses one prefix cache, truncated before each trial: the forward it times must compute
    the same thing as one on a freshly built prefix."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import DynamicCache

    model = cal.build_model(cal.SHAPES["tiny"], "cpu", "sdpa", seed=0)
    gen = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, 1000, (1, 20), generator=gen)
    chunk = torch.randint(0, 1000, (1, 6), generator=gen)
    with torch.inference_mode():
        fresh = DynamicCache()
        model(input_ids=prefix, cache=fresh, use_cache=True)
        want = model(input_ids=chunk, cache=fresh, use_cache=True).logits
        reused = DynamicCache()
        model(input_ids=prefix, cache=reused, use_cache=True)
        for _ in range(2):  # a previous trial appended other tokens
            model(input_ids=torch.randint(0, 1000, (1, 9), generator=gen), cache=reused, use_cache=True)
            cal._truncate_cache(reused, 20)
        got = model(input_ids=chunk, cache=reused, use_cache=True).logits
    torch.testing.assert_close(got, want)
    assert reused.get_seq_length() == 26


@pytest.mark.cuda
def test_measure_loop_on_cuda():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    record = _tiny_measure("cuda")
    assert record["settings"]["timer"] == "cuda events"
    assert all(p["median_s"] > 0 for p in record["points"])
