"""`kvcast fetch` and `kvcast calibrate host` on the command line: a real run (JSON, chunks.jsonl, timeline PNG)
and bad input (one line naming the problem, exit 2, nothing written)."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from aiohttp import web
from typer.testing import CliRunner

from kvcast.cli import app
from kvcast.streamer.host import save_host_profile
from kvcast.streamer.ingest import put_context
from kvcast.streamer.serve import make_app
from kvcast.streamer.store import open_store
from tests.factories import SERVE_TOKEN, free_port, save_tiny_model

HOST = {"format": "kvcast-host-profile/1", "model": "tiny", "decode_values_per_s": {"raw": 1e8, "int8": 5e7},
        "recompute": {"a_s_per_token": 1e-5, "b_s_per_token_pair": 0.0, "c_s": 1e-3}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny Qwen2 model, a stored context and `kvcast serve`'s app on a loopback port in a thread."""
    root = tmp_path_factory.mktemp("fetch-cli")
    model_dir = save_tiny_model(root / "tiny-qwen2", seed=2, architecture="qwen2")
    store = open_store(root / "store")
    put_context(store, "doc", "Streams of bytes become a cache. " * 4, model=str(model_dir),
                levels=["raw", "int8"], chunk_tokens=48)
    host = save_host_profile(HOST, root / "host.json")
    port = free_port()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(store, token=SERVE_TOKEN))
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(20)
    yield {"url": f"http://127.0.0.1:{port}", "model": str(model_dir), "host": str(host), "root": root}
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(20)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(20)


def fetch_args(s, *extra):
    return ["fetch", "--server", s["url"], "--context-id", "doc", "--model", s["model"], "--host-profile",
            s["host"], *extra]


def test_fetch_prints_the_json_and_writes_the_outputs(served):
    out = served["root"] / "out"
    done = CliRunner(env={"KVCAST_TOKEN": SERVE_TOKEN}).invoke(
        app, fetch_args(served, "--policy", "fixed:int8", "--slo", "5", "--question", "Who?", "--max-new-tokens",
                        "4", "--json", "--out", str(out)))
    assert done.exit_code == 0, done.output
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("ttft_s", "fetch_s", "decode_s", "recompute_s", "first_token_s", "chunks", "answer"):
        assert key in doc
    assert [c["action"] for c in doc["chunks"]] == ["int8"] * len(doc["chunks"])
    assert all(c["bytes"] > 0 and c["end_s"] >= c["start_s"] for c in doc["chunks"])
    rows = [json.loads(line) for line in (out / "chunks.jsonl").read_text().splitlines()]
    assert len(rows) == len(doc["chunks"]) and (out / "timeline.png").stat().st_size > 1000
    assert SERVE_TOKEN not in done.output


@pytest.mark.parametrize("extra, match", [
    (["--server", "ftp://x"], "--server must be an http"),
    (["--context-id", "../etc"], "bad context id"),
    (["--policy", "nope"], "unknown policy"),
    (["--slo", "0"], "--slo must be > 0"),
    (["--trace", "/nonexistent/trace.json"], "--trace"),
])
def test_fetch_bad_input_is_one_line_and_exit_2(served, extra, match):
    args = fetch_args(served)
    for i in range(0, len(extra), 2):  # override the option if it is there already
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += extra[i:i + 2]
    done = CliRunner(env={"KVCAST_TOKEN": SERVE_TOKEN}).invoke(app, args)
    assert done.exit_code == 2, done.output
    assert match in done.output and done.output.count("error:") == 1


def test_fetch_without_a_host_profile_says_how_to_make_one(served, tmp_path):
    args = fetch_args(served)
    i = args.index("--host-profile")
    del args[i:i + 2]
    done = CliRunner(env={"KVCAST_TOKEN": SERVE_TOKEN, "KVCAST_CACHE_DIR": str(tmp_path)}).invoke(app, args)
    assert done.exit_code == 2 and "kvcast calibrate host" in done.output


def test_fetch_with_a_wrong_token_fails_with_the_servers_answer(served):
    done = CliRunner(env={"KVCAST_TOKEN": "wrong-token-0123456789"}).invoke(app, fetch_args(served))
    assert done.exit_code == 1 and "HTTP 401" in done.output


def test_calibrate_host_measures_and_caches(served, tmp_path):
    out = tmp_path / "host.json"
    done = CliRunner().invoke(app, ["calibrate", "host", "--model", served["model"], "--levels", "raw,int8",
                                    "--chunk-tokens", "16", "--positions", "0,16", "--repeats", "1", "--out",
                                    str(out)])
    assert done.exit_code == 0, done.output
    doc = json.loads(out.read_text())
    assert set(doc["decode_values_per_s"]) == {"raw", "int8"} and len(doc["recompute"]["points"]) == 4
    for bad, match in ((["--positions", "x"], "--positions"), (["--levels", "nope"], "unknown level")):
        done = CliRunner().invoke(app, ["calibrate", "host", "--model", served["model"], *bad, "--out",
                                        str(tmp_path / "bad.json")])
        assert done.exit_code == 2 and match in done.output
        assert not (tmp_path / "bad.json").exists()
