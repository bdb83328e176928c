"""The host profile: measured decode speeds and a prefill fit on a tiny model; file round trip and bad files."""

from __future__ import annotations

import time

import pytest
import torch

from kvcast.streamer.host import HostProfileError, load_host_profile, measure_host_profile, save_host_profile
from tests.factories import tiny_llama


def test_measure_save_load_round_trip(tmp_path):
    model = tiny_llama(seed=1)
    profile, record = measure_host_profile(model, levels=["raw", "int8", "cachegen-2", "kvcast-2"],
                                           chunk_tokens=32, positions=(0, 32, 64), repeats=1)
    assert set(profile.decode_values_per_s) == {"raw", "int8", "cachegen-2"}
    assert "kvcast-2" in record["skipped_levels"]  # no sensitivity table for the tiny model
    assert all(v > 0 for v in profile.decode_values_per_s.values())
    rc = profile.recompute
    assert min(rc.a_s_per_token, rc.b_s_per_token_pair, rc.c_s) >= 0 and rc.prefill_s(0, 32) > 0
    assert len(record["recompute"]["points"]) == 6
    path = save_host_profile(record, tmp_path / "host.json")
    loaded = load_host_profile(path)
    assert loaded.decode_values_per_s == pytest.approx(profile.decode_values_per_s)
    assert loaded.recompute.prefill_s(64, 32) == pytest.approx(rc.prefill_s(64, 32))
    assert loaded.quality_loss == pytest.approx(profile.quality_loss)


@pytest.mark.parametrize("content, match", [
    ("not json", "cannot read"),
    ('{"format": "other"}', "not a kvcast-host-profile/1"),
    ('{"format": "kvcast-host-profile/1", "decode_values_per_s": {}}', "malformed field"),
    ('{"format": "kvcast-host-profile/1", "decode_values_per_s": {"raw": -1}, '
     '"recompute": {"a_s_per_token": 0, "b_s_per_token_pair": 0, "c_s": 0}}', "finite and > 0"),
])
def test_bad_files_are_refused_with_the_reason(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(HostProfileError, match=match):
        load_host_profile(path)


def test_simulate_reads_the_host_profile(tmp_path):
    from typer.testing import CliRunner

    from kvcast.cli import app
    from kvcast.streamer.config import SimulationConfig
    from kvcast.streamer.menus import ModelShape, build_menus

    record = {"format": "kvcast-host-profile/1", "model": "m", "decode_values_per_s": {"int8": 2e7, "raw": 4e7},
              "recompute": {"a_s_per_token": 1e-4, "b_s_per_token_pair": 1e-8, "c_s": 0.01}}
    path = save_host_profile(record, tmp_path / "host.json")
    config = SimulationConfig(host_profile=str(path), model="30,3,64", levels=("raw", "int8"))
    host = config.load_host_profile()
    assert config.recompute_cost().prefill_s(512, 256) == pytest.approx(host.recompute.prefill_s(512, 256))
    shape = ModelShape.parse("30,3,64")
    menus = build_menus(config.load_profile(), shape, 1024, 256, config.recompute_cost(), levels=config.levels,
                        decode_speeds=host.decode_values_per_s)
    values = 256 * shape.values_per_token
    assert {o.level: o.decode_s for o in menus[0].levels} == pytest.approx({"raw": values / 4e7,
                                                                            "int8": values / 2e7})
    out = tmp_path / "sim"
    done = CliRunner().invoke(app, ["simulate", "--host-profile", str(path), "--model", "30,3,64", "--levels",
                                    "raw,int8", "--contexts", "1", "--policies", "text,raw", "--out", str(out),
                                    "--context-tokens", "1024-2048", "--chunk-tokens", "256"])
    assert done.exit_code == 0, done.output
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    done = CliRunner().invoke(app, ["simulate", "--host-profile", str(bad), "--out", str(tmp_path / "x")])
    assert done.exit_code == 2 and "not a kvcast-host-profile/1" in done.output


def test_every_timed_round_waits_for_the_models_device(monkeypatch):
    """On a CUDA device kernels run asynchronously: each decode round and each prefill is timed to the device's
    end (`wait_for_device`), which a slow stand-in makes visible on the CPU."""
    import kvcast.streamer.host as host

    waited = []

    def slow_wait(device):
        waited.append(device)
        time.sleep(0.05)

    monkeypatch.setattr(host, "wait_for_device", slow_wait)
    model = tiny_llama(seed=1)
    profile, record = measure_host_profile(model, levels=["raw"], chunk_tokens=32, positions=(0, 32), repeats=1)
    assert set(waited) == {torch.device("cpu")} and record["machine"]["device"] == "cpu"
    assert len(waited) == 2 + 2 * 2 * 2  # decode: warm-up + 1 round; prefill: 2 positions x 2 lengths x 2
    values = 2 * 2 * 2 * 2 * 16 * 64  # K and V, 2 layers, 2 KV heads, 16 dims, 64 tokens in 2 chunks of 32
    assert profile.decode_values_per_s["raw"] <= values / 0.05
    assert all(p["seconds"] >= 0.05 for p in record["recompute"]["points"])
