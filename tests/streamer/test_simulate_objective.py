"""`kvcast simulate --objective ttft`: the planners' second objective, run-wide, and the TTFT summary."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvcast.cli import app
from kvcast.streamer.cli import with_objective


@pytest.fixture()
def trace_dir(tmp_path):
    d = tmp_path / "traces"
    d.mkdir()
    (d / "steady").write_text("".join(f"{t}\t{20000.0}\n" for t in range(0, 31)))
    (d / "bursty").write_text("".join(f"{t} {1000.0 if t % 4 else 8000.0}\n" for t in range(0, 41)))
    return d


def simulate(args):
    return CliRunner().invoke(app, ["simulate", *args])


def test_objective_ttft_reaches_the_planners_and_the_summary(trace_dir, tmp_path):
    common = ["--traces", str(trace_dir), "--contexts", "3", "--context-tokens", "8192-12288", "--workers", "1",
              "--slo", "2.0", "--scaling", "none", "--no-chunk-log",
              # the planners' objective counts text as lossless: score it so (no lossy-prefix penalty)
              "--lossy-prefix-ratio", "0"]
    budget = 0.004
    done = simulate([*common, "--policies", "text,mpc,hybrid,oracle,oracle:objective=slo", "--objective", "ttft",
                     "--quality-budget", str(budget), "--out", str(tmp_path / "ttft")])
    assert done.exit_code == 0, done.output
    slo_first = simulate([*common, "--policies", "oracle", "--out", str(tmp_path / "slo")])
    assert slo_first.exit_code == 0, slo_first.output
    summary = {s["policy"]: s for s in json.loads((tmp_path / "ttft" / "summary.json").read_text())}
    rows = [f"{p}:objective=ttft+quality_budget=0.004" for p in ("mpc", "hybrid", "oracle")]
    assert list(summary) == ["text", *rows, "oracle:objective=slo"]
    sessions = [json.loads(line) for line in (tmp_path / "ttft" / "sessions.jsonl").read_text().splitlines()]
    for s in sessions:
        if s["policy"] in rows:  # a constant-rate and a bursty trace: the budget holds in every session
            assert s["quality_loss"] <= budget * (1 + 1e-9), s
    for s in summary.values():
        for key in ("ttft_mean_s", "ttft_p50_s", "ttft_p95_s"):
            lo, hi = s[f"{key}_ci95"]
            assert lo <= s[key] + 1e-12 and s[key] <= hi + 1e-12
    # a loose SLO: SLO first recomputes what it can; the least TTFT within the budget is faster
    oracle_slo = json.loads((tmp_path / "slo" / "summary.json").read_text())[0]
    for key in ("ttft_mean_s", "ttft_p50_s", "quality_loss_mean", "slo_violation_rate"):  # same sessions
        assert oracle_slo[key] == summary["oracle:objective=slo"][key]
    assert summary[rows[2]]["ttft_mean_s"] < oracle_slo["ttft_mean_s"]
    assert summary[rows[2]]["ttft_mean_s"] <= min(s["ttft_mean_s"] for s in summary.values()) + 1e-12
    assert "TTFT p50 (s)" in (tmp_path / "ttft" / "summary.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--quality-budget", "0.01"], "--quality-budget and --level-floor bound --objective ttft"),
    (["--objective", "fast"], "--objective must be slo or ttft, got 'fast'"),
    (["--objective", "ttft", "--quality-budget", "-1"], "--quality-budget must be a finite number >= 0"),
    (["--objective", "ttft", "--policies", "text,cachegen"], "--objective ttft applies to the planners"),
    (["--objective", "ttft", "--level-floor", "nope", "--policies", "mpc"], "level_floor 'nope' is not on the menu"),
])
def test_bad_objective_options_fail_clearly(tmp_path, args, message):
    done = simulate(["--out", str(tmp_path / "out"), "--contexts", "1", "--max-traces", "1", *args])
    assert done.exit_code != 0
    assert message in " ".join(done.output.split()), done.output


def test_with_objective_keeps_other_policies_and_explicit_objectives():
    specs = ["text", "mpc:30", "oracle:objective=ttft+quality_budget=0.1", "hybrid"]
    assert with_objective(specs, "slo") == tuple(specs)
    assert with_objective(specs, "ttft", level_floor="kvcast-3") == (
        "text", "mpc:30+objective=ttft+level_floor=kvcast-3", "oracle:objective=ttft+quality_budget=0.1",
        "hybrid:objective=ttft+level_floor=kvcast-3")
