"""The host profile: measured decode speeds and a prefill fit on a tiny model; file round trip and bad files."""

from __future__ import annotations

import pytest

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
