"""End-to-end: `kvcast simulate` on tiny traces, determinism, bad trace files (`kvcast bench sim`:
tests/test_bench_cli.py)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvcast.cli import app
from kvcast.streamer.report import summarize
from kvcast.streamer.simulate import SimulationConfig, history_mean_bps, plan_sessions, run_sweep, trace_keys
from kvcast.traces.trace import Trace

POLICIES = "text,raw,fixed:cachegen-2,cachegen,cachegen-code"


@pytest.fixture()
def trace_dir(tmp_path):
    d = tmp_path / "traces"
    d.mkdir()
    (d / "steady").write_text("".join(f"{t}\t{5.0}\n" for t in range(0, 31)))
    (d / "bursty").write_text("".join(f"{t} {1.0 if t % 4 else 8.0}\n" for t in range(0, 41)))
    return d


def simulate(args):
    """`kvcast simulate ARGS` on a 40-column terminal: messages must keep file paths whole even when
    the (long, pytest-made) path is wider than the terminal."""
    return CliRunner().invoke(app, ["simulate", *args], env={"COLUMNS": "40"})


def test_simulate_writes_summary_tables_logs_and_plots(trace_dir, tmp_path):
    out = tmp_path / "out"
    result = simulate(["--traces", str(trace_dir), "--policies", POLICIES, "--out", str(out),
                       "--contexts", "3", "--context-tokens", "4096-8192", "--workers", "1", "--slo", "0.6"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert [s["policy"] for s in summary] == POLICIES.split(",")
    for s in summary:
        assert s["sessions"] == 2 * 3
        for key in ("slo_violation_rate", "ttft_mean_s", "ttft_p95_s", "quality_loss_mean", "bytes_mean"):
            lo, hi = s[f"{key}_ci95"]
            assert lo <= s[key] + 1e-12 and s[key] <= hi + 1e-12
    by = {s["policy"]: s for s in summary}
    assert by["text"]["quality_loss_mean"] == 0.0 and by["text"]["bytes_mean"] == 0.0
    assert by["raw"]["bytes_mean"] > by["fixed:cachegen-2"]["bytes_mean"] > 0
    from kvcast.streamer.menus import MODEL_SHAPES, build_menus, recompute_cost
    from kvcast.streamer.profile import default_profile

    sessions = [json.loads(line) for line in (out / "sessions.jsonl").read_text().splitlines()]
    for s in (s for s in sessions if s["policy"] == "fixed:cachegen-2"):
        # each chunk's loss at its distance from the end, token-weighted (the menus' position-dependent loss)
        menus = build_menus(default_profile(), MODEL_SHAPES["mistral-7b"], s["context_tokens"], 1536,
                            recompute_cost("h100/mistral-7b"))
        expected = sum(m.option("cachegen-2").quality_loss * m.tokens for m in menus) / s["context_tokens"]
        assert s["quality_loss"] == pytest.approx(expected)
    assert len(sessions) == 2 * 3 * 5
    chunks = [json.loads(line) for line in (out / "chunks.jsonl").read_text().splitlines()]
    assert len(chunks) == sum(s["chunks"] for s in sessions)
    assert {"action", "transfer_start_s", "decode_end_s", "recompute_end_s", "measured_bps"} <= set(chunks[0])
    for name in ("summary.md", "ttft_cdf.png", "pareto.png", "run.json"):
        assert (out / name).stat().st_size > 0
    assert "| policy |" in (out / "summary.md").read_text()
    # the scaled means lie in the documented 1-10 Gbps range
    assert all(1e9 * 0.999 <= s["trace_mean_bps"] <= 10e9 * 1.001 for s in sessions)


def test_simulate_is_deterministic_across_worker_counts(trace_dir, tmp_path):
    args = ["--traces", str(trace_dir), "--policies", "cachegen,text", "--contexts", "2",
            "--context-tokens", "3000-6000", "--seed", "7"]
    one = simulate([*args, "--out", str(tmp_path / "a"), "--workers", "1"])
    two = simulate([*args, "--out", str(tmp_path / "b"), "--workers", "2"])
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    for name in ("sessions.jsonl", "chunks.jsonl", "summary.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other_seed = simulate([*args[:-1], "8", "--out", str(tmp_path / "c"), "--workers", "1"])
    assert other_seed.exit_code == 0
    assert (tmp_path / "c" / "sessions.jsonl").read_bytes() != \
        (tmp_path / "a" / "sessions.jsonl").read_bytes()


def test_bad_trace_file_is_named_or_skipped(trace_dir, tmp_path):
    (trace_dir / "broken").write_text("0 1.0\n1 -3.0\n2 1.0\n")
    failed = simulate(["--traces", str(trace_dir), "--policies", "text", "--out", str(tmp_path / "x"),
                       "--contexts", "1", "--workers", "1"])
    assert failed.exit_code == 2
    assert "broken" in failed.output and "line 2" in failed.output
    skipped = simulate(["--traces", str(trace_dir), "--policies", "text", "--out", str(tmp_path / "y"),
                        "--contexts", "1", "--workers", "1", "--on-bad-trace", "skip"])
    assert skipped.exit_code == 0, skipped.output
    run = json.loads((tmp_path / "y" / "run.json").read_text())
    assert run["traces"] == 2 and len(run["skipped_traces"]) == 1
    assert run["skipped_traces"][0]["path"].endswith("broken")


def test_all_zero_trace_is_reported_or_skipped(trace_dir, tmp_path):
    (trace_dir / "dead").write_text("0 0\n1 0\n2 0\n")
    args = ["--traces", str(trace_dir), "--policies", "cachegen", "--contexts", "1", "--workers", "1"]
    failed = simulate([*args, "--out", str(tmp_path / "x")])
    assert failed.exit_code == 2 and "dead" in failed.output and "zero bandwidth" in failed.output
    skipped = simulate([*args, "--out", str(tmp_path / "y"), "--on-bad-trace", "skip"])
    assert skipped.exit_code == 0, skipped.output
    run = json.loads((tmp_path / "y" / "run.json").read_text())
    assert run["traces"] == 2 and run["skipped_traces"][0]["path"].endswith("dead")


@pytest.mark.parametrize("levels, menu", [
    ("cachegen", ["cachegen-3", "cachegen-2", "cachegen-1"]),
    ("kvcast", ["kvcast-4", "kvcast-basis-3", "kvcast-basis-2", "kvcast-3", "kvcast-basis-1", "kvcast-2", "kvcast-1"]),
    ("cachegen,baselines", ["raw", "int8", "cachegen-3", "cachegen-2", "cachegen-1"]),
    ("kvcast-2,cachegen-1,raw", ["raw", "kvcast-2", "cachegen-1"]),
    ("all", None),
])
def test_simulate_levels_choose_the_menu(trace_dir, tmp_path, levels, menu):
    from kvcast.policies.cachegen import CACHEGEN_LEVELS
    from kvcast.streamer.profile import default_profile

    menu = menu or list(default_profile().level_names)
    out = tmp_path / "out"
    result = simulate(["--traces", str(trace_dir), "--policies", "cachegen,cachegen-code,mpc,oracle", "--out",
                       str(out), "--contexts", "3", "--workers", "1", "--levels", levels])
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["menu_levels"] == menu
    chunks = [json.loads(line) for line in (out / "chunks.jsonl").read_text().splitlines()]
    used = {}
    for c in chunks:
        used.setdefault(c["policy"], set()).add(c["action"])
    for policy, actions in used.items():
        assert actions <= set(menu) | {"text"}, policy
    if any(n.startswith("cachegen-") for n in menu):  # CacheGen's controllers keep to CacheGen's levels
        assert used["cachegen"] <= set(CACHEGEN_LEVELS) | {"text"}
        assert used["cachegen-code"] <= set(CACHEGEN_LEVELS) | {"text"}


def test_simulate_levels_errors_name_the_level(tmp_path):
    result = simulate(["--policies", "text", "--out", str(tmp_path / "z"), "--levels", "cachegen,zstd"])
    assert result.exit_code == 2 and "no level 'zstd'" in result.output
    result = simulate(["--policies", "fixed:cachegen-2", "--out", str(tmp_path / "z"), "--levels", "kvcast"])
    assert result.exit_code == 2 and "cachegen-2" in result.output


def test_bad_options_are_reported_before_running(tmp_path):
    result = simulate(["--policies", "nosuch", "--out", str(tmp_path / "z")])
    assert result.exit_code == 2 and "unknown policy 'nosuch'" in result.output
    result = simulate(["--policies", "fixed:zz", "--out", str(tmp_path / "z")])
    assert result.exit_code != 0


def test_default_traces_run_without_arguments(tmp_path):
    result = simulate(["--out", str(tmp_path / "d"), "--contexts", "1", "--policies", "cachegen",
                       "--workers", "1", "--no-chunk-log"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary[0]["sessions"] == 7 and not (tmp_path / "d" / "chunks.jsonl").exists()


def test_history_prior_and_plans():
    trace = Trace([0.0, 10.0, 20.0], [1e9, 3e9])
    assert history_mean_bps(trace, 15.0, 10.0) == pytest.approx(2e9)
    assert history_mean_bps(trace, 2.0, 4.0) == pytest.approx((2 * 3e9 + 2 * 1e9) / 4)  # wraps
    config = SimulationConfig(contexts=4, seed=3)
    scaled, setups = plan_sessions(trace, 0, trace_keys([trace])[0], config)
    assert 1e9 <= scaled.mean_bps <= 10e9
    assert len(setups) == 4 and all(12288 <= s.context_tokens <= 20480 for s in setups)
    again = plan_sessions(trace, 0, trace_keys([trace])[0], config)[1]
    assert again == setups


def test_summary_bootstrap_cis_cover_the_estimate():
    sessions = [{"policy": "p", "trace_index": i % 6, "ttft_s": 0.5 + 0.1 * (i % 7), "slo_met": i % 3 != 0,
                 "overrun_s": 0.0, "quality_loss": 0.01 * (i % 2), "bytes_loaded": 100, "text_chunks": 1,
                 "chunks": 4} for i in range(60)]
    (s,) = summarize(sessions, seed=1)
    assert s["bootstrap"] == "traces" and s["sessions"] == 60
    assert s["slo_violation_rate"] == pytest.approx(20 / 60)
    lo, hi = s["slo_violation_rate_ci95"]
    assert 0 <= lo <= s["slo_violation_rate"] <= hi <= 1
    assert s["text_chunk_share"] == pytest.approx(0.25)
    assert summarize(sessions, seed=1) == summarize(sessions, seed=1)


def test_sweep_yields_in_trace_order():
    traces = [Trace([0.0, 5.0], [1e9], name=f"t{i}") for i in range(3)]
    config = SimulationConfig(policies=("text",), contexts=1, context_tokens=(2000, 2000))
    outcomes = list(run_sweep(traces, config, workers=2, chunk_log=False))
    assert [o.trace_index for o in outcomes] == [0, 1, 2]


def test_simulate_at_a_gpu_share_and_bandwidth_scale_is_the_sweeps_point(trace_dir, tmp_path):
    """`kvcast simulate --gpu-share 0.5` plays exactly the sessions of `kvcast sweep`'s gpu-share 0.5 point (and
    likewise --bandwidth-scale 2), row for row; and both differ from the default (the options take effect)."""
    common = ["--traces", str(trace_dir), "--policies", "text,raw,cachegen,hybrid", "--contexts", "2",
              "--seed", "5", "--workers", "1"]
    swept = CliRunner().invoke(app, ["sweep", *common, "--gpu-share", "0.5", "--bandwidth-scale", "2",
                                     "--base", "context-tokens=3000-9000", "--out", str(tmp_path / "sweep"),
                                     "--resamples", "20"])
    assert swept.exit_code == 0, swept.output
    sweep_rows: dict[str, list[dict]] = {}
    for line in (tmp_path / "sweep" / "sessions.jsonl").read_text().splitlines():
        row = json.loads(line)
        key = "gpu" if row["axis_gpu_share"] == 0.5 else "bw" if row["axis_bandwidth_scale"] == 2 else "base"
        sweep_rows.setdefault(key, []).append({k: v for k, v in row.items()
                                               if k != "point" and not k.startswith("axis_")})
    for key, option, value in (("gpu", "--gpu-share", "0.5"), ("bw", "--bandwidth-scale", "2"),
                               ("base", "--gpu-share", "1")):
        out = tmp_path / key
        done = simulate([*common, "--context-tokens", "3000-9000", option, value, "--out", str(out),
                         "--no-chunk-log"])
        assert done.exit_code == 0, done.output
        rows = [json.loads(line) for line in (out / "sessions.jsonl").read_text().splitlines()]
        assert rows == sweep_rows[key], key
    texts = {key: [r["ttft_s"] for r in rows if r["policy"] == "text"] for key, rows in sweep_rows.items()}
    assert texts["gpu"] == pytest.approx([2 * t for t in texts["base"]])
    run = json.loads((tmp_path / "gpu" / "run.json").read_text())
    assert run["config"]["gpu_share"] == 0.5 and run["config"]["bandwidth_scale"] == 1.0


@pytest.mark.parametrize("option, value, message", [
    ("--gpu-share", "0", "--gpu-share: 0 must be finite and > 0"),
    ("--gpu-share", "-0.5", "--gpu-share: -0.5 must be finite and > 0"),
    ("--bandwidth-scale", "inf", "--bandwidth-scale: inf must be finite and > 0"),
    ("--bandwidth-scale", "nan", "--bandwidth-scale: nan must be finite and > 0"),
])
def test_bad_gpu_share_and_bandwidth_scale_are_named(tmp_path, option, value, message):
    done = simulate(["--policies", "text", option, value, "--out", str(tmp_path / "x")])
    assert done.exit_code == 2 and message in " ".join(done.output.split()), done.output
    assert not (tmp_path / "x" / "sessions.jsonl").exists()
