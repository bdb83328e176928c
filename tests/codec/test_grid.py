"""kvcast's grid levels: round trips within the documented bound, sinks, escapes, tables, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcast import codec
from kvcast.codec.api import Codec, ModelFingerprint
from kvcast.codec.grid import channel_steps, token_multipliers
from kvcast.codec.pool import CoderPool
from kvcast.codec.sensitivity import TABLES_DIR, SensitivityTable, TableRegistry, fit_basis, profile_from_positions
from tests.factories import DTYPES, make_kv, tiny_llama

GRID = [lv for lv in codec.levels()
        if codec.describe(lv)["quantizer"] == "grid" and not codec.describe(lv).get("basis")]
BASIS = [lv for lv in codec.levels() if codec.describe(lv).get("basis")]


def random_table(layers, heads, dim, seed=0, name=""):
    """A table with channel sensitivities spread over four decades, a rising distance profile and a basis fitted
    to random correlated Fisher matrices (whose diagonals are the channel sensitivities)."""
    rng = np.random.default_rng(seed)
    shape = (layers, heads, dim)
    key = (10.0 ** rng.uniform(-9, -5, shape)).astype(np.float32)
    value = (10.0 ** rng.uniform(-9, -5, shape)).astype(np.float32)
    mix = rng.normal(size=(2, *shape, dim)) / math.sqrt(dim)
    corr = mix @ np.swapaxes(mix, -1, -2) + np.eye(dim)
    corr /= np.sqrt(np.einsum("...ii->...i", corr))[..., None, :] * np.sqrt(np.einsum("...ii->...i", corr))[..., None]
    scale = np.sqrt(np.stack([key, value]).astype(np.float64))
    fisher = corr * scale[..., None, :] * scale[..., None]
    basis, synthesis = fit_basis(fisher, np.eye(dim) + 0.5 * corr, shrink=0.3)
    return SensitivityTable(
        model={"name": name, "layers": layers, "kv_heads": heads, "head_dim": dim}, key=key, value=value,
        distance_edges=np.array([0, 1, 4, 16, 64, 1e6], np.float32),
        distance_profile=np.array([30, 8, 2, 1, 0.5], np.float32), basis=basis, synthesis=synthesis)


def grid_bound(kv, table, level, token_start, context_end):
    """Documented bound per value: half the step (channel step x token multiplier), fp16 rounding on top."""
    spec = codec.describe(level)
    tokens = kv[0][0].shape[2]
    steps = channel_steps(table.channel_fisher(), spec["step"]).float()             # [2, L, C]
    mult = token_multipliers(table, token_start, tokens, context_end, spec["recency"]).float()
    return steps.unsqueeze(2) * mult.view(1, 1, -1, 1) / 2                          # [2, L, T, C]


def value_error(kv, out):
    """|x - x'| as [2, L, T, C] (channels = heads x head_dim, head-major)."""
    def stack(pairs):
        t = torch.stack([torch.stack([p[0][0].float(), p[1][0].float()]) for p in pairs], dim=1)  # [2,L,H,T,D]
        return t.permute(0, 1, 3, 2, 4).reshape(*t.shape[:2], t.shape[3], -1)
    return (stack(kv) - stack(out)).abs(), stack(kv)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(level=st.sampled_from(GRID), layers=st.integers(1, 3), heads=st.sampled_from([1, 2, 3, 8]),
       tokens=st.integers(1, 300), dim=st.sampled_from([1, 4, 16, 64]), dtype=st.sampled_from(list(DTYPES)),
       token_start=st.integers(0, 6), extra_context=st.integers(0, 500), seed=st.integers(0, 2**16),
       zeros=st.lists(st.integers(0, 299), max_size=3))
def test_grid_levels_round_trip_within_documented_bound(level, layers, heads, tokens, dim, dtype, token_start,
                                                       extra_context, seed, zeros):
    kv = make_kv(layers, heads, tokens, dim, DTYPES[dtype], seed, zero_tokens=zeros, scale=0.05)
    table = random_table(layers, heads, dim, seed)
    context_end = token_start + tokens + extra_context
    data = codec.encode(kv, level, token_start=token_start, context_end=context_end, sensitivity=table)
    out = codec.decode(data)
    assert all(t.dtype == DTYPES[dtype] and t.shape == s.shape for p, q in zip(out, kv) for t, s in zip(p, q))
    err, x = value_error(kv, out)
    fp16 = x.abs() * 2 ** -10 + 2 ** -24       # sinks/escapes are fp16; the mean is fp16 too
    bound = grid_bound(kv, table, level, token_start, context_end)
    out_eps = (x.abs() + bound) * torch.finfo(DTYPES[dtype]).eps  # the decoded value's rounding to dtype
    assert bool((err <= bound * (1 + 1e-5) + fp16 + out_eps).all()), float((err - bound).max())
    sinks = max(0, min(tokens, 4 - token_start))
    if sinks:  # attention-sink tokens are stored as fp16
        assert bool((err[:, :, :sinks] <= fp16[:, :, :sinks] + out_eps[:, :, :sinks]).all())


def test_sink_tokens_and_escapes_are_exact_in_fp16():
    kv = make_kv(2, 2, 64, 8, torch.float16, seed=3, scale=0.05)
    kv[1][0][0, 1, 40, 3] = 300.0  # far out: escaped, stored exactly
    table = random_table(2, 2, 8)
    data = codec.encode(kv, "kvcast-2", sensitivity=table)
    info = codec.inspect(data)
    assert info["grid"]["sink_rows"] == 4
    out = codec.decode(data)
    assert float(out[1][0][0, 1, 40, 3]) == 300.0
    for (k, v), (k2, v2) in zip(kv, out):
        assert torch.equal(k[:, :, :4], k2[:, :, :4]) and torch.equal(v[:, :, :4], v2[:, :, :4])
    later = codec.inspect(codec.encode(kv, "kvcast-2", token_start=100, sensitivity=table))
    assert later["grid"]["sink_rows"] == 0


def test_ladder_trades_bits_for_error_and_recent_tokens_get_finer_steps():
    kv = make_kv(3, 2, 400, 16, torch.float16, seed=9, scale=0.05)
    table = random_table(3, 2, 16, seed=2)
    stats = []
    for level in GRID:
        data = codec.encode(kv, level, sensitivity=table)
        err, _ = value_error(kv, codec.decode(data))
        stats.append((codec.inspect(data)["bits_per_value"], float((err ** 2).mean())))
    assert [b for b, _ in stats] == sorted((b for b, _ in stats), reverse=True)
    assert [e for _, e in stats] == sorted(e for _, e in stats)
    loud = make_kv(3, 2, 400, 16, torch.float16, seed=9, scale=2.0)  # errors limited by the step, not the data
    err, _ = value_error(loud, codec.decode(codec.encode(loud, "kvcast-2", sensitivity=table)))
    assert float(err[:, :, -4:].mean()) < 0.5 * float(err[:, :, 4:200].mean())
    fine = codec.encode(loud, "kvcast-4", sensitivity=table)   # wide classes: low bits stored raw
    assert any(b for group in codec.inspect(fine)["grid"]["raw_bits"] for b in group)
    err, x = value_error(loud, codec.decode(fine))
    bound = grid_bound(loud, table, "kvcast-4", 0, 400)
    assert bool((err <= bound * (1 + 1e-5) + (x.abs() + bound) * 2 ** -10).all())  # + fp16 output rounding


def basis_error(kv, out, table, sink_rows):
    """|A (x - x')| per component of the non-sink tokens, and |A x|, as [2, L, T, C]."""
    ref = torch.stack([torch.stack([p[0][0].float(), p[1][0].float()]) for p in kv], dim=1)   # [2, L, H, T, D]
    got = torch.stack([torch.stack([p[0][0].float(), p[1][0].float()]) for p in out], dim=1)
    a = torch.from_numpy(table.basis)                                                       # [2, L, H, D, D]
    y_err = torch.einsum("klhde,klhte->klhtd", a, (ref - got)[:, :, :, sink_rows:]).abs()
    y = torch.einsum("klhde,klhte->klhtd", a, ref[:, :, :, sink_rows:]).abs()
    def flat(t):
        return t.permute(0, 1, 3, 2, 4).reshape(*t.shape[:2], t.shape[3], t.shape[2] * t.shape[4])
    return flat(y_err), flat(y)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(level=st.sampled_from(BASIS), layers=st.integers(1, 3), heads=st.sampled_from([1, 2, 3]),
       tokens=st.integers(1, 300), dim=st.sampled_from([1, 4, 16, 64]), dtype=st.sampled_from(list(DTYPES)),
       token_start=st.integers(0, 6), extra_context=st.integers(0, 500), seed=st.integers(0, 2**16))
def test_basis_levels_round_trip_within_the_documented_bound_in_the_basis(level, layers, heads, tokens, dim, dtype,
                                                                          token_start, extra_context, seed):
    kv = make_kv(layers, heads, tokens, dim, DTYPES[dtype], seed, scale=0.05)
    table = random_table(layers, heads, dim, seed)
    context_end = token_start + tokens + extra_context
    data = codec.encode(kv, level, token_start=token_start, context_end=context_end, sensitivity=table)
    assert codec.inspect(data)["grid"]["basis"] == table.basis_digest
    out = codec.decode(data, dtype=torch.float32, sensitivity=table)
    sinks = max(0, min(tokens, 4 - token_start))
    err, x = value_error(kv, out)
    assert bool((err[:, :, :sinks] <= x[:, :, :sinks].abs() * 2 ** -10 + 2 ** -24).all())    # sinks: fp16
    y_err, y = basis_error(kv, out, table, sinks)
    spec = codec.describe(level)
    step = float(channel_steps(np.full((1, 1, 1), table.basis_scale, np.float32), spec["step"]).float())
    mult = token_multipliers(table, token_start, tokens, context_end, spec["recency"]).float()[sinks:]
    bound = step * mult.view(1, 1, -1, 1) / 2
    # escaped components are fp16; the synthesis and the analysis here are float32 products
    slack = (y + bound) * 2 ** -10 + 1e-4 * float(y.max() if y.numel() else 0) + 2 ** -24
    assert bool((y_err <= bound * (1 + 1e-4) + slack).all()), float((y_err - bound).max())


def test_basis_objects_decode_only_with_their_table(tmp_path):
    kv = make_kv(2, 3, 90, 16, torch.float16, seed=4, scale=0.05)
    table, other = random_table(2, 3, 16, seed=1, name="m"), random_table(2, 3, 16, seed=2, name="m")
    data = codec.encode(kv, "kvcast-basis-2", sensitivity=table)
    with pytest.raises(codec.CodecError, match="sensitivity basis"):
        codec.decode(data)
    with pytest.raises(codec.CodecError, match="sensitivity basis"):
        codec.decode(data, sensitivity=other)
    direct = codec.decode(data, sensitivity=table)
    table.save(tmp_path / "m.safetensors")      # or a codec whose tables folder holds it
    found = Codec(tables=TableRegistry([tmp_path])).decode(data)
    assert all(torch.equal(a, b) for p, q in zip(direct, found) for a, b in zip(p, q))
    back = SensitivityTable.load(tmp_path / "m.safetensors")
    assert back.basis_digest == table.basis_digest and np.array_equal(back.synthesis, table.synthesis)
    # a flat table's basis is the identity, whose digest every decoder knows
    flat = SensitivityTable.uniform(2, 3, 16)
    assert len(codec.decode(codec.encode(kv, "kvcast-basis-2", sensitivity=flat))) == 2
    bare = SensitivityTable(model=table.model, key=table.key, value=table.value,
                            distance_edges=table.distance_edges, distance_profile=table.distance_profile)
    with pytest.raises(codec.CodecError, match="has none"):
        codec.encode(kv, "kvcast-basis-2", sensitivity=bare)
    with pytest.raises(codec.CodecError, match="basis and synthesis go together"):
        SensitivityTable(model=table.model, key=table.key, value=table.value, distance_edges=table.distance_edges,
                         distance_profile=table.distance_profile, basis=table.basis)


def test_basis_ladder_trades_bits_for_error_in_the_basis():
    kv = make_kv(3, 2, 400, 16, torch.float16, seed=9, scale=0.05)
    table = random_table(3, 2, 16, seed=2)
    stats = []
    for level in BASIS:
        data = codec.encode(kv, level, sensitivity=table)
        y_err, _ = basis_error(kv, codec.decode(data, dtype=torch.float32, sensitivity=table), table, 4)
        stats.append((codec.inspect(data)["bits_per_value"], float((y_err ** 2).mean())))
    assert [b for b, _ in stats] == sorted((b for b, _ in stats), reverse=True)
    assert [e for _, e in stats] == sorted(e for _, e in stats)


def test_grid_bytes_do_not_depend_on_worker_processes():
    kv = make_kv(6, 3, 300, 64, torch.float16, seed=11, scale=0.05)
    table = random_table(6, 3, 64)
    inproc = Codec(pool=CoderPool(workers=1))
    with CoderPool(workers=2, min_parallel_symbols=0) as pool:
        a = inproc.encode(kv, "kvcast-3", sensitivity=table)
        b = Codec(pool=pool).encode(kv, "kvcast-3", sensitivity=table)
        assert a == b
        assert all(torch.equal(x, y) for p, q in zip(inproc.decode(a), Codec(pool=pool).decode(b))
                   for x, y in zip(p, q))


def test_grid_levels_need_a_matching_table():
    kv = make_kv(2, 2, 10, 8, torch.float16, seed=1)
    with pytest.raises(codec.CodecError, match="kvcast calibrate"):
        codec.encode(kv, "kvcast-2", model=ModelFingerprint("unknown-model", 2, 2, 8, "float16"))
    with pytest.raises(codec.CodecError, match="shape"):
        codec.encode(kv, "kvcast-2", sensitivity=random_table(3, 2, 8))
    with pytest.raises(codec.CodecError, match="context_end"):
        codec.encode(kv, "kvcast-2", token_start=5, context_end=5, sensitivity=random_table(2, 2, 8))


def test_table_round_trips_through_safetensors_and_rejects_garbage(tmp_path):
    table = random_table(2, 3, 4, name="m")
    path = table.save(tmp_path / "m.safetensors")
    back = SensitivityTable.load(path)
    assert np.array_equal(back.key, table.key) and np.array_equal(back.distance_profile, table.distance_profile)
    assert back.matches(ModelFingerprint("m", 2, 3, 4, "float16"))
    assert not back.matches(ModelFingerprint("m", 2, 3, 8, "float16"))
    assert not back.matches(ModelFingerprint("other", 2, 3, 4, "float16"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(codec.CodecError, match="junk"):
        SensitivityTable.load(tmp_path / "junk.safetensors")
    with pytest.raises(codec.CodecError):
        SensitivityTable(model=table.model, key=-table.key, value=table.value,
                         distance_edges=table.distance_edges, distance_profile=table.distance_profile)
    registry = TableRegistry([tmp_path / "none", tmp_path / "empty"])
    with pytest.raises(codec.CodecError, match="no sensitivity table"):
        registry.find(ModelFingerprint("m", 2, 3, 4, "float16"))


def test_distance_profile_bins_positions_from_the_end():
    per_token = np.r_[np.full(4, 100.0), np.ones(60), np.full(4, 10.0)]
    edges, profile = profile_from_positions(per_token, sink_tokens=4)
    assert edges[0] == 0 and np.all(np.diff(edges) > 0)
    body = per_token[4:]
    assert profile[0] == pytest.approx(10.0 / body.mean())   # the last token
    assert profile[-1] == pytest.approx(1.0 / body.mean())   # the far past


def test_shipped_smollm2_table_is_found_and_sane():
    paths = sorted(TABLES_DIR.glob("*.safetensors"))
    assert paths, "codec/tables ships at least the SmolLM2 table"
    table = SensitivityTable.load(paths[0])
    fp = ModelFingerprint(table.model["name"], table.model["layers"], table.model["kv_heads"],
                          table.model["head_dim"], "float16")
    assert TableRegistry().find(fp).model == table.model
    assert table.distance_profile[0] > 5 * table.distance_profile[-3:].mean()  # recent tokens matter more
    assert table.meta["source"].startswith("wikitext-2/valid")                   # calibrated on the tuning split


def test_calibrate_builds_a_table_that_drives_the_grid_levels(tmp_path):
    from kvcast.codec.calibrate import calibrate
    from kvcast.codec.hf import fingerprint_from_config, kv_from_cache

    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    passages = [torch.randint(0, 97, (1, 48), generator=g) for _ in range(3)]
    table = calibrate(model, passages, name="tiny", context_tokens=40, continuation_tokens=8, sink_tokens=2,
                      trim=0.05)
    assert table.key.shape == table.value.shape == (2, 2, 16)
    assert np.all(table.key > 0) and np.all(table.value > 0)
    norms = np.linalg.norm(table.sink_key, axis=-1)  # a mean of unit vectors
    assert np.all(norms > 0) and np.all(norms <= 1 + 1e-5)
    assert table.meta["passages"] == 3 and table.meta["trim"] == 0.05
    back = SensitivityTable.load(table.save(tmp_path / "tiny.safetensors"))
    assert np.array_equal(back.score_profile, table.score_profile)
    fingerprint = fingerprint_from_config(model.config, name="tiny", dtype=torch.float32)
    with torch.no_grad():
        kv = kv_from_cache(model(passages[0][:, :40], use_cache=True).cache)
    assert back.kv_signature is not None and back.kv_signature == fingerprint.kv_signature
    registry = TableRegistry([tmp_path])
    coder = Codec(tables=registry)
    data = coder.encode(kv, "kvcast-2", model=fingerprint)
    assert len(coder.decode(data, expect_model=fingerprint)) == 2
    # found by the KV signature, whatever the model is called
    renamed = fingerprint_from_config(model.config, name="tiny-copy", dtype=torch.float32)
    assert coder.encode(kv, "kvcast-2", model=renamed) != b""


def test_calibrate_fits_a_basis_whose_diagonal_is_the_channel_table_and_mixes_longer_contexts(tmp_path):
    from kvcast.codec.calibrate import calibrate
    from kvcast.codec.hf import fingerprint_from_config, kv_from_cache

    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    passages = [torch.randint(0, 97, (1, 48), generator=g) for _ in range(3)]
    longer = [torch.randint(0, 97, (1, 88), generator=g) for _ in range(2)]
    kw = dict(name="tiny", context_tokens=40, continuation_tokens=8, sink_tokens=2, trim=0.05)
    plain = calibrate(model, passages, **kw)
    mixed = calibrate(model, passages, long_passages={80: longer}, **kw)
    # the per-channel table does not depend on the basis' extra passages
    assert np.array_equal(plain.key, mixed.key) and np.array_equal(plain.value, mixed.value)
    assert mixed.meta["basis_context_tokens"] == [40, 80] and mixed.meta["basis_passages"] == [3, 2]
    assert plain.basis_digest != mixed.basis_digest
    for table in (plain, mixed):
        eye = np.broadcast_to(np.eye(16), table.basis.shape)
        assert np.allclose(np.einsum("klhde,klhef->klhdf", table.basis, table.synthesis), eye, atol=1e-4)
    # without long passages and without shrinkage the basis whitens the full Fisher matrix, whose diagonal is the
    # channel table: A^T A = S / basis_scale, so diag(A^T A) * basis_scale = F_c
    exact = calibrate(model, passages, basis_shrink=0.0, **kw)
    diag = np.einsum("klhdc,klhdc->klhc", exact.basis.astype(np.float64), exact.basis.astype(np.float64))
    assert np.allclose(diag * exact.basis_scale, np.stack([exact.key, exact.value]), rtol=1e-3)
    fingerprint = fingerprint_from_config(model.config, name="tiny", dtype=torch.float32)
    with torch.no_grad():
        kv = kv_from_cache(model(passages[0][:, :40], use_cache=True).cache)
    data = codec.encode(kv, "kvcast-basis-2", model=fingerprint, sensitivity=mixed)
    out = codec.decode(data, sensitivity=mixed)
    assert len(out) == 2 and all(torch.isfinite(t).all() for p in out for t in p)


def test_sink_scores_find_tokens_that_point_like_the_sink():
    table = random_table(2, 2, 8)
    rng = np.random.default_rng(0)
    sink = rng.normal(size=(2, 2, 8)).astype(np.float32)
    sink /= np.linalg.norm(sink, axis=-1, keepdims=True)
    table = SensitivityTable(model=table.model, key=table.key, value=table.value,
                             distance_edges=table.distance_edges, distance_profile=table.distance_profile,
                             sink_key=sink, score_edges=np.array([-1, 0.5, 1.01], np.float32),
                             score_profile=np.array([0.5, 40.0], np.float32))
    keys = rng.normal(size=(2, 2, 10, 8)).astype(np.float32)
    keys[:, :, 6] = 3 * sink  # token 6 points exactly like the sink
    scores = table.sink_scores(keys)
    assert scores[6] == pytest.approx(1.0, abs=1e-5) and np.all(np.delete(scores, 6) < 0.9)
    mult = token_multipliers(table, 100, 10, 10_000, 1.0, keys).float()
    assert float(mult[6]) < 0.25 * float(np.median(np.delete(mult.numpy(), 6)))
