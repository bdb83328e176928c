"""`kvcast serve` on the command line (refusals, a real start on a DirStore) and `kvcast bench serve`."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvcast.benchmark import LAYOUT_KEYS
from kvcast.cli import app
from tests.factories import SERVE_TOKEN as TOKEN
from tests.factories import put_synthetic_context as put_context
from tests.factories import start_serve_process

pytest.importorskip("kvcast.streamer.store.dir")


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, ["serve", *args], env={"COLUMNS": "200", "KVCAST_TOKEN": "", **(env or {})})


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    from kvcast.streamer.store.dir import DirStore

    root = tmp_path / "store"
    put_context(DirStore("dir://" + str(root)), "ctx-1", [{"raw": b"abc" * 1000}])
    return root


@pytest.mark.parametrize(("args", "env", "message"), [
    ([], {}, "no token"),
    (["--token-file", "{tmp}/missing"], {}, "cannot read the token file"),
    ([], {"KVCAST_TOKEN": "short"}, "too short"),
    (["--no-auth", "--host", "0.0.0.0"], {}, "loopback"),
    (["--no-auth", "--token-file", "{tmp}/token"], {}, "choose one"),
    (["--rtt-ms", "5"], {"KVCAST_TOKEN": TOKEN}, "needs --trace"),
    (["--trace", "{tmp}/bad-trace"], {"KVCAST_TOKEN": TOKEN}, "--trace"),
    (["--max-streams", "0"], {"KVCAST_TOKEN": TOKEN}, "max_streams"),
    (["--access-log", "{tmp}/no/such/dir/log"], {"KVCAST_TOKEN": TOKEN}, "access log"),
])
def test_bad_input_exits_2_with_one_line(store_dir, tmp_path, args, env, message):
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "bad-trace").write_text("not a trace\n")
    result = invoke("--store", str(store_dir), *[a.format(tmp=tmp_path) for a in args], env=env)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert TOKEN not in result.output + result.stderr


def test_a_missing_store_folder_is_refused(tmp_path):
    result = invoke("--store", str(tmp_path / "nope"), env={"KVCAST_TOKEN": TOKEN})
    assert result.exit_code == 2 and "no store at" in result.stderr


def test_serve_starts_answers_and_stops(store_dir, tmp_path):
    """A real `kvcast serve` on a DirStore: token from a file, port 0, access log to a file, SIGTERM."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    log = tmp_path / "access.log"
    proc, lines, base = start_serve_process(["--store", f"dir://{store_dir}", "--port", "0", "--token-file",
                                             str(token_file), "--access-log", str(log)], stdout=subprocess.PIPE)
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
            assert json.load(r) == {"status": "ok"}
        request = urllib.request.Request(base + "/v1/contexts/ctx-1/chunks/0/raw",
                                         headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=5) as r:
            assert r.read() == b"abc" * 1000
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(base + "/v1/contexts", timeout=5)
        assert denied.value.code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        proc.reader.join(5)
        out = proc.stdout.read()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0, "".join(lines)
    assert "stopped" in "".join(lines) and out == ""
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["status"] for e in entries] == [200, 200, 401]
    assert TOKEN not in log.read_text() + "".join(lines)


def test_bench_serve_layout(tmp_path):
    out = tmp_path / "serve.json"
    result = CliRunner().invoke(app, ["bench", "serve", "--objects", "3", "--object-mib", "0.25", "--sessions", "4",
                                      "--chunks-per-session", "2", "--repeats", "1", "--out", str(out)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert tuple(data) == LAYOUT_KEYS and data["benchmark"] == "serve"
    assert json.loads(out.read_text()) == data and "kvcast bench serve" in result.stderr
    s = data["summary"]
    assert s["errors"] == 0 and s["requests"] == 8 and s["single_stream_gb_per_s"] > 0
    assert s["latency_p50_s"] <= s["latency_p99_s"]
    assert s["server_peak_rss_mib"] is None or s["server_peak_rss_mib"] >= s["server_start_rss_mib"] > 0
    assert [r["run"] for r in data["rows"]] == ["single-stream", "sessions"]


def test_bench_serve_bad_settings_exit_2():
    result = CliRunner().invoke(app, ["bench", "serve", "--objects", "0"])
    assert result.exit_code == 2 and "error:" in result.stderr
