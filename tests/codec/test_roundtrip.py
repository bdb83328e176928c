"""Codec round trips: lossless levels bit-exact, lossy levels within each level's documented error bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcast import codec
from kvcast.codec.api import Codec
from kvcast.codec.levels import LevelSpec
from kvcast.codec.pool import CoderPool
from tests.factories import DTYPES, make_kv

LOSSY = [lv for lv in codec.levels() if codec.describe(lv)["quantizer"] == "absmax_token"]


def per_token_absmax(kv):
    """[2, L, T] absmax over all heads and channels, as the quantizer sees it."""
    return torch.stack([torch.stack([t[0].float().abs().amax(dim=(0, 2)) for t in pair]) for pair in kv], dim=1)


def error_bound(kv, spec: dict, out_dtype: torch.dtype) -> torch.Tensor:
    """The documented bound per (kv, layer, token): s/(2M) + 2^-10 s, deltas measured against the anchor."""
    layers = len(kv)
    lvl = LevelSpec.from_dict(spec)
    kb, vb = lvl.bins_per_layer(layers)
    half = torch.tensor([kb, vb], dtype=torch.float32).div(2).sub(1).view(2, layers, 1)
    s = per_token_absmax(kv)
    if lvl.delta_group:
        tokens = s.shape[2]
        anchor_s = s[:, :, ::lvl.delta_group]
        group_of = torch.arange(tokens) // lvl.delta_group
        sa = anchor_s[:, :, group_of]
        a_half = lvl.anchor_bins / 2 - 1
        s_delta = s + sa * (1 + 2 ** -9)
        bound = s_delta / (2 * half) + 2 ** -10 * s_delta
        anchors = torch.zeros(tokens, dtype=torch.bool)
        anchors[::lvl.delta_group] = True
        bound[:, :, anchors] = (s / (2 * a_half) + 2 ** -10 * s)[:, :, anchors]
    else:
        bound = s / (2 * half) + 2 ** -10 * s
    eps = torch.finfo(out_dtype).eps
    return bound * (1 + 1e-5) + s * eps + 1e-30


def max_error(kv, out) -> torch.Tensor:
    return torch.stack([torch.stack([(a[0].float() - b[0].float()).abs().amax(dim=(0, 2)) for a, b in zip(p, q)])
                        for p, q in zip(kv, out)], dim=1)


shapes = st.tuples(st.integers(1, 3), st.sampled_from([1, 2, 3, 4, 8]), st.integers(1, 300),
                   st.sampled_from([1, 4, 8, 16, 64]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_raw_is_bit_exact_for_fp16(shape, seed):
    layers, heads, tokens, dim = shape
    kv = make_kv(layers, heads, tokens, dim, torch.float16, seed, zero_tokens=(0,))
    out = codec.decode(codec.encode(kv, "raw"))
    for (k, v), (k2, v2) in zip(kv, out):
        assert k2.dtype == torch.float16 and k2.shape == k.shape
        assert torch.equal(k.view(torch.int16), k2.view(torch.int16))
        assert torch.equal(v.view(torch.int16), v2.view(torch.int16))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_raw_rounds_other_dtypes_to_fp16_and_restores_dtype(dtype):
    kv = make_kv(2, 2, 17, 8, DTYPES[dtype], seed=1)
    out = codec.decode(codec.encode(kv, "raw"))
    for (k, _), (k2, _) in zip(kv, out):
        assert k2.dtype == DTYPES[dtype]
        assert torch.equal(k.to(torch.float16).to(DTYPES[dtype]), k2)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(level=st.sampled_from(LOSSY), shape=shapes, dtype=st.sampled_from(list(DTYPES)),
       seed=st.integers(0, 2**16), zeros=st.lists(st.integers(0, 299), max_size=3))
def test_lossy_levels_stay_within_documented_bound(level, shape, dtype, seed, zeros):
    layers, heads, tokens, dim = shape
    kv = make_kv(layers, heads, tokens, dim, DTYPES[dtype], seed, zero_tokens=zeros)
    data = codec.encode(kv, level)
    out = codec.decode(data)
    assert [tuple(t.shape) for p in out for t in p] == [tuple(t.shape) for p in kv for t in p]
    assert all(t.dtype == DTYPES[dtype] for p in out for t in p)
    err = max_error(kv, out)
    bound = error_bound(kv, codec.describe(level), DTYPES[dtype])
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max())}"
    for z in zeros:  # an all-zero token decodes to exact zeros at non-delta levels (no division by zero)
        if z < tokens and not codec.describe(level)["delta_group"]:
            assert all(float(t[0, :, z].abs().max()) == 0 for p in out for t in p)


@pytest.mark.parametrize("level", [lv for lv in codec.levels() if codec.describe(lv)["quantizer"] != "grid"])
def test_every_level_round_trips_smollm2_shaped_object(level):  # grid levels: tests/codec/test_grid.py
    kv = make_kv(30, 3, 300, 64, torch.float16, seed=7)
    data = codec.encode(kv, level, token_start=4096)
    info = codec.inspect(data)
    assert info["tokens"] == {"start": 4096, "count": 300}
    assert info["level"]["name"] == level
    assert sum(info["sizes"][k] for k in ("header", "side", "payload")) == info["sizes"]["total"] == len(data)
    assert info["values"] == 2 * 30 * 3 * 64 * 300
    out = codec.decode(data)
    err = max_error(kv, out)
    if level == "raw":
        assert float(err.max()) == 0.0
    else:
        assert bool((err <= error_bound(kv, codec.describe(level), torch.float16)).all())


def test_more_bins_means_less_error_and_more_bits():
    kv = make_kv(4, 2, 256, 32, torch.float16, seed=3)
    stats = {}
    for lv in ("cachegen-1", "cachegen-2", "cachegen-3", "int8"):
        data = codec.encode(kv, lv)
        out = codec.decode(data)
        mse = float(sum(((a.float() - b.float()) ** 2).mean() for p, q in zip(kv, out) for a, b in zip(p, q)))
        stats[lv] = (codec.inspect(data)["bits_per_value_payload"], mse)
    order = ["cachegen-1", "cachegen-2", "cachegen-3", "int8"]
    assert [stats[lv][0] for lv in order] == sorted(stats[lv][0] for lv in order)
    assert [stats[lv][1] for lv in order] == sorted((stats[lv][1] for lv in order), reverse=True)


def test_worker_processes_give_identical_bytes():
    kv = make_kv(6, 3, 300, 64, torch.float16, seed=11)
    inproc = Codec(pool=CoderPool(workers=1))
    with CoderPool(workers=2, min_parallel_symbols=0) as pool:
        parallel = Codec(pool=pool)
        for level in ("cachegen-2", "cachegen-delta-2"):
            a = inproc.encode(kv, level)
            b = parallel.encode(kv, level)
            assert a == b
            out_a, out_b = inproc.decode(a), parallel.decode(b)
            assert all(torch.equal(x, y) for p, q in zip(out_a, out_b) for x, y in zip(p, q))


def test_cachegen_bins_map_proportionally_to_depth():
    spec = LevelSpec.from_dict(codec.describe("cachegen-2"))
    kb, vb = spec.bins_per_layer(32)
    assert kb == (32,) * 10 + (16,) * 22 and vb == (32,) * 2 + (16,) * 30  # CacheGen's Mistral-7B table
    kb30, vb30 = spec.bins_per_layer(30)
    assert len(kb30) == 30 and kb30.count(32) == 10 and vb30.count(32) == 2
    assert spec.bins_per_layer(1) == ((32,), (32,))


def test_cdf_is_cachegen_normalised():
    from kvcast.codec.rangecoder import cachegen_cdf

    counts = torch.tensor([[5, 0, 3, 0], [0, 0, 0, 0]])
    cdf = cachegen_cdf(counts).numpy().view(np.uint16).astype(int)
    b = 4
    assert cdf[0].tolist() == [(65535 - b) * c // 8 + i for i, c in enumerate([0, 5, 5, 8, 8])]
    assert np.all(np.diff(cdf, axis=1) > 0)
