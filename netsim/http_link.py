"""`HttpLink`: the engine's link over HTTP to ``kvcast serve``, with real bytes.

Each engine request (chunk, level) becomes ``GET {base}/v1/contexts/{id}/chunks/{chunk}/{level}`` with a bearer
token. The link times the transfer on the loop's clock (request sent to last byte, so the throughput the
policy sees includes the RTT like the simulated link's), checks the body's SHA-256 against the expected one
before handing it on, and recovers from faults:

* a connection reset or a stalled stream (no byte for ``stall_timeout_s``) is retried up to ``retries`` times
  with exponential backoff, resuming with ``Range: bytes=<received>-`` so received bytes are not fetched again;
* a checksum mismatch discards the bytes and retries from the start;
* past ``deadline_s`` (loop-clock time; e.g. the session's start plus its SLO) or after the last retry, the
  transfer fails with `LinkFailure`, and the engine recomputes the chunk from text instead.

Errors the server answers with (401, 404, 416, 503 ``store_unavailable``...) are not retried: they fail at once
with the server's message. A busy or rate-limited server (503 ``busy``, 429) is retried after its
``Retry-After`` (at most ``max_retry_after_s``), within the same retry budget and deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from kvcast.netsim.link import ChunkRequest, Link, LinkFailure, TransferOutcome, TransferTiming
from kvcast.netsim.pacing import TracePacer

__all__ = ["ExpectedObject", "HttpLink"]

_READ_BYTES = 1 << 18


@dataclass(frozen=True, slots=True)
class ExpectedObject:
    """What the manifest says of one object."""

    nbytes: int
    sha256: str


class HttpLink(Link):
    """Fetches chunk objects of one context from ``kvcast serve``.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8470``.
        context_id: the stored context.
        objects: ``(chunk, level) -> ExpectedObject`` from the context's manifest.
        token: the bearer token (None: no Authorization header).
        session: an ``aiohttp.ClientSession`` (one is created on first use and closed by `close`).
        rtt_s: the RTT prior given to policies (the link measures real times).
        retries: attempts after the first one, per request.
        backoff_s: the first retry's delay; it doubles per retry.
        stall_timeout_s: a read that gets no byte for this long counts as a stalled stream.
        connect_timeout_s: connection set-up limit.
        deadline_s: loop-clock time after which no retry starts and transfers fail (`set_deadline`).
        pacer: paces the reads to follow a trace on the client side (`kvcast.netsim.pacing.TracePacer`).
        max_retry_after_s: the longest ``Retry-After`` of a busy server the link waits for.
    """

    def __init__(self, base_url: str, context_id: str, objects: Mapping[tuple[int, str], ExpectedObject], *,
                 token: str | None = None, session: aiohttp.ClientSession | None = None, rtt_s: float = 0.0,
                 retries: int = 3, backoff_s: float = 0.05, stall_timeout_s: float = 5.0,
                 connect_timeout_s: float = 5.0, deadline_s: float | None = None,
                 pacer: TracePacer | None = None, max_retry_after_s: float = 2.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.context_id = context_id
        self.objects = dict(objects)
        self.rtt_s = rtt_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.stall_timeout_s = stall_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.deadline_s = deadline_s
        self.pacer = pacer
        self.max_retry_after_s = max_retry_after_s
        self._token = token
        self._session = session
        self._own_session = session is None
        self.attempts: list[dict[str, Any]] = []
        """One entry per failed attempt (chunk, level, error, received bytes): what recovery did."""

    def set_deadline(self, deadline_s: float | None) -> None:
        self.deadline_s = deadline_s

    def url(self, chunk: int, level: str) -> str:
        return f"{self.base_url}/v1/contexts/{self.context_id}/chunks/{chunk}/{level}"

    def start_transfer(self, nbytes: int) -> asyncio.Future[TransferTiming]:
        raise TypeError("HttpLink fetches named objects: the engine calls send_request")

    def send_request(self, request: ChunkRequest, on_done: Callable[[TransferOutcome], None]) -> None:
        task = asyncio.get_running_loop().create_task(self.fetch(request.chunk, request.level))

        def done(t: asyncio.Task[TransferTiming]) -> None:
            on_done(asyncio.CancelledError() if t.cancelled() else (t.exception() or t.result()))

        task.add_done_callback(done)

    async def fetch(self, chunk: int, level: str) -> TransferTiming:
        """Fetch one object (with the retries, resumes and checks above)."""
        expected = self.objects.get((chunk, level))
        if expected is None:
            raise LinkFailure(f"no object for chunk {chunk} at level {level!r} in the manifest")
        loop = asyncio.get_running_loop()
        session = await self._ensure_session()
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        start = loop.time()
        received = _Body()
        attempt = 0
        while True:
            wait_s = 0.0
            try:
                await self._get(session, self.url(chunk, level), headers, received)
                if len(received) == expected.nbytes and received.sha256() == expected.sha256:
                    end = loop.time()
                    data = bytes(received.data)
                    return TransferTiming(len(data), len(data) * 8.0, start, start, end, payload=data)
                error = (f"checksum mismatch ({len(received)} bytes, expected {expected.nbytes})"
                         if len(received) >= expected.nbytes else f"short body ({len(received)} bytes)")
                received.clear()  # corrupt or short: fetch the whole object again
            except _ServerBusy as exc:
                error, wait_s = str(exc), min(exc.retry_after_s, self.max_retry_after_s)
            except _ServerRefused as exc:
                raise LinkFailure(f"chunk {chunk} at {level}: {exc}") from None
            except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self.attempts.append({"chunk": chunk, "level": level, "error": error, "received": len(received)})
            attempt += 1
            delay = max(self.backoff_s * 2 ** (attempt - 1), wait_s)
            if attempt > self.retries:
                raise LinkFailure(f"chunk {chunk} at {level}: gave up after {attempt} attempts ({error})")
            if self.deadline_s is not None and loop.time() + delay >= self.deadline_s:
                raise LinkFailure(f"chunk {chunk} at {level}: deadline passed ({error})")
            await asyncio.sleep(delay)

    async def _get(self, session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                   received: _Body) -> None:
        """GET the rest of the object into `received` (resuming with a Range header when it holds a prefix)."""
        if received:
            headers = {**headers, "Range": f"bytes={len(received)}-"}
        timeout = aiohttp.ClientTimeout(total=None, connect=self.connect_timeout_s,
                                        sock_read=self.stall_timeout_s)
        if self.pacer is not None:
            await self.pacer.round_trip()
        async with session.get(url, headers=headers, timeout=timeout) as response:
            if received and response.status == 200:
                received.clear()  # the server ignored the range: the body is the whole object
            elif response.status in (429, 503) and await _is_busy(response):
                raise _ServerBusy(f"HTTP {response.status}: busy", _retry_after_s(response))
            elif response.status not in (200, 206):
                raise _ServerRefused(await _error_text(response))
            async for piece in response.content.iter_chunked(_READ_BYTES):
                received.add(piece)
                if self.pacer is not None:
                    await self.pacer.wait(len(piece))

    async def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._own_session = True
        return self._session

    async def aclose(self) -> None:
        """Close the HTTP session if the link created it."""
        if self._own_session and self._session is not None:
            await self._session.close()


class _Body:
    """The bytes received so far and their running SHA-256 (hashed as they arrive, not after the last byte)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._hash = hashlib.sha256()

    def add(self, piece: bytes) -> None:
        self.data += piece
        self._hash.update(piece)

    def clear(self) -> None:
        self.data.clear()
        self._hash = hashlib.sha256()

    def sha256(self) -> str:
        return self._hash.hexdigest()

    def __len__(self) -> int:
        return len(self.data)


class _ServerRefused(Exception):
    """The server answered with an error status: not retried."""


class _ServerBusy(Exception):
    """The server is busy or rate-limits this client: retried after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


async def _is_busy(response: aiohttp.ClientResponse) -> bool:
    """429, or 503 whose JSON error kind is ``busy`` (not ``store_unavailable``)."""
    if response.status == 429:
        return True
    try:
        body = await response.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        return False
    return isinstance(body, dict) and body.get("error") == "busy"


def _retry_after_s(response: aiohttp.ClientResponse) -> float:
    try:
        return max(float(response.headers.get("Retry-After", "0")), 0.0)
    except ValueError:
        return 0.0


async def _error_text(response: aiohttp.ClientResponse) -> str:
    try:
        body = await response.json(content_type=None)
        message = body.get("message") or body.get("error")
    except (ValueError, aiohttp.ClientError, AttributeError):
        message = (await response.text())[:200]
    return f"HTTP {response.status}: {message}"
