"""The HTTP contract of `kvcast serve` (`kvcast.streamer.serve.make_app`): auth, objects and ranges, refusals,
caps, errors, metrics, the access log, pacing."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import time

import pytest

from kvcast.netsim.pacing import TracePacer
from kvcast.streamer.serve import ACCESS_LOG_FIELDS, ServeLimits, make_app, parse_range
from kvcast.traces.trace import Trace
from tests.factories import SERVE_TOKEN as TOKEN
from tests.factories import MemoryStore
from tests.factories import put_synthetic_context as put_context
from tests.streamer.serve.support import AUTH, SECRET, BrokenStore, Fixture, raw_request, run_with_client

CHUNK = "/v1/contexts/ctx-1/chunks/{}/{}"
PROTECTED = [("GET", "/metrics"), ("GET", "/v1/contexts"), ("GET", "/v1/contexts/ctx-1/manifest"),
             ("GET", CHUNK.format(0, "raw")), ("POST", "/v1/pacing/reset")]


def app_of(fx: Fixture, **kw):
    return make_app(fx.store, token=TOKEN, **kw)


async def error_of(response) -> str:
    doc = await response.json()
    assert set(doc) == {"error", "message"} and isinstance(doc["message"], str)
    return doc["error"]


# ------------------------------------------------------------------------------------------------- auth


def test_healthz_needs_no_token(memory):
    async def body(client):
        r = await client.get("/healthz")
        assert r.status == 200 and await r.json() == {"status": "ok"}

    run_with_client(app_of(memory), body)


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_protected_routes_need_the_token(memory, method, path):
    pacer = TracePacer(Trace([0.0, 1.0], [1e12]))

    async def body(client):
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789abc"},
                        {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}):
            r = await client.request(method, path, headers=headers)
            assert r.status == 401, headers
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert await error_of(r) == "unauthorized"
        r = await client.request(method, path, headers=AUTH)
        assert r.status == 200
        await r.read()

    run_with_client(app_of(memory, pacer=pacer), body)


def test_no_auth_serves_without_a_token(memory):
    async def body(client):
        assert (await client.get("/v1/contexts")).status == 200

    run_with_client(make_app(memory.store, token=None), body)


def test_an_empty_or_spaced_token_is_refused(memory):
    for token in ("", "zq9 zq9", "zq9zq9\n", "zq9\u00e9"):
        with pytest.raises(ValueError) as info:
            make_app(memory.store, token=token)
        assert "zq9" not in str(info.value)  # the message never shows the token


# ------------------------------------------------------------------------------------------------- data


def test_contexts_manifest_and_chunk_bytes_round_trip(stored):
    async def body(client):
        r = await client.get("/v1/contexts", headers=AUTH)
        assert await r.json() == {"contexts": ["ctx-1"]}
        r = await client.get("/v1/contexts/ctx-1/manifest", headers=AUTH)
        assert r.status == 200 and r.content_type == "application/json"
        assert await r.text() == stored.manifest.to_json()
        for i, by_level in enumerate(stored.objects):
            for level, data in by_level.items():
                r = await client.get(CHUNK.format(i, level), headers=AUTH)
                assert r.status == 200 and await r.read() == data
                sha = hashlib.sha256(data).hexdigest()
                assert r.headers["Content-Type"] == "application/octet-stream"
                assert r.headers["Content-Length"] == str(len(data)) and r.headers["Accept-Ranges"] == "bytes"
                assert r.headers["ETag"] == f'"{sha}"' and r.headers["X-Kvcast-Sha256"] == sha
        r = await client.head(CHUNK.format(0, "raw"), headers=AUTH)
        assert r.status == 200 and r.headers["Content-Length"] == str(len(stored.objects[0]["raw"]))
        assert await r.read() == b""

    run_with_client(app_of(stored, limits=ServeLimits(piece_bytes=64 * 1024, read_bytes=200_000)), body)


def test_range_requests(stored):
    data = stored.objects[0]["raw"]
    n = len(data)
    url = CHUNK.format(0, "raw")

    async def get(client, spec, **extra):
        r = await client.get(url, headers={**AUTH, "Range": spec, **extra})
        return r, await r.read()

    async def body(client):
        for spec, (a, b) in [("bytes=0-9", (0, 10)), ("bytes=100-", (100, n)), ("bytes=-500", (n - 500, n)),
                             ("bytes=10-99999999", (10, n)), ("bytes=-99999999", (0, n)),
                             (f"bytes={n - 1}-", (n - 1, n))]:
            r, got = await get(client, spec)
            assert r.status == 206 and got == data[a:b], spec
            assert r.headers["Content-Range"] == f"bytes {a}-{b - 1}/{n}"
            assert r.headers["Content-Length"] == str(b - a)
        for spec in (f"bytes={n}-", f"bytes={n + 5}-{n + 9}", "bytes=-0", "bytes=9-3", "bytes=x-y", "bytes=-"):
            r, _ = await get(client, spec)
            assert r.status == 416, spec
            assert r.headers["Content-Range"] == f"bytes */{n}"
        r, got = await get(client, "bytes=0-0")
        assert r.status == 206 and got == data[:1]
        # several ranges, another unit, or a stale If-Range: the whole object (documented)
        for spec, extra in (("bytes=0-1,5-6", {}), ("items=0-1", {}), ("bytes=5-", {"If-Range": '"stale"'})):
            r, got = await get(client, spec, **extra)
            assert r.status == 200 and got == data, spec
        r, got = await get(client, "bytes=5-", **{"If-Range": r.headers["ETag"]})
        assert r.status == 206 and got == data[5:]
        # a client that lost the connection resumes from what it has: the same bytes
        r = await client.get(url, headers=AUTH)
        first = await r.content.read(123_457)
        r.close()
        r, rest = await get(client, f"bytes={len(first)}-")
        assert r.status == 206 and first + rest == data
        # an empty object has no satisfiable range
        r = await client.get(CHUNK.format(2, "int8"), headers={**AUTH, "Range": "bytes=0-"})
        assert r.status == 416
        r = await client.get(CHUNK.format(2, "int8"), headers=AUTH)
        assert r.status == 200 and await r.read() == b""

    # blocks of 250 kB read from the store, written in pieces of 100, 100 and 50 kB
    run_with_client(app_of(stored, limits=ServeLimits(piece_bytes=100_000, read_bytes=250_000)), body)


def test_parse_range_edges():
    assert parse_range(None, 10) is None
    assert parse_range("bytes = 2 - 3", 10) == (2, 4)
    assert parse_range("BYTES=2-", 10) == (2, 10)
    with pytest.raises(ValueError):
        parse_range("bytes=" + "9" * 30 + "-", 10)  # more digits than any size: malformed, not a big int


def test_unknown_context_level_or_chunk_is_404_json(memory):
    async def body(client):
        for path in ("/v1/contexts/nope/manifest", "/v1/contexts/nope/chunks/0/raw", CHUNK.format(3, "raw"),
                     CHUNK.format(0, "cachegen-2"), CHUNK.format(999999999, "raw"), "/v1/nothing", "/"):
            r = await client.get(path, headers=AUTH)
            assert r.status == 404, path
            assert await error_of(r) == "not_found"
        for path in (CHUNK.format(-1, "raw"), CHUNK.format("1e3", "raw"), CHUNK.format(0, "RAW"),
                     "/v1/contexts/.hidden/manifest", CHUNK.format(0, "x" * 40)):
            r = await client.get(path, headers=AUTH)
            assert r.status == 400, path
            assert await error_of(r) == "bad_request"
        r = await client.put("/v1/contexts", headers=AUTH)
        assert r.status == 405 and await error_of(r) == "bad_request"

    run_with_client(app_of(memory), body)


TRAVERSALS = [
    "/v1/contexts/../secret.txt/manifest", "/v1/contexts/..%2fsecret.txt/manifest",
    "/v1/contexts/%2e%2e%2fsecret.txt/manifest", "/v1/contexts/%2e%2e/chunks/0/raw",
    "/v1/contexts/%252e%252e%252fsecret.txt/manifest", "/v1/contexts/ctx-1/chunks/0/..%2f..%2fsecret.txt",
    "/v1/contexts/ctx-1/chunks/0/%2e%2e%2f%2e%2e%2fsecret.txt", "/v1/contexts/%2fetc%2fpasswd/manifest",
    "/v1/contexts//etc/passwd/manifest", "/v1/contexts/..%5c..%5csecret.txt/manifest",
    "/v1/contexts/ctx-1%00/manifest", "/v1/contexts/ctx-1/chunks/0/raw%00", "/../../secret.txt",
    "/v1/contexts/ctx-1/chunks/0/../../../../secret.txt", "//secret.txt", "/secret.txt",
    "/v1/contexts/ctx-1/chunks/..%2f0/raw", "/v1/contexts/secret.txt/manifest",
]


def test_traversal_attempts_never_serve_a_file(stored):
    async def body(client):
        for path in TRAVERSALS:
            status, headers, payload = await raw_request(
                client, f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                        "Connection: close\r\n\r\n".encode())
            assert status in (400, 404), (path, status)
            assert SECRET not in payload and b"root:" not in payload, path
            assert json.loads(payload)["error"] in ("bad_request", "not_found"), path

    run_with_client(app_of(stored), body)


# ------------------------------------------------------------------------------------------------- caps


def test_oversized_request_line_or_headers_are_refused(memory):
    limits = ServeLimits(max_line_size=1024, max_field_size=1024)

    async def body(client):
        heads = [f"GET /v1/contexts/{'a' * 2000}/manifest HTTP/1.1\r\nHost: x\r\n\r\n",
                 f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {'b' * 2000}\r\n\r\n",
                 "GET /healthz HTTP/1.1\r\nHost: x\r\n" + "".join(f"X-{i}: 1\r\n" for i in range(200)) + "\r\n"]
        for head in heads:
            status, _, _ = await raw_request(client, head.encode())
            assert status in (400, 431)
        assert (await client.get("/healthz")).status == 200  # the server is fine

    run_with_client(app_of(memory, limits=limits), body)


def test_request_bodies_are_refused(memory):
    async def body(client):
        for method, path in (("POST", "/v1/pacing/reset"), ("GET", "/v1/contexts")):
            r = await client.request(method, path, headers=AUTH, data=b"x" * 10)
            assert r.status == 413 and await error_of(r) == "too_large"
        status, _, payload = await raw_request(
            client, b"POST /v1/pacing/reset HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                    b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        assert status == 413
        r = await client.post("/v1/pacing/reset", headers=AUTH)  # empty POST: fine (404: no pacer)
        assert r.status == 404 and await error_of(r) == "not_found"

    run_with_client(app_of(memory), body)


def test_concurrent_streams_are_capped(memory):
    pacer = TracePacer(Trace([0.0, 100.0], [8e6]))  # 1 MB/s: the first streams stay in flight

    async def body(client):
        url = CHUNK.format(0, "raw")
        first = [await client.get(url, headers=AUTH) for _ in range(2)]  # headers in: both streams hold a slot
        r = await client.get(url, headers=AUTH)
        assert r.status == 503 and await error_of(r) == "busy"
        assert int(r.headers["Retry-After"]) >= 1
        assert (await client.get("/v1/contexts", headers=AUTH)).status == 200  # not a stream
        for f in first:
            f.close()
        for _ in range(50):  # the slots come back once the server sees the disconnects
            await asyncio.sleep(0.05)
            r = await client.get(CHUNK.format(1, "int8"), headers=AUTH)
            if r.status == 200:
                break
        assert r.status == 200

    run_with_client(app_of(memory, pacer=pacer, limits=ServeLimits(max_streams=2, piece_bytes=16 * 1024)), body)


def test_rate_limit_per_client(memory):
    async def body(client):
        statuses = [(await client.get("/healthz")).status for _ in range(5)]
        assert statuses == [200] * 3 + [429] * 2
        r = await client.get("/healthz")
        assert r.status == 429 and await error_of(r) == "rate_limited"
        assert int(r.headers["Retry-After"]) >= 1
        await asyncio.sleep(0.6)  # 2 requests/s: one more token
        assert (await client.get("/healthz")).status == 200

    run_with_client(app_of(memory, limits=ServeLimits(rate_per_s=2, burst=3)), body)


def test_store_down_is_503_store_unavailable(memory):
    store = BrokenStore()

    async def body(client):
        assert (await client.get("/healthz")).status == 200
        for path in ("/v1/contexts", "/v1/contexts/ctx-1/manifest", CHUNK.format(0, "raw")):
            r = await client.get(path, headers=AUTH)
            assert r.status == 503, path
            assert await error_of(r) == "store_unavailable"

    run_with_client(make_app(store, token=TOKEN), body)


def test_an_object_shorter_than_its_manifest_aborts_the_stream(memory):
    store = MemoryStore()
    manifest = put_context(store, "short", [{"raw": b"x" * 300_000}])
    key = manifest.chunks[0].objects["raw"].key
    store.objects[key] = b"x" * 200_000  # truncated behind the manifest's back

    async def body(client):
        r = await client.get("/v1/contexts/short/chunks/0/raw", headers=AUTH)
        assert r.status == 200
        with pytest.raises(Exception):  # noqa: B017 - aiohttp's payload error: the body ends early
            await r.read()

    run_with_client(make_app(store, token=TOKEN, limits=ServeLimits(piece_bytes=64 * 1024)), body)


# ------------------------------------------------------------------------------------------------- observability


def test_metrics_count_requests_bytes_errors_and_streams(memory):
    async def body(client):
        def value(text, name, **labels):
            for line in text.splitlines():
                if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
                    return float(line.rsplit(" ", 1)[1])
            return 0.0

        before = await (await client.get("/metrics", headers=AUTH)).text()
        for _ in range(3):
            await (await client.get(CHUNK.format(1, "raw"), headers=AUTH)).read()
        await client.get("/v1/contexts/nope/manifest", headers=AUTH)
        await client.get("/v1/contexts", headers={"Authorization": "Bearer nope"})
        r = await client.get("/metrics", headers=AUTH)
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        after = await r.text()
        route = "/v1/contexts/{context_id}/chunks/{index}/{level}"
        requests = "kvcast_serve_requests_total"
        assert value(after, requests, route=route, status=200) - value(before, requests, route=route, status=200) == 3
        assert value(after, "kvcast_serve_bytes_sent_total") - value(before, "kvcast_serve_bytes_sent_total") >= 30_000
        assert value(after, "kvcast_serve_errors_total", kind="not_found") == 1
        assert value(after, "kvcast_serve_errors_total", kind="unauthorized") == 1
        assert value(after, "kvcast_serve_request_duration_seconds_count", route=route) == 3
        assert "kvcast_serve_inflight_streams 0.0" in after

    run_with_client(app_of(memory), body)


def test_each_app_has_its_own_metrics(memory):
    async def body(client):
        text = await (await client.get("/metrics", headers=AUTH)).text()
        assert "kvcast_serve_requests_total" in text and "python_gc" not in text  # not the global registry

    run_with_client(app_of(memory), body)
    run_with_client(app_of(memory), body)  # a second app registers its metrics again without clashing


def test_access_log_is_one_json_line_per_request_without_the_token(memory):
    stream = io.StringIO()
    logger = logging.getLogger("kvcast.serve.test-access")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    async def body(client):
        await (await client.get(CHUNK.format(1, "int8"), headers=AUTH)).read()
        await client.get("/v1/contexts/nope/manifest", headers=AUTH)
        await client.get(f"/v1/contexts?token={TOKEN}", headers={"Authorization": "Bearer wrong"})

    try:
        run_with_client(app_of(memory, access_logger=logger), body)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert TOKEN not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 3 and all(tuple(line) == ACCESS_LOG_FIELDS for line in lines)
    chunk, missing, denied = lines
    assert chunk["status"] == 200 and chunk["bytes"] == 5_000 and chunk["context_id"] == "ctx-1"
    assert chunk["chunk"] == 1 and chunk["level"] == "int8" and chunk["error"] is None
    assert chunk["remote"] == "127.0.0.1" and chunk["method"] == "GET" and chunk["duration_s"] >= 0
    assert missing["status"] == 404 and missing["error"] == "not_found"
    assert denied["status"] == 401 and denied["error"] == "unauthorized" and denied["path"] == "/v1/contexts"


# ------------------------------------------------------------------------------------------------- pacing


def test_pacing_follows_the_trace(memory):
    """8 Mbps and a 1 MB object: about 1 s plus the RTT; a reset restarts the trace at t = 0."""
    store = MemoryStore()
    data = bytes(range(256)) * 3907  # 1,000,192 bytes
    put_context(store, "paced", [{"raw": data}])
    trace = Trace([0.0, 1.2, 100.0], [8e6, 80e6], wrap=False)  # a slow start, then ten times faster
    pacer = TracePacer(trace, rtt_s=0.1)

    async def fetch(client):
        t0 = time.monotonic()
        r = await client.get("/v1/contexts/paced/chunks/0/raw", headers=AUTH)
        got = await r.read()
        assert r.status == 200 and got == data
        return time.monotonic() - t0

    async def body(client):
        assert (await client.post("/v1/pacing/reset", headers=AUTH)).status == 200
        slow = await fetch(client)
        assert slow == pytest.approx(1.0 + 0.1, rel=0.15)
        fast = await fetch(client)  # now past 1.2 s of the trace: 80 Mbps
        assert fast < 0.5
        reset = await client.post("/v1/pacing/reset", headers=AUTH)
        assert reset.status == 200 and (await reset.json())["status"] == "ok"
        again = await fetch(client)
        assert again == pytest.approx(1.0 + 0.1, rel=0.15)

    run_with_client(make_app(store, token=TOKEN, pacer=pacer), body)
