"""Every `kvcast bench` command: one JSON layout alone on stdout, the table on stderr, `--out` the same JSON;
and the CLI's defaults are the settings dataclasses' own."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
import typer
from typer.testing import CliRunner

from kvcast.benchmark import LAYOUT_KEYS
from kvcast.cli import app


def _runner() -> CliRunner:
    """A runner that keeps stderr apart from stdout (click >= 8.2 always does; older ones need the flag)."""
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


# (benchmark, smallest options, a string of its table's title)
BENCHMARKS = [
    ("codec", ["--tokens", "64", "--levels", "raw,int8", "--repeats", "1", "--workers", "1"], "codec speed"),
    ("sim", ["--sessions", "5", "--repeats", "1"], "kvcast bench sim"),
    ("mpc", ["--sessions", "1", "--enumerate", "1", "--repeats", "1"], "kvcast bench mpc"),
    ("gym", ["--steps", "50", "--repeats", "1", "--warmup", "10", "--vector-envs", "0"], "kvcast bench gym"),
    ("traces", ["--sizes", "10", "--calls", "50", "--repeats", "1"], "Trace integration cost"),
]


def bench(name: str, *args: str):
    return _runner().invoke(app, ["bench", name, *args], env={"COLUMNS": "200"})


@pytest.mark.parametrize(("name", "args", "title"), BENCHMARKS, ids=[b[0] for b in BENCHMARKS])
def test_bench_prints_json_alone_on_stdout_and_the_table_on_stderr(name, args, title, tmp_path):
    out = tmp_path / "sub" / f"{name}.json"
    result = bench(name, *args, "--out", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # the whole of stdout is the JSON
    assert tuple(data) == LAYOUT_KEYS
    assert data["benchmark"] == name and data["version"] == 1
    assert data["machine"]["cpus"] >= 1 and data["machine"]["python"]
    assert isinstance(data["settings"], dict) and isinstance(data["summary"], dict)
    assert data["rows"] and all(isinstance(row, dict) for row in data["rows"])
    assert title in result.stderr and title not in result.stdout
    assert json.loads(out.read_text()) == data


def test_bench_codec_rows_are_levels():
    data = json.loads(bench("codec", *BENCHMARKS[0][1]).stdout)
    assert [r["level"] for r in data["rows"]] == ["raw", "int8"]
    assert data["settings"]["levels"] == ["raw", "int8"] and data["settings"]["tokens"] == 64
    assert all(r["encode_msym_per_s"] > 0 and r["decode_msym_per_s"] > 0 for r in data["rows"])
    assert data["summary"]["values"] == 2 * 30 * 3 * 64 * 64


def test_bench_sim_counts_chunks_and_times_a_sweep():
    result = bench("sim", "--sessions", "5", "--repeats", "1", "--sweep-traces", "1",
                   "--sweep-policies", "text,cachegen", "--workers", "1")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    s = data["summary"]
    assert s["chunks_per_s"] > 0 and s["chunks_per_repeat"] == 5 * 11 and s["chunks_per_session"] == 11
    engine, sweep = data["rows"]
    assert engine["run"] == "engine" and sweep["run"] == "sweep" and sweep["sessions"] == 20 * 2
    assert s["sweep_extrapolated_s"] > 0 and "extrapolated 350x20x6" in result.stderr
    assert data["settings"]["simulation"]["slo_s"] == 0.6


def test_bench_mpc_search_agrees_with_enumeration():
    result = bench("mpc", *BENCHMARKS[2][1])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    s = data["summary"]
    # the benchmark menu's 10 actions (7 before the three kvcast-basis-* levels), 5 chunks ahead
    assert s["enumeration_problems"] == 1 and s["plans_per_full_horizon"] == 10 ** 5
    assert s["same_plan_as_enumeration"] == "1/1" and s["plans_agree"] is True
    # the timed sessions are the recorded ones: one problem per decide() call
    assert s["decide_calls"] == s["problems"] > 0
    rates = {r["measure"]: r["decisions_per_s"] for r in data["rows"]}
    assert set(rates) == {"decide_in_sessions", "decide_in_sessions_cpu", "enumeration",
                          "search_same_problems", "search_same_problems_no_hints", "search_all_problems"}
    assert all(rate > 0 for rate in rates.values())
    assert "whole decide() calls" in result.stderr and "same plan as enumeration: 1/1" in result.stderr


def test_recorded_problems_are_solved_alike_by_search_and_enumeration():
    from kvcast.policies.mpc import enumerate_plan, search_plan
    from kvcast.streamer.bench import recorded_problems

    problems = recorded_problems(sessions=2, seed=1)
    assert problems and all(search_plan(p, h) == enumerate_plan(p) for p, h in problems[:5])


def test_bench_traces_rows_per_size_and_wrap():
    data = json.loads(bench("traces", "--sizes", "10,20", "--calls", "20", "--repeats", "1").stdout)
    rows = [(r["segments"], r["wrap"]) for r in data["rows"]]
    assert rows == [(10, True), (10, False), (20, True), (20, False)]
    assert data["settings"] == {"sizes": [10, 20], "calls": 20, "repeats": 1, "seed": 0}


@pytest.mark.parametrize("args", [
    ["mpc", "--sessions", "0"],
    ["gym", "--steps", "0"],
    ["sim", "--policy", "nosuch", "--sessions", "1", "--repeats", "1"],
    ["traces", "--sizes", "x"],
    ["traces", "--calls", "0"],
    ["codec", "--source", "nope"],
    ["codec", "--levels", "nope", "--tokens", "8", "--repeats", "1", "--workers", "1"],
])
def test_bad_input_exits_2_with_an_error_on_stderr_and_nothing_on_stdout(args):
    result = _runner().invoke(app, ["bench", *args])
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and ("error" in result.stderr.lower())


def test_traces_bench_moved_under_kvcast_bench():
    result = _runner().invoke(app, ["traces", "bench"])
    assert result.exit_code == 2


# ------------------------------------------------------------------------------------- defaults, once


def _params(*path: str) -> dict[str, click.Parameter]:
    command = typer.main.get_command(app)
    ctx = click.Context(command)
    for name in path:
        command = command.get_command(ctx, name)
    return {p.name: p for p in command.params}


def test_simulate_defaults_are_simulation_config_defaults():
    from kvcast.streamer.config import SimulationConfig as C

    p = {name: param.default for name, param in _params("simulate").items()}
    assert p["policies"] == ",".join(C.policies) and p["model"] == C.model and p["gpu"] == C.gpu
    assert p["chunk_tokens"] == C.chunk_tokens and p["contexts"] == C.contexts and p["slo"] == C.slo_s
    assert p["context_tokens"] == "-".join(map(str, C.context_tokens)) and p["mean_gbps"] == "1-10"
    assert p["scaling"] == C.scaling and p["efficiency"] == C.efficiency
    # the CLI's default is C.rtt_s * 1e3 (ms): s -> ms -> s need not give back the same float
    assert p["rtt_ms"] / 1e3 == pytest.approx(C.rtt_s, rel=1e-12)
    assert p["overhead_bytes"] == C.overhead_bytes and p["prior_window"] == C.prior_window_s
    assert p["query_prefill"] == C.query_prefill_s and p["seed"] == C.seed
    assert p["recompute"] is C.recompute is None and p["profile"] is C.profile is None


def test_simulate_help_shows_the_defaults():
    result = _runner().invoke(app, ["simulate", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    for text in ("text,raw,fixed:cachegen-2,cachegen,cachegen-code", "mistral-7b", "12288-20480", "1-10",
                 "[default: 0.6]", "[default: 1536]", "[default: 400]"):
        assert text in result.stdout, text


def test_bench_and_codec_defaults_are_their_settings_defaults():
    from kvcast.codec.bench import CodecBenchSettings
    from kvcast.codec.settings import CalibrateSettings, DemoSettings, EvalSettings
    from kvcast.streamer.bench import MpcBenchSettings, SimBenchSettings
    from kvcast.traces.bench import TracesBenchSettings

    for path, settings in ((("bench", "sim"), SimBenchSettings()), (("bench", "mpc"), MpcBenchSettings()),
                           (("bench", "codec"), CodecBenchSettings()), (("eval", "demo"), DemoSettings()),
                           (("calibrate",), CalibrateSettings())):
        params = _params(*path)
        for name, value in vars(settings).items():
            cli = {"context_tokens": "tokens"}.get(name, name) if path == ("eval", "demo") else name
            if cli in params and not isinstance(value, tuple) and value is not None:
                assert params[cli].default == value, (path, name)
    assert _params("bench", "sim")["sweep_policies"].default == ",".join(SimBenchSettings.sweep_policies)
    assert _params("bench", "traces")["sizes"].default == ",".join(map(str, TracesBenchSettings.sizes))
    e = _params("eval", "codec")
    assert e["passages"].default == EvalSettings.passages and e["split"].default == EvalSettings.split
    assert e["baselines"].default == ",".join(EvalSettings.baselines)


def test_streamer_cli_and_settings_import_nothing_heavy():
    code = ("import sys, kvcast.streamer.cli, kvcast.streamer.bench, kvcast.streamer.config; "
            "heavy = [m for m in ('torch', 'simpy', 'numpy', 'kvcast.streamer.simulate') "
            "if m in sys.modules]; "
            "print(heavy); sys.exit(bool(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message without CUDA")
def test_bench_gpu_without_cuda_is_a_clear_failure():
    res = bench("gpu", "--fuzz", "1")
    assert res.exit_code == 1 and "needs a CUDA device" in res.stderr
