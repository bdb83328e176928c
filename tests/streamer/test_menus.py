"""Profiles, model shapes, recompute costs and the menus built from them."""

from __future__ import annotations

import json
import math

import pytest

from kvcast.streamer.menus import (
    LEVEL_SETS,
    MODEL_SHAPES,
    ModelShape,
    RecomputeCost,
    build_menus,
    decode_values_per_s,
    default_decode_speeds,
    fallback_decode_values_per_s,
    recompute_cost,
    recompute_costs,
    resolve_levels,
)
from kvcast.streamer.profile import Profile, ProfileError, default_profile


def test_default_profile_is_the_measured_one_with_every_codec_level():
    from kvcast import codec
    p = default_profile()
    assert not p.provisional and "kvcast eval codec" in p.note and "test" in p.note
    assert p.level_names == tuple(codec.levels())
    assert p.quality_metric == "kl_per_token" and p.model_layers == 30
    for r in p.levels:
        assert r.kl_per_token == r.quality_loss and 0 < r.bits_per_value <= 16.01
        assert r.top1_agreement is not None and 0.5 < r.top1_agreement <= 1.0
    assert p.level("raw").quality_loss < 1e-6  # fp16 rounding of the fp32 model's KV
    # measured: kvcast-3 is smaller and better than cachegen-3 (after it in codec.levels()), so the
    # profile's order is monotone in neither bits nor quality
    k3, c3 = p.level("kvcast-3"), p.level("cachegen-3")
    assert k3.bits_per_value < c3.bits_per_value and k3.quality_loss < c3.quality_loss
    bits = [r.bits_per_value for r in p.levels]
    losses = [r.quality_loss for r in p.levels]
    assert bits != sorted(bits, reverse=True) and losses != sorted(losses)


def test_profile_round_trip(tmp_path):
    p = default_profile()
    path = tmp_path / "p.json"
    p.save(path)
    q = Profile.load(path)
    assert q == p and q.source == str(path)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format="nope"), "'format'"),
    (lambda d: d.update(levels=[]), "'levels' must be a non-empty list"),
    (lambda d: d["levels"][1].pop("bits_per_value"), r"levels\[1\] \(int8\).bits_per_value is missing"),
    (lambda d: d["levels"][2].update(quality_loss="x"),
     r"levels\[2\] \(kvcast-4\).quality_loss must be"),
    (lambda d: d["levels"][0].update(bits_per_value=-1), "must be > 0"),
    (lambda d: d["levels"][3].update(level="raw"), "appears twice"),
    (lambda d: d["levels"][3].update(level="text"), "other than 'text'"),
    (lambda d: d["model"].update(layers=-2), "model.layers"),
])
def test_malformed_profiles_name_the_file_and_field(tmp_path, mutate, message):
    data = default_profile().to_json_dict()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=message) as info:
        Profile.load(path)
    assert str(path) in str(info.value)


def test_profile_json_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n "format": "kvcast-profile/1",\n "levels": [,]\n}')
    with pytest.raises(ProfileError, match=rf"{path}:3: not valid JSON"):
        Profile.load(path)


def test_named_shapes():
    m = ModelShape.named("mistral-7b")
    assert (m.layers, m.kv_heads, m.head_dim) == (32, 8, 128)
    assert m.raw_bytes_per_token == 131072  # 128 KiB per token in fp16
    assert MODEL_SHAPES["llama-3-70b"].layers == 80
    assert ModelShape.parse("30,3,64").values_per_token == 2 * 30 * 3 * 64
    with pytest.raises(ValueError, match="known"):
        ModelShape.named("gpt-9")


def test_recompute_cost_grows_with_position_and_sums_to_a_whole_prefill():
    cost = recompute_cost("h100/mistral-7b")
    assert cost.prefill_s(15000, 1500) > cost.prefill_s(0, 1500)
    n, k = 16384, 1024
    chunked = sum(cost.prefill_s(p, k) for p in range(0, n, k))
    whole = cost.prefill_s(0, n)
    assert chunked == pytest.approx(whole + (n // k - 1) * cost.c_s)
    assert recompute_cost("1e-5,2e-9,0.001") == RecomputeCost(1e-5, 2e-9, 0.001, name="1e-5,2e-9,0.001")
    assert "a100/mistral-7b" in recompute_costs()
    with pytest.raises(ValueError, match="known"):
        recompute_cost("tpu/mistral-7b")


def test_measured_recompute_costs_are_not_provisional_and_stand_ins_are():
    costs = recompute_costs()
    for measured in ("h100/mistral-7b", "h100/llama-3.1-8b", "h100/smollm2-135m"):
        assert not costs[measured].provisional, measured
    # 70B: 16 of 80 layers measured and scaled; A100: read off Cake's figure
    for stand_in in ("h100/llama-3-70b", "h100/llama-2-70b", "a100/mistral-7b", "a100/llama-3.1-8b"):
        assert costs[stand_in].provisional, stand_in
    assert not recompute_cost("1e-5,2e-9,0.001").provisional


def test_menus_scale_the_profile_to_the_target_model():
    p = default_profile()
    shape = ModelShape.named("mistral-7b")
    cost = recompute_cost("h100/mistral-7b")
    menus = build_menus(p, shape, 4000, 1536, cost)
    assert [m.tokens for m in menus] == [1536, 1536, 928]
    assert [m.start_token for m in menus] == [0, 1536, 3072]
    values = 1536 * shape.values_per_token
    row = menus[0].option("cachegen-2")
    assert row.nbytes == math.ceil(values * p.level("cachegen-2").bits_per_value / 8)
    assert row.decode_s == pytest.approx(values / default_decode_speeds()["cachegen-2"])
    assert row.quality_loss == p.quality_loss_at("cachegen-2", 4000 - 768, first_chunk=True)
    assert menus[0].option("raw").nbytes == 1536 * shape.raw_bytes_per_token
    assert menus[0].option("raw").decode_s == 0.0
    assert menus[2].recompute_s == pytest.approx(cost.prefill_s(3072, 928))
    assert [o.level for o in menus[0].levels] == list(p.level_names)


def test_menus_use_measured_gpu_decode_speed_and_level_restriction():
    data = default_profile().to_json_dict()
    index = [row["level"] for row in data["levels"]].index("cachegen-2")
    data["levels"][index]["gpu_decode_values_per_s"] = 1e9
    p = Profile.from_json_dict(data)
    menus = build_menus(p, ModelShape.named("smollm2-135m"), 2048, 2048, recompute_cost("h100/smollm2-135m"),
                        levels=("cachegen-2", "raw"))
    assert [o.level for o in menus[0].levels] == ["raw", "cachegen-2"]
    assert menus[0].option("cachegen-2").decode_s == pytest.approx(2048 * 2 * 30 * 3 * 64 / 1e9)
    with pytest.raises(ProfileError, match="no level 'zstd'"):
        build_menus(p, ModelShape.named("smollm2-135m"), 10, 10, recompute_cost("h100/smollm2-135m"),
                    levels=("zstd",))


def test_level_sets_pick_menus_in_the_profile_order():
    p = default_profile()
    assert resolve_levels(p, None) == resolve_levels(p, "all") == p.level_names
    # one codec's set is that codec's levels only: every controller on it has the same menu
    assert resolve_levels(p, "cachegen") == ("cachegen-3", "cachegen-2", "cachegen-1")
    assert resolve_levels(p, "kvcast") == ("kvcast-4", "kvcast-basis-3", "kvcast-basis-2", "kvcast-3", "kvcast-basis-1",
                                           "kvcast-2", "kvcast-1")
    assert resolve_levels(p, "baselines") == ("raw", "int8")
    # sets and names unite, in the profile's order
    assert resolve_levels(p, "cachegen-delta-3,cachegen,baselines") == ("raw", "int8", "cachegen-delta-3",
                                                                        "cachegen-3", "cachegen-2", "cachegen-1")
    assert resolve_levels(p, ("kvcast-2", "raw")) == ("raw", "kvcast-2")
    assert set(LEVEL_SETS) == {"all", "cachegen", "kvcast", "baselines"}
    menus = build_menus(p, ModelShape.named("mistral-7b"), 4000, 1536, recompute_cost("h100/mistral-7b"),
                        levels="kvcast")
    assert [o.level for o in menus[0].levels] == list(resolve_levels(p, "kvcast"))
    with pytest.raises(ProfileError, match="no level 'zstd'.*or a set: all, cachegen, kvcast, baselines"):
        resolve_levels(p, "zstd")
    only_cachegen = p.restricted(["raw", "cachegen-2"])
    with pytest.raises(ProfileError, match="no level of the set 'kvcast'"):
        resolve_levels(only_cachegen, "kvcast")


def test_default_gpu_decode_speeds_come_from_the_shipped_h100_benchmark():
    from importlib import resources

    from kvcast.streamer.menus import GPU_BENCH_FILE, gpu_decode_speeds

    bench = json.loads(resources.files("kvcast.streamer").joinpath(GPU_BENCH_FILE).read_text())
    assert "H100" in bench["summary"]["device"]
    speeds = default_decode_speeds()
    assert speeds == gpu_decode_speeds(bench)
    assert speeds["raw"] is None
    assert speeds["int8"] == pytest.approx(bench["summary"]["copy_floor_gbs"] * 1e9 / 3)
    tokens = bench["settings"]["object_tokens"]
    row = next(r for r in bench["rows"] if r["level"] == "kvcast-2" and r["context_tokens"] == tokens)
    assert speeds["kvcast-2"] == pytest.approx(row["gbs_fp16"] * 1e9 / 2)
    # every level of the default profile has a measured speed (no provisional figure), except the basis levels,
    # which the H100 benchmark predates: they take the slowest measured level's speed (`decode_values_per_s`)
    from kvcast import codec
    basis = {lv for lv in codec.levels() if codec.describe(lv).get("basis")}
    assert set(default_profile().level_names) - basis <= set(speeds)
    assert all(decode_values_per_s(default_profile(), lv) == fallback_decode_values_per_s() for lv in basis)


def test_profile_lossy_prefix_ratio_is_read_checked_and_resolved(tmp_path):
    from kvcast.streamer.config import SimulationConfig

    p = default_profile()
    # the shipped profile holds the measured penalty (kvcast eval position), which scoring uses by default
    assert p.lossy_prefix_ratio is None and p.text_over_lossy_prefix_penalty > 0
    assert SimulationConfig().resolved_lossy_prefix_ratio(p) == p.text_over_lossy_prefix_penalty
    from dataclasses import replace
    assert SimulationConfig().resolved_lossy_prefix_ratio(replace(p, text_over_lossy_prefix_penalty=None)) == 0.0
    data = p.to_json_dict()
    data["lossy_prefix_ratio"] = 0.4
    measured = Profile.from_json_dict(data, "x.json")
    assert measured.lossy_prefix_ratio == 0.4 and measured.restricted(["raw"]).lossy_prefix_ratio == 0.4
    assert Profile.from_json_dict(measured.to_json_dict()).lossy_prefix_ratio == 0.4
    assert SimulationConfig().resolved_lossy_prefix_ratio(measured) == 0.4
    assert SimulationConfig(lossy_prefix_ratio=1.0).resolved_lossy_prefix_ratio(measured) == 1.0
    data["lossy_prefix_ratio"] = -0.1
    with pytest.raises(ProfileError, match="x.json: 'lossy_prefix_ratio' must be >= 0"):
        Profile.from_json_dict(data, "x.json")
    with pytest.raises(ValueError, match="lossy_prefix_ratio"):
        SimulationConfig(lossy_prefix_ratio=math.inf)


# ----------------------------------------------------------------------------------------------- by position


def _with_positions(levels=("cachegen-2", "kvcast-2"), first=True, penalty=0.25) -> dict:
    """The default profile's JSON with a small position_quality entry: loss falls with distance."""
    data = default_profile().to_json_dict()
    data.pop("position_quality", None)
    data.pop("text_over_lossy_prefix_penalty", None)
    curves = {}
    for n, level in enumerate(levels):
        entry = {"points": [{"distance_tokens": 3500, "quality_loss": 0.01 * (n + 1), "kl_per_token": 0.00125},
                            {"distance_tokens": 500, "quality_loss": 0.09 * (n + 1), "top1_agreement": 0.9},
                            {"distance_tokens": 1500, "quality_loss": 0.03 * (n + 1)}]}
        if first:
            entry["first_chunk"] = {"distance_tokens": 7500, "quality_loss": 0.5 * (n + 1)}
            entry["additivity_factor"] = 2.0 + n
        curves[level] = entry
    data["position_quality"] = {"context_tokens": 8000, "chunk_tokens": 1000, "documents": 3, "levels": curves}
    if penalty is not None:
        data["text_over_lossy_prefix_penalty"] = penalty
    return data


def test_profile_round_trip_with_and_without_position_quality(tmp_path):
    old = default_profile().to_json_dict()
    old.pop("position_quality", None)
    old.pop("text_over_lossy_prefix_penalty", None)
    plain = Profile.from_json_dict(old)  # a profile written before the field existed
    assert plain.position_quality is None and plain.text_over_lossy_prefix_penalty is None
    assert plain.to_json_dict() == json.loads(json.dumps(old))  # nothing added on the way out
    p = Profile.from_json_dict(_with_positions())
    assert p.text_over_lossy_prefix_penalty == 0.25 and p.position_quality.documents == 3
    assert [pt.distance_tokens for pt in p.position_quality.curve("kvcast-2").points] == [500, 1500, 3500]
    path = tmp_path / "p.json"
    p.save(path)
    q = Profile.load(path)
    assert q == p and q.position_quality.curve("cachegen-2").first_chunk.quality_loss == 0.5
    assert q.position_quality.curve("kvcast-2").additivity_factor == 3.0
    assert q.restricted(["raw", "kvcast-2"]).position_quality == p.position_quality


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["position_quality"].pop("context_tokens"), r"position_quality.context_tokens must be"),
    (lambda d: d["position_quality"].update(levels={}), r"position_quality.levels must be a non-empty"),
    (lambda d: d["position_quality"]["levels"].update(nope={"points": [{"distance_tokens": 1,
                                                                        "quality_loss": 0}]}),
     "'nope' is not a level"),
    (lambda d: d["position_quality"]["levels"]["kvcast-2"].update(points=[]), r"kvcast-2.points must be"),
    (lambda d: d["position_quality"]["levels"]["kvcast-2"]["points"][1].update(distance_tokens=3500),
     "appears twice"),
    (lambda d: d["position_quality"]["levels"]["kvcast-2"]["points"][0].update(quality_loss=-1), ">= 0"),
    (lambda d: d["position_quality"]["levels"]["kvcast-2"]["points"][0].pop("distance_tokens"),
     r"points\[0\].distance_tokens is missing"),
    (lambda d: d["position_quality"]["levels"]["kvcast-2"]["first_chunk"].update(top1_agreement=2),
     r"first_chunk.top1_agreement must be in \[0, 1\]"),
    (lambda d: d["position_quality"]["levels"]["kvcast-2"].update(additivity_factor=0),
     r"kvcast-2.additivity_factor must be > 0"),
    (lambda d: d.update(text_over_lossy_prefix_penalty=-0.1), "text_over_lossy_prefix_penalty must be >= 0"),
    (lambda d: d.update(text_over_lossy_prefix_penalty="x"), "text_over_lossy_prefix_penalty must be a finite"),
])
def test_malformed_position_quality_names_the_field(tmp_path, mutate, message):
    data = _with_positions()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=message):
        Profile.load(path)


def test_position_loss_interpolates_linearly_and_clamps_outside_the_measured_range():
    p = Profile.from_json_dict(_with_positions())
    at = p.quality_loss_at
    assert at("cachegen-2", 500) == pytest.approx(0.09) and at("cachegen-2", 3500) == pytest.approx(0.01)
    assert at("cachegen-2", 1000) == pytest.approx(0.06)        # halfway between 0.09 and 0.03
    assert at("cachegen-2", 2000) == pytest.approx(0.025)       # a quarter of the way from 0.03 to 0.01
    assert at("cachegen-2", 0) == pytest.approx(0.09)           # nearer than the nearest point: clamped
    assert at("cachegen-2", 15_000) == pytest.approx(0.01)      # a 16K context's far chunks: the farthest point
    assert at("cachegen-2", 15_000, first_chunk=True) == 0.5    # the chunk holding the sinks
    assert at("kvcast-2", 1000) == pytest.approx(0.12)
    # no curve: the level's flat loss, wherever the chunk is
    assert at("int8", 10, first_chunk=True) == at("int8", 9000) == p.level("int8").quality_loss
    no_first = Profile.from_json_dict(_with_positions(first=False))
    assert no_first.quality_loss_at("cachegen-2", 7500, first_chunk=True) == pytest.approx(0.01)


def test_menus_give_each_chunk_the_loss_at_its_distance_from_the_end():
    p = Profile.from_json_dict(_with_positions())
    shape, cost = ModelShape.named("mistral-7b"), recompute_cost("h100/mistral-7b")
    menus = build_menus(p, shape, 16_000, 1000, cost)
    losses = [m.option("cachegen-2").quality_loss for m in menus]
    assert losses[0] == 0.5                                      # first chunk: measured apart (sinks)
    assert losses[-1] == pytest.approx(0.09)                     # centre 500 tokens from the end
    assert losses[-2] == pytest.approx(0.03) and losses[-3] == pytest.approx(0.02)
    assert losses[1:-3] == [pytest.approx(0.01)] * 12            # beyond 3,500 tokens: clamped
    assert all(a <= b for a, b in zip(losses[1:], losses[2:]))   # falls with distance
    flat = {m.option("int8").quality_loss for m in menus}
    assert flat == {p.level("int8").quality_loss}                # no curve: one number for every chunk
    # the same chunk layout on an old profile: every chunk gets the flat loss
    old = Profile.from_json_dict({k: v for k, v in _with_positions().items() if k != "position_quality"})
    assert {m.option("cachegen-2").quality_loss for m in build_menus(old, shape, 16_000, 1000, cost)} == \
        {old.level("cachegen-2").quality_loss}
    # a one-chunk context is not a "first chunk" of several: it takes the curve at its centre
    (one,) = build_menus(p, shape, 1000, 1000, cost)
    assert one.option("cachegen-2").quality_loss == pytest.approx(0.09)


def test_shipped_profile_has_a_measured_position_curve_for_every_lossy_level():
    from kvcast import codec
    p = default_profile()
    assert p.position_quality is not None and p.position_quality.documents >= 3
    assert p.position_quality.context_tokens == 8000
    for level in codec.levels():
        curve = p.position_quality.curve(level)
        assert (curve is None) == (level == "raw"), level
        if curve is not None:
            assert len(curve.points) >= 4 and curve.first_chunk is not None
    assert p.text_over_lossy_prefix_penalty is not None and p.text_over_lossy_prefix_penalty >= 0
