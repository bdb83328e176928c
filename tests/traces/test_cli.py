"""`kvcast traces stats|plot|write-defaults` through typer's test runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvcast.traces.cli import app

runner = CliRunner()


@pytest.fixture()
def trace_dir(tmp_path: Path) -> Path:
    (tmp_path / "p").write_text("0 1\n1 2\n3 4\n")  # 2 Mbps for 1 s, 4 Mbps for 2 s
    (tmp_path / "s.json").write_text(json.dumps([{"duration_ms": 1000, "bandwidth_kbps": 1000,
                                                  "latency_ms": 20}]))
    (tmp_path / "bw.jsonl").write_text('{"bw": [1, 3]}\n{"bw": [2, 2]}\n')
    (tmp_path / "bad").write_text("0 1\n1 -5\n")
    return tmp_path


def test_stats_json(trace_dir):
    result = runner.invoke(app, ["stats", str(trace_dir), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    rows = {r["name"]: r for r in doc["traces"]}
    assert set(rows) == {"p", "s.json", "bw.jsonl#0", "bw.jsonl#1"}
    p = rows["p"]
    assert p["format"] == "pensieve_time_mbps" and p["duration_s"] == 3.0
    assert p["mean_mbps"] == pytest.approx(10 / 3) and p["p10_mbps"] == 2.0 and p["p90_mbps"] == 4.0
    assert rows["bw.jsonl#0"]["mean_mbps"] == pytest.approx(2000.0)
    totals = doc["totals"]
    assert totals["files"] == 3 and totals["traces"] == 4 and totals["skipped"] == 1
    # time-weighted over all traces: bits / seconds
    bits = 10 / 3 * 3 + 1 * 1 + 2000 * 0.1 + 2000 * 0.1
    assert totals["mean_mbps"] == pytest.approx(bits / (3 + 1 + 0.1 + 0.1))
    assert doc["skipped"][0]["file"].endswith("bad") and "line 2" in doc["skipped"][0]["error"]


def test_stats_table_and_strict(trace_dir):
    result = runner.invoke(app, ["stats", str(trace_dir / "p"), str(trace_dir / "s.json"), "--scale", "2"])
    assert result.exit_code == 0, result.output
    assert "pensieve_time_mbps" in result.stdout and "sabre_json" in result.stdout
    assert "6.667" in result.stdout and "total" in result.stdout  # 10/3 Mbps x 2
    strict = runner.invoke(app, ["stats", str(trace_dir), "--strict"])
    assert strict.exit_code == 2 and "line 2" in strict.output


def test_stats_bad_arguments(tmp_path):
    assert runner.invoke(app, ["stats", str(tmp_path / "missing")]).exit_code != 0
    assert runner.invoke(app, ["stats", str(tmp_path), "--format", "nope"]).exit_code != 0


def test_plot_writes_png(trace_dir, tmp_path):
    out = tmp_path / "plots" / "p.png"
    result = runner.invoke(app, ["plot", str(trace_dir / "bw.jsonl"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    one = runner.invoke(app, ["plot", str(trace_dir / "bw.jsonl"), "--index", "1", "--out", str(out)])
    assert one.exit_code == 0 and "1 of 2" in one.stdout
    bad = runner.invoke(app, ["plot", str(trace_dir / "bad"), "--out", str(out)])
    assert bad.exit_code == 2 and "line 2" in bad.output


def test_write_defaults(tmp_path):
    result = runner.invoke(app, ["write-defaults", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.glob("*.json"))) == len(result.stdout.split())
