"""End-to-end faults against the real ``kvcast serve`` CLI (a subprocess) and `fetch_context` in the test.

A tiny Llama, wide enough that a raw chunk is ~770 kB (three 256 KiB pieces of the server's pacer), is stored
with `put_context`; the server paces its sends by a 8 Mbps trace (kvcast JSON format) so a chunk takes
~0.8 s and a fault can land mid-chunk. A watcher thread polls the server's ``/metrics`` byte counter and
strikes at a known point: the server killed (SIGKILL) and restarted on the same port, killed for good, the
object's bytes corrupted on disk, the Redis store stopped. After recovery the model's answer equals an
undisturbed run's (same levels), or a local run of the actions the session ended with (recomputed chunks).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from kvcast.policies.base import TEXT
from kvcast.policies.registry import default_registry
from kvcast.streamer.fetch import FetchResult, fetch_context
from kvcast.streamer.ingest import put_context
from kvcast.streamer.live import HostProfile
from kvcast.streamer.menus import RecomputeCost
from kvcast.streamer.serve_config import DEFAULT_LIMITS
from kvcast.streamer.store import open_store
from tests.factories import local_answer, save_tiny_model, start_serve_process

TOKEN = "faults-e2e-token-0123456789"
CHUNK_TOKENS = 384
TEXT_BODY = ("The quick brown fox jumps over the lazy dog. " * 30)[:3 * CHUNK_TOKENS]  # 3 chunks of byte tokens
QUESTION = "Who jumps?"
HOST = HostProfile(recompute=RecomputeCost(1e-5, 0.0, 1e-3), default_decode_values_per_s=1e8)
TRACE_BPS = 8e6  # 1 MB/s: one 256 KiB piece every ~0.26 s, so a watcher polling every 10 ms strikes mid-chunk
PIECE = DEFAULT_LIMITS.piece_bytes
SLO_S = 30.0  # the link's deadline is twice this: never reached here


# ----------------------------------------------------------------------------------------------- fixtures


def save_wide_model(folder: Path) -> Path:
    """`save_tiny_model`'s byte tokenizer with a wider random Llama (4 layers x 4 KV heads x 32): 2 KiB of
    fp16 KV per token, so a chunk of 384 tokens is ~770 kB raw."""
    import torch
    import transformers

    save_tiny_model(folder, seed=7)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                                      max_position_embeddings=2048)
    torch.manual_seed(7)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    pytest.importorskip("transformers")
    from kvcast.codec.model import load_model

    return load_model(save_wide_model(tmp_path_factory.mktemp("models") / "wide-llama"), progress=False)


@pytest.fixture(scope="module")
def stored(model, tmp_path_factory):
    """A dir:// store holding the context at raw and int8 (the pristine copy: tests serve copies of it)."""
    root = tmp_path_factory.mktemp("store") / "pristine"
    store = open_store(root)
    manifest = put_context(store, "doc", TEXT_BODY, model=model, levels=["raw", "int8"],
                           chunk_tokens=CHUNK_TOKENS).manifest
    sizes = [c.objects["raw"].nbytes for c in manifest.chunks]
    assert len(sizes) == 3 and all(2 * PIECE < s < DEFAULT_LIMITS.read_bytes for s in sizes), sizes
    return root, store, manifest


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory) -> Path:
    from kvcast.traces import Trace

    path = tmp_path_factory.mktemp("trace") / "const-8mbps.json"
    path.write_text(json.dumps(Trace([0.0, 10.0], [TRACE_BPS], name="const-8mbps").to_jsonable()))
    return path


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def undisturbed(model, stored, token_file, tmp_path_factory):
    """fixed:raw fetched from an undisturbed CLI server (no pacing): the answer every recovery must give."""
    root, _, _ = stored
    with serving(f"dir://{root}", token_file, tmp_path_factory.mktemp("ref")) as server:
        result = fetch(server.url, model, "fixed:raw")
    assert [r.action for r in result.session.chunks] == ["raw"] * 3 and result.retries == []
    return result


@pytest.fixture
def store_copy(stored, tmp_path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(stored[0], root)
    return root


# ----------------------------------------------------------------------------------------------- helpers


class CliServer:
    """`python -m kvcast.cli serve` in a subprocess: started, killed, restarted on the same port."""

    def __init__(self, store: str, token_file: Path, workdir: Path, trace: Path | None = None) -> None:
        self.store, self.token_file, self.workdir, self.trace = store, token_file, workdir, trace
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.logs: list[Path] = []
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = self.workdir / f"access-{len(self.logs)}.log"
        self.logs.append(log)
        args = ["--store", self.store, "--port", str(self.port), "--token-file", str(self.token_file), "--rate", "0",
                "--access-log", str(log)]
        if self.trace is not None:
            args += ["--trace", str(self.trace)]
        self.proc, _, url = start_serve_process(args)
        self._reader = self.proc.reader
        self.port = int(url.rsplit(":", 1)[1])

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, the open connections are cut mid-stream."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self._reap()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None:
            self.proc.wait(10)
            if self._reader is not None:
                self._reader.join(5)
            self.proc.stderr.close()
        self.proc, self._reader = None, None

    def access_log(self, index: int = -1) -> list[dict]:
        path = self.logs[index]
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@contextlib.contextmanager
def serving(store: str, token_file: Path, workdir: Path, trace: Path | None = None):
    server = CliServer(store, token_file, workdir, trace)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class StreamedBytes:
    """The body bytes a server has sent but for these polls' own: ``/metrics``' ``kvcast_serve_bytes_sent_total``
    counts every body, this poller's earlier ones too (each is counted before it is sent), so it subtracts them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.polls_bytes = 0

    def __call__(self) -> float | None:
        request = urllib.request.Request(self.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        try:
            with urllib.request.urlopen(request, timeout=2) as r:
                body = r.read()
        except OSError:
            return None
        found = re.search(r"^kvcast_serve_bytes_sent_total (\S+)$", body.decode(), re.M)
        sent = None if found is None else float(found[1]) - self.polls_bytes
        self.polls_bytes += len(body)
        return sent


@contextlib.contextmanager
def strike_when(url: str, condition: Callable[[float], bool], action: Callable[[], None], timeout_s: float = 20):
    """A thread polling `url`'s byte counter every 10 ms (at most `timeout_s`) that runs `action` once
    `condition(bytes_sent)` holds; yields a dict whose ``"at"`` is the counter value it struck at."""
    struck: dict = {}
    stop = threading.Event()
    poll = StreamedBytes(url)

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while not stop.is_set() and time.monotonic() < deadline:
            sent = poll()
            if sent is not None and condition(sent):
                struck["at"] = sent
                action()
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield struck
    finally:
        stop.set()
        thread.join(timeout_s + 15)


def fetch(url: str, model, policy: str, **kwargs) -> FetchResult:
    return asyncio.run(fetch_context(url, "doc", model=model, policy=default_registry().create(policy), slo_s=SLO_S,
                                     host=HOST, token=TOKEN, question=QUESTION, max_new_tokens=8, **kwargs))


def local(model, stored, actions) -> list[int]:
    _, store, manifest = stored
    prompt = model.tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    return local_answer(model, store, manifest, actions, prompt)[0]


def mid_chunk(manifest, chunk: int) -> Callable[[float], bool]:
    """True once the server has sent at least one piece, not all, of `chunk` (one transfer at a time; the
    manifest's few kB come first, so a whole piece of `chunk` is out once the counter passes it)."""
    before = sum(c.objects["raw"].nbytes for c in manifest.chunks[:chunk])
    return lambda sent: before + PIECE <= sent < before + manifest.chunks[chunk].objects["raw"].nbytes


# ----------------------------------------------------------------------------------------------- tests


def test_undisturbed_run_answers_like_a_local_run(model, stored, undisturbed):
    assert undisturbed.answer_ids == local(model, stored, ["raw"] * 3)


def test_server_killed_mid_chunk_and_restarted_resumes_by_range(model, stored, store_copy, token_file, trace_file,
                                                                tmp_path, undisturbed):
    manifest = stored[2]
    server = CliServer(f"dir://{store_copy}", token_file, tmp_path, trace_file)
    server.start()

    def kill_and_restart() -> None:
        server.kill()
        server.start()  # same port (SO_REUSEADDR), well within the client's retries' backoff

    try:
        with strike_when(server.url, mid_chunk(manifest, 1), kill_and_restart) as struck:
            result = fetch(server.url, model, "fixed:raw", retries=8, reset_server_pacing=True)
    finally:
        server.stop()
    assert "at" in struck, "the watcher never saw chunk 1 in flight"
    size = manifest.chunks[1].objects["raw"].nbytes
    assert [r.action for r in result.session.chunks] == ["raw"] * 3
    assert not any(r.fallback for r in result.session.chunks)
    assert result.answer_ids == undisturbed.answer_ids
    # the cut stream, then refused connections while the server restarts; all keep the received prefix
    assert result.retries and {a["chunk"] for a in result.retries} == {1}
    received = result.retries[0]["received"]
    assert PIECE <= received < size and received % PIECE == 0
    assert all(a["received"] == received for a in result.retries)
    # the restarted server sent the rest of chunk 1 (206, Range) and chunk 2 whole
    chunks = [(e["chunk"], e["status"], e["bytes"]) for e in server.access_log(-1) if e["chunk"] is not None]
    assert chunks == [(1, 206, size - received), (2, 200, manifest.chunks[2].objects["raw"].nbytes)]


def test_server_killed_for_good_recomputes_the_rest(model, stored, store_copy, token_file, trace_file, tmp_path):
    manifest = stored[2]
    server = CliServer(f"dir://{store_copy}", token_file, tmp_path, trace_file)
    server.start()
    try:
        with strike_when(server.url, mid_chunk(manifest, 1), server.kill) as struck:
            result = fetch(server.url, model, "fixed:raw", retries=3, reset_server_pacing=True)
    finally:
        server.stop()
    assert "at" in struck, "the watcher never saw chunk 1 in flight"
    actions = [r.action for r in result.session.chunks]
    assert actions == ["raw", TEXT, TEXT]
    recs = result.session.chunks
    assert not recs[0].fallback and all("gave up after 4 attempts" in r.fallback for r in recs[1:])
    assert [a["chunk"] for a in result.retries] == [1] * 4 + [2] * 4
    assert result.retries[0]["received"] >= PIECE and result.retries[-1]["received"] == 0
    assert result.answer_ids == local(model, stored, actions)


def test_corrupt_object_on_disk_is_refused_and_recomputed(model, stored, store_copy, token_file, tmp_path):
    manifest = stored[2]
    key = manifest.chunks[1].objects["raw"].key
    path = store_copy / "objects" / key[:2] / key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit in the KV payload: same size, wrong SHA-256
    path.write_bytes(bytes(data))
    with serving(f"dir://{store_copy}", token_file, tmp_path) as server:
        result = fetch(server.url, model, "fixed:raw", retries=2)
        log = server.access_log()
    actions = [r.action for r in result.session.chunks]
    assert actions == ["raw", TEXT, "raw"]
    assert "gave up after 3 attempts (checksum mismatch" in result.session.chunks[1].fallback
    assert [(a["chunk"], a["error"][:17]) for a in result.retries] == [(1, "checksum mismatch")] * 3
    # the server served the bad bytes whole, three times: the client's check refused them
    served = [(e["chunk"], e["status"], e["bytes"]) for e in log if e["chunk"] == 1]
    assert served == [(1, 200, len(data))] * 3
    assert result.answer_ids == local(model, stored, actions)


@pytest.fixture
def redis_server(tmp_path):
    """A redis-server of this test only (stopped mid-test; stopped again, harmlessly, at teardown)."""
    pytest.importorskip("redis", reason="the redis package (kvcast[redis]) is not installed")
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not found on PATH (apt-get install redis-server): Redis fault test skipped")
    from tests.factories import RedisServer, free_port

    server = RedisServer(binary, free_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_redis_down_mid_session_recomputes_the_rest(model, stored, redis_server, token_file, trace_file, tmp_path):
    manifest = stored[2]
    url = redis_server.url("f" + uuid.uuid4().hex[:12])
    store = open_store(url)
    try:
        put = put_context(store, "doc", TEXT_BODY, model=model, levels=["raw", "int8"], chunk_tokens=CHUNK_TOKENS)
    finally:
        store.close()
    assert list(put.manifest.keys()) == list(manifest.keys())  # the same objects as the dir store (content-addressed)
    server = CliServer(url, token_file, tmp_path, trace_file)
    server.start()
    try:
        # chunk 0 (< one 1 MiB store read) is in the server's memory once its first piece is out
        with strike_when(server.url, mid_chunk(manifest, 0), redis_server.stop) as struck:
            result = fetch(server.url, model, "fixed:raw", reset_server_pacing=True)
        log = server.access_log()
    finally:
        server.stop()
    assert "at" in struck, "the watcher never saw chunk 0 in flight"
    actions = [r.action for r in result.session.chunks]
    assert actions == ["raw", TEXT, TEXT]
    for rec in result.session.chunks[1:]:
        assert "HTTP 503" in rec.fallback and "unreachable" in rec.fallback
    assert result.retries == []  # a 503 from the server is an answer, not a transport fault: no retry
    assert [(e["chunk"], e["status"], e["error"]) for e in log if e["chunk"] is not None] == [
        (0, 200, None), (1, 503, "store_unavailable"), (2, 503, "store_unavailable")]
    assert result.answer_ids == local(model, stored, actions)
