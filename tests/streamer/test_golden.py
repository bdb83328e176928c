"""Golden end to end: a `kvcast simulate` sweep of every built-in policy reproduces the recorded sessions and summary.

Recorded after merging the new baselines (cake, cake-cachegen, rate, slack; cachegen-code charging the RTT), the
default GPU decode speeds from `kvcast bench gpu` on an H100 (``streamer/gpu_bench_h100.json``) and the planners'
objectives, the position-dependent quality profile and its measured text-over-lossy-prefix penalty, and the
sensitivity-basis levels (``kvcast-basis-*``) in the default profile, with
``kvcast simulate --contexts 2 --policies <POLICIES> --no-chunk-log`` on the shipped synthetic traces: 7 traces x
2 contexts x 12 policies = 168 sessions. Floats are compared to 1e-12 relative (libm may differ in the last ulp);
everything else exactly. A deliberate change of the engine, a policy or the defaults re-records both files by
running that command and copying ``summary.json`` and ``sessions.jsonl`` into ``golden/``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from typer.testing import CliRunner

from kvcast.cli import app

GOLDEN = Path(__file__).with_name("golden")
POLICIES = "text,raw,fixed:kvcast-2,cachegen,cachegen-code,mpc,hybrid,oracle,cake,cake-cachegen,rate,slack"


def _close(a, b, where: str = "") -> list[str]:
    """Differences between two JSON values (floats to 1e-12 relative), as readable paths."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a.keys() ^ b.keys())}"]
        return [d for k in a for d in _close(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _close(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, (int, float)) or isinstance(b, float) and isinstance(a, (int, float)):
        return [] if math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300) else [f"{where}: {a!r} != {b!r}"]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def test_close_is_not_vacuous():
    assert _close({"a": [1.0, "x"]}, {"a": [1.0 * (1 + 1e-15), "x"]}) == []
    assert _close({"a": [1.0]}, {"a": [1.0 + 1e-9]}) and _close({"a": 1}, {"b": 1}) and _close([1], [1, 2])
    assert _close({"p": "mpc"}, {"p": "hybrid"})


def test_simulate_reproduces_the_recorded_sweep(tmp_path):
    out = tmp_path / "sim"
    done = CliRunner().invoke(app, ["simulate", "--contexts", "2", "--policies", POLICIES, "--no-chunk-log",
                                    "--out", str(out)])
    assert done.exit_code == 0, done.output
    sessions = [json.loads(line) for line in (out / "sessions.jsonl").read_text().splitlines()]
    recorded = [json.loads(line) for line in (GOLDEN / "simulate-sessions.jsonl").read_text().splitlines()]
    assert len(sessions) == len(recorded) == 168
    assert _close(sessions, recorded) == []
    summary = json.loads((out / "summary.json").read_text())
    assert _close(summary, json.loads((GOLDEN / "simulate-summary.json").read_text())) == []
