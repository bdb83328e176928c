"""`--executor ray` (kvcast[ray]): a tiny sweep on a local Ray instance started here gives exactly the process
pool's sessions, in the same order; the CLI runs on Ray too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kvcast
from kvcast.cli import app
from kvcast.streamer.config import SimulationConfig
from kvcast.streamer.sweep import run_points
from kvcast.streamer.sweep_config import BASE_POINT, parse_axis, plan_points
from kvcast.traces.defaults import default_traces

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    """A small local Ray instance whose workers import this checkout's kvcast."""
    root = str(Path(kvcast.__file__).resolve().parent.parent)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024**2,
             runtime_env={"env_vars": {"PYTHONPATH": root}})
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_gives_exactly_the_process_pool_sessions(local_ray):
    @local_ray.remote
    def where() -> str:
        import kvcast as k

        return str(Path(k.__file__).resolve())

    assert local_ray.get(where.remote()) == str(Path(kvcast.__file__).resolve())  # same code on the workers
    traces = list(default_traces())[:3]
    config = SimulationConfig(policies=("text", "cachegen", "hybrid"), contexts=2, seed=5)
    planned = plan_points({"slo_s": parse_axis("slo_s", "0.4,0.8"), "gpu_share": parse_axis("gpu_share", "0.5")},
                          BASE_POINT)
    on_ray = list(run_points(traces, config, planned, executor="ray"))
    on_pool = list(run_points(traces, config, planned, executor="process", workers=2))
    assert on_ray == on_pool
    assert len(on_ray) == len(planned) * len(traces)
    assert sum(len(rows) for _, rows in on_ray) == len(planned) * 3 * 2 * 3


def test_sweep_cli_on_ray_writes_what_the_pool_writes(local_ray, tmp_path):
    args = ["sweep", "--quick", "--policies", "text,cachegen", "--rtt-ms", "1,50"]
    a = CliRunner().invoke(app, [*args, "--executor", "ray", "--out", str(tmp_path / "ray")])
    b = CliRunner().invoke(app, [*args, "--workers", "2", "--out", str(tmp_path / "pool")])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    for name in ("sessions.jsonl", "summary.json"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "pool" / name).read_bytes()
    assert json.loads((tmp_path / "ray" / "run.json").read_text())["executor"] == "ray"
