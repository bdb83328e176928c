"""HttpLink against a small fault-injecting aiohttp server on loopback: resets, stalls, corrupt bytes, refusals.

Every recovery ends with the exact object bytes (checked against the expected SHA-256), and a transfer that
cannot succeed fails with `LinkFailure` (which the engine turns into a recompute).
"""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
from aiohttp import web

from kvcast.netsim.http_link import ExpectedObject, HttpLink
from kvcast.netsim.link import ChunkRequest, LinkFailure

TOKEN = "secret-token"
OBJECTS = {(0, "raw"): os.urandom(600_000), (1, "int8"): os.urandom(300_000)}


def expected():
    return {k: ExpectedObject(len(v), hashlib.sha256(v).hexdigest()) for k, v in OBJECTS.items()}


class Faults:
    """What the server does to the next requests: a list of fault names, consumed one per request."""

    def __init__(self, *faults: str) -> None:
        self.faults = list(faults)
        self.ranges: list[str | None] = []
        self.release = asyncio.Event()  # ends stalled responses when the test is done

    def next(self) -> str | None:
        return self.faults.pop(0) if self.faults else None


def make_app(faults: Faults) -> web.Application:
    async def chunk(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": "unauthorized", "message": "bad token"}, status=401)
        key = (int(request.match_info["chunk"]), request.match_info["level"])
        if key not in OBJECTS:
            return web.json_response({"error": "not_found", "message": "no such object"}, status=404)
        data = OBJECTS[key]
        faults.ranges.append(request.headers.get("Range"))
        start = 0
        if "Range" in request.headers:
            start = int(request.headers["Range"].removeprefix("bytes=").split("-")[0])
        fault = faults.next()
        if fault == "busy":
            return web.json_response({"error": "busy", "message": "too many streams"}, status=503,
                                     headers={"Retry-After": "0"})
        if fault == "store_down":
            return web.json_response({"error": "store_unavailable", "message": "redis down"}, status=503)
        if fault == "rate":
            return web.json_response({"error": "rate_limited", "message": "slow down"}, status=429,
                                     headers={"Retry-After": "0"})
        body = data[start:]
        if fault == "corrupt":
            body = body[:100] + bytes([body[100] ^ 1]) + body[101:]
        response = web.StreamResponse(status=206 if start else 200)
        response.content_length = len(body)
        await response.prepare(request)
        if fault == "reset":
            await response.write(body[: len(body) // 3])
            request.transport.close()  # the connection drops mid-body
            return response
        if fault == "stall":
            await response.write(body[: len(body) // 2])
            await asyncio.wait_for(faults.release.wait(), timeout=30)
            return response
        await response.write(body)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/v1/contexts/{cid}/chunks/{chunk}/{level}", chunk)
    return app


async def _with_server(faults: Faults, body):
    runner = web.AppRunner(make_app(faults))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    link = HttpLink(f"http://127.0.0.1:{port}", "ctx", expected(), token=TOKEN, retries=3, backoff_s=0.01,
                    stall_timeout_s=0.5)
    try:
        return await asyncio.wait_for(body(link), timeout=30)
    finally:
        faults.release.set()
        await link.aclose()
        await runner.cleanup()


def run(faults: Faults, body):
    return asyncio.run(_with_server(faults, body))


@pytest.mark.parametrize("fault, resumes", [(None, False), ("reset", True), ("stall", True), ("corrupt", False)])
def test_fetch_recovers_the_exact_bytes(fault, resumes):
    faults = Faults(*([fault] if fault else []))

    async def body(link):
        return await link.fetch(0, "raw"), link.attempts

    timing, attempts = run(faults, body)
    assert timing.payload == OBJECTS[(0, "raw")] and timing.nbytes == len(timing.payload)
    assert timing.end_s >= timing.start_s
    assert len(attempts) == (1 if fault else 0)
    if resumes:  # the retry asked only for the rest of the object
        assert faults.ranges[-1] is not None and int(faults.ranges[-1][6:-1]) == attempts[0]["received"] > 0
    elif fault == "corrupt":  # a bad checksum refetches the whole object
        assert faults.ranges == [None, None]


def test_refusals_fail_at_once_with_the_servers_message():
    async def body(link):
        out = []
        for chunk, level, token in ((5, "raw", TOKEN), (0, "raw", "wrong")):
            link._token = token
            link.objects[(5, "raw")] = ExpectedObject(1, "00")
            with pytest.raises(LinkFailure) as info:
                await link.fetch(chunk, level)
            out.append(str(info.value))
        return out, link.attempts

    (missing, unauthorized), attempts = run(Faults(), body)
    assert "HTTP 404" in missing and "no such object" in missing
    assert "HTTP 401" in unauthorized
    assert attempts == []  # not retried


def test_retries_are_bounded_and_then_the_transfer_fails():
    async def body(link):
        with pytest.raises(LinkFailure, match="gave up after 4 attempts"):
            await link.fetch(1, "int8")
        return link.attempts

    attempts = run(Faults("reset", "reset", "reset", "reset", "reset"), body)
    assert len(attempts) == 4


def test_no_retry_past_the_deadline():
    async def body(link):
        link.set_deadline(asyncio.get_running_loop().time())  # already passed
        with pytest.raises(LinkFailure, match="deadline"):
            await link.fetch(1, "int8")
        return link.attempts

    assert len(run(Faults("reset"), body)) == 1


def test_send_request_reports_to_the_engine_callback():
    async def body(link):
        done = asyncio.get_running_loop().create_future()
        link.send_request(ChunkRequest(1, "int8", len(OBJECTS[(1, "int8")])), done.set_result)
        return await done

    outcome = run(Faults(), body)
    assert outcome.payload == OBJECTS[(1, "int8")]


@pytest.mark.parametrize("fault", ["busy", "rate"])
def test_a_busy_or_rate_limited_server_is_retried(fault):
    async def body(link):
        return await link.fetch(0, "raw"), link.attempts

    timing, attempts = run(Faults(fault), body)
    assert timing.payload == OBJECTS[(0, "raw")] and len(attempts) == 1 and "busy" in attempts[0]["error"]


def test_a_store_outage_is_not_retried():
    async def body(link):
        with pytest.raises(LinkFailure, match="HTTP 503: redis down"):
            await link.fetch(0, "raw")
        return link.attempts

    assert run(Faults("store_down"), body) == []
