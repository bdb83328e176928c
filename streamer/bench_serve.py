"""`kvcast bench serve`: how fast `kvcast serve` answers on loopback; returns a `kvcast.benchmark.result` dict.

1. A temporary ``dir://`` store gets `objects` random objects of `object_mib` MiB, the chunks of one context at
   level ``raw`` (with their manifest).
2. ``kvcast serve`` starts in a subprocess on a free loopback port (``--port 0``; a token, no rate limit, no
   access log, ``--max-streams`` above the sessions).
3. Single stream: one aiohttp client connection reads every object in turn, discarding the bytes; GB/s
   (1e9 bytes/s) per repeat, the median reported (target: 1 GB/s).
4. Load: `sessions` concurrent client sessions (a connection each) fetch the manifest, then
   `chunks_per_session` random chunks one after the other; errors (a status other than 200, a short body, an
   exception), chunk latency p50/p99 (request to last byte) and the aggregate GB/s. The server's peak RSS
   (``VmHWM`` of ``/proc/<pid>/status``) covers the whole run.

Client and server run on the same machine and share its CPUs. Nothing heavy is imported at import time (the
settings give the CLI its defaults).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvcast.benchmark import result

__all__ = ["BenchServeError", "ServeBenchSettings", "bench_serve"]

TARGET_GB_PER_S = 1.0
CONTEXT_ID = "bench-serve"
LEVEL = "raw"
_READY = re.compile(r"listening on http://(\S+):(\d+)")
_MIB = 1024 * 1024


class BenchServeError(RuntimeError):
    """The server did not start, or died during the benchmark."""


@dataclass(frozen=True)
class ServeBenchSettings:
    """Inputs of `bench_serve`."""

    objects: int = 64
    """Random objects in the temporary store (the chunks of one context)."""
    object_mib: float = 8.0
    """Size of each object (MiB)."""
    sessions: int = 50
    """Concurrent client sessions of the load test."""
    chunks_per_session: int = 4
    """Chunks each session fetches, one after the other."""
    repeats: int = 5
    """Single-stream repeats, each reading every object once; the median is reported."""
    seed: int = 0
    """Seed of the object bytes and the sessions' chunk choices."""
    startup_timeout_s: float = 60.0
    """How long the server may take to start listening."""

    def __post_init__(self) -> None:
        if self.objects < 1 or self.sessions < 1 or self.chunks_per_session < 1 or self.repeats < 1:
            raise ValueError("objects, sessions, chunks_per_session and repeats must be >= 1")
        if not (0 < self.object_mib <= 1024):
            raise ValueError(f"object_mib must be in (0, 1024], got {self.object_mib}")
        if self.startup_timeout_s <= 0:
            raise ValueError("startup_timeout_s must be > 0")

    @property
    def object_bytes(self) -> int:
        return max(1, round(self.object_mib * _MIB))


def bench_serve(settings: ServeBenchSettings) -> dict[str, Any]:
    """Run the benchmark (see the module docstring)."""
    import asyncio

    root = Path(tempfile.mkdtemp(prefix="kvcast-bench-serve-"))
    try:
        url, sizes = _fill_store(root / "store", settings)
        token = secrets.token_urlsafe(32)
        with _Server(url, token, settings) as server:
            measured = asyncio.run(_measure(server, token, sizes, settings))
            measured["server_peak_rss_mib"] = server.rss_mib("VmHWM")
            server.check_alive()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = measured.pop("rows")
    singles = [r["gb_per_s"] for r in rows if r["run"] == "single-stream"]
    median = statistics.median(singles)
    summary = {"single_stream_gb_per_s": median, "single_stream_target_gb_per_s": TARGET_GB_PER_S,
               "meets_target": median >= TARGET_GB_PER_S, **measured}
    return result("serve", {**asdict(settings), "object_bytes": settings.object_bytes}, rows, summary)


# ------------------------------------------------------------------------------------------------- store


def _fill_store(path: Path, settings: ServeBenchSettings) -> tuple[str, list[int]]:
    """A dir:// store with one context of `objects` random chunks at level raw; (URL, object sizes)."""
    import numpy as np

    from kvcast.streamer.store import ChunkEntry, Manifest, ObjectEntry, object_key, open_store

    chunk_tokens = 16
    tokens = list(range(settings.objects * chunk_tokens))
    model = {"name": "bench-serve", "layers": 1}
    rng = np.random.default_rng(settings.seed)
    store = open_store("dir://" + str(path))
    chunks = []
    for i in range(settings.objects):
        data = rng.bytes(settings.object_bytes)
        key = object_key(model, tokens, i * chunk_tokens, (i + 1) * chunk_tokens, LEVEL)
        store.put_object(key, data)
        chunks.append(ChunkEntry(i, i * chunk_tokens, chunk_tokens,
                                 {LEVEL: ObjectEntry(key, len(data), hashlib.sha256(data).hexdigest())}))
    digest = hashlib.sha256(str(tokens).encode()).hexdigest()
    store.put_manifest(Manifest(context_id=CONTEXT_ID, model=model, token_ids_sha256=digest, tokens=len(tokens),
                                chunk_tokens=chunk_tokens, levels=(LEVEL,), chunks=tuple(chunks),
                                created_s=time.time()))
    url = store.url
    store.close()
    return url, [settings.object_bytes] * settings.objects


# ------------------------------------------------------------------------------------------------- server


class _Server:
    """``kvcast serve`` in a subprocess on a free loopback port."""

    def __init__(self, url: str, token: str, settings: ServeBenchSettings) -> None:
        self.url = url
        self.token = token
        self.settings = settings
        self.proc: subprocess.Popen[str] | None = None
        self.base = ""
        self.stderr: deque[str] = deque(maxlen=50)
        self.start_rss_mib: float | None = None

    def __enter__(self) -> _Server:
        env = {**os.environ, "KVCAST_TOKEN": self.token}
        command = [sys.executable, "-m", "kvcast.cli", "serve", "--store", self.url, "--host", "127.0.0.1",
                   "--port", "0", "--rate", "0", "--access-log", "off",
                   "--max-streams", str(max(64, 2 * self.settings.sessions))]
        self.proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        ready = threading.Event()

        def drain() -> None:  # keep the pipe from filling; the first line that names the port means ready
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                self.stderr.append(line.rstrip())
                m = _READY.search(line)
                if m and not ready.is_set():
                    self.base = f"http://{m[1]}:{m[2]}"
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(self.settings.startup_timeout_s) or not self.base:
            self._stop()
            raise BenchServeError("kvcast serve did not start: " + (" | ".join(self.stderr) or "no output"))
        self.start_rss_mib = self.rss_mib("VmRSS")
        return self

    def rss_mib(self, field: str) -> float | None:
        """A memory field of the server's /proc status in MiB (None where /proc is not there)."""
        assert self.proc is not None
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M)
        return int(m[1]) / 1024 if m else None

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BenchServeError(f"kvcast serve exited with {self.proc.returncode}: " + " | ".join(self.stderr))

    def _stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __exit__(self, *exc: object) -> None:
        self._stop()


# ------------------------------------------------------------------------------------------------- clients


async def _fetch(session: Any, url: str, headers: dict[str, str]) -> int:
    """GET `url`, discarding the body; the body's length (`RuntimeError` on a status other than 200)."""
    async with session.get(url, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"status {response.status}")
        n = 0
        async for data in response.content.iter_any():
            n += len(data)
        return n


async def _measure(server: _Server, token: str, sizes: list[int], settings: ServeBenchSettings) -> dict[str, Any]:
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"}
    chunk_url = f"{server.base}/v1/contexts/{CONTEXT_ID}/chunks/{{}}/{LEVEL}"
    rows: list[dict[str, Any]] = []
    timeout = aiohttp.ClientTimeout(total=600, sock_read=60)

    # single stream: one connection, every object in turn
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), timeout=timeout) as session:
        await _fetch(session, chunk_url.format(0), headers)  # warm-up: connection, page cache, imports
        for repeat in range(settings.repeats):
            t0 = time.perf_counter()
            total = 0
            for i in range(len(sizes)):
                got = await _fetch(session, chunk_url.format(i), headers)
                if got != sizes[i]:
                    raise BenchServeError(f"object {i}: {got} bytes, expected {sizes[i]}")
                total += got
            seconds = time.perf_counter() - t0
            rows.append({"run": "single-stream", "repeat": repeat, "objects": len(sizes), "bytes": total,
                         "seconds": seconds, "gb_per_s": total / seconds / 1e9})
    server.check_alive()

    # load: concurrent sessions, each its own connection
    import asyncio

    latencies: list[float] = []
    errors: list[str] = []
    delivered = 0

    async def one_session(index: int) -> None:
        nonlocal delivered
        rng = random.Random(settings.seed * 1_000_003 + index)
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), timeout=timeout) as session:
                async with session.get(f"{server.base}/v1/contexts/{CONTEXT_ID}/manifest",
                                       headers=headers) as response:
                    if response.status != 200:
                        raise RuntimeError(f"manifest: status {response.status}")
                    await response.read()
                for _ in range(settings.chunks_per_session):
                    i = rng.randrange(len(sizes))
                    t0 = time.perf_counter()
                    try:
                        got = await _fetch(session, chunk_url.format(i), headers)
                    except Exception as exc:  # every failure is counted, the session goes on
                        errors.append(f"chunk {i}: {type(exc).__name__}: {exc}")
                        continue
                    latencies.append(time.perf_counter() - t0)
                    delivered += got
                    if got != sizes[i]:
                        errors.append(f"chunk {i}: {got} bytes, expected {sizes[i]}")
        except Exception as exc:
            errors.append(f"session {index}: {type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    await asyncio.gather(*(one_session(i) for i in range(settings.sessions)))
    wall = time.perf_counter() - t0
    requests = settings.sessions * settings.chunks_per_session
    p50, p99 = _percentiles(latencies, (50, 99))
    rows.append({"run": "sessions", "sessions": settings.sessions, "requests": requests, "errors": len(errors),
                 "bytes": delivered, "seconds": wall, "gb_per_s": delivered / wall / 1e9,
                 "latency_p50_s": p50, "latency_p99_s": p99, "latency_max_s": max(latencies, default=None),
                 "first_errors": errors[:5]})
    return {"rows": rows, "sessions": settings.sessions, "requests": requests, "errors": len(errors),
            "latency_p50_s": p50, "latency_p99_s": p99, "aggregate_gb_per_s": delivered / wall / 1e9,
            "server_start_rss_mib": server.start_rss_mib}


def _percentiles(values: list[float], qs: tuple[int, ...]) -> list[float | None]:
    """Nearest-rank percentiles (None for no values)."""
    if not values:
        return [None for _ in qs]
    ordered = sorted(values)
    return [ordered[min(len(ordered) - 1, max(0, -(-q * len(ordered) // 100) - 1))] for q in qs]
