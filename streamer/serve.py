"""`kvcast serve`: an HTTP server of a KV `Store`'s manifests and encoded chunks (aiohttp).

Endpoints (the contract the client link reads; every error is JSON ``{"error": KIND, "message": TEXT}``):

=========================================================  ==========================================================
``GET /healthz``                                           200 ``{"status": "ok"}``; the only route without the token
``GET /metrics``                                           Prometheus text exposition (this app's own registry)
``GET /v1/contexts``                                       200 ``{"contexts": [context_id, ...]}`` (sorted)
``GET /v1/contexts/{context_id}/manifest``                 200 the manifest JSON (`Manifest.to_json`)
``GET /v1/contexts/{context_id}/chunks/{index}/{level}``   200 the object's bytes (``application/octet-stream``),
                                                           ``Content-Length``, ``Accept-Ranges: bytes``,
                                                           ``ETag: "<sha256>"``, ``X-Kvcast-Sha256: <sha256>``;
                                                           ``Range: bytes=a-b | a- | -n`` -> 206 + ``Content-Range``
``POST /v1/pacing/reset``                                  200 ``{"status": "ok", "trace": NAME}``: the trace
                                                           restarts at t = 0; 404 when the server does not pace
=========================================================  ==========================================================

HEAD works on every GET route. Ranges: one range per request; an unsatisfiable or malformed ``bytes=`` range
is 416 (``Content-Range: bytes */SIZE``); several ranges (``bytes=0-1,5-6``) or another unit are ignored, so
the answer is 200 with the whole object (RFC 9110 lets a server ignore Range); an ``If-Range`` that is not the
object's ETag also gets the whole object.

Error kinds: ``bad_request`` (400; 405 for a method a route does not take), ``unauthorized`` (401, with
``WWW-Authenticate: Bearer``), ``not_found`` (404), ``range_not_satisfiable`` (416), ``too_large`` (413: any
request body), ``busy`` (503 + ``Retry-After``: ``max_streams`` chunk streams in flight), ``rate_limited``
(429 + ``Retry-After``: the client's address used up its token bucket), ``store_unavailable`` (503: a
`StoreError` other than `NotFound`, or an I/O error of the store), ``internal`` (500, a bug; logged).

Safety: the token is compared with `hmac.compare_digest` and never logged. Context ids and levels pass
`check_context_id` / `check_level` (no ``/``, no leading ``.``, no ``%``, ``\\``, NUL: a bad one is 400) and
the chunk index must be digits; an object is found only through the context's manifest and read from the
store by its key, so no part of a request ever names a file. Oversized request lines or headers are
refused by aiohttp's parser (400) before routing, so they reach neither the handlers nor the access log.

Pacing: with a `kvcast.netsim.pacing.TracePacer`, the manifest and chunk routes sleep one RTT before
answering and every piece of their bodies (`ServeLimits.piece_bytes`) waits for the shared trace, so all
streams together get the trace's bandwidth. Access log: one JSON line per request on the ``kvcast.serve``
logger (fields: `ACCESS_LOG_FIELDS`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import signal
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvcast.netsim.pacing import TracePacer
from kvcast.streamer.serve_config import (
    ACCESS_LOG_FIELDS,
    ACCESS_LOGGER,
    DEFAULT_HOST,
    DEFAULT_LIMITS,
    DEFAULT_PORT,
    ERROR_KINDS,
    MIN_TOKEN_CHARS,
    TOKEN_ENV,
    ServeLimits,
    check_token,
)
from kvcast.streamer.store import NotFound, Store, StoreError, check_context_id, check_level

__all__ = [
    "ACCESS_LOGGER", "ACCESS_LOG_FIELDS", "DEFAULT_HOST", "DEFAULT_LIMITS", "DEFAULT_PORT", "ERROR_KINDS",
    "MIN_TOKEN_CHARS", "TOKEN_ENV", "ServeLimits",
    "check_token", "make_app", "parse_range", "run_server", "serve",
]

_INDEX = re.compile(r"[0-9]{1,9}")
_RANGE_SPEC = re.compile(r"\s*([0-9]{0,19})\s*-\s*([0-9]{0,19})\s*")
_MAX_LOGGED_PATH = 512
_log = logging.getLogger(__name__)  # the server's own errors (not the access log: ACCESS_LOGGER)


# --------------------------------------------------------------------------------------------- ranges


class _Fail(Exception):
    """An error answer: status, kind, message, extra headers."""

    def __init__(self, kind: str, message: str, headers: dict[str, str] | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.headers = headers or {}
        self.status = status or ERROR_KINDS[kind]


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The byte range ``[start, stop)`` a ``Range`` header asks of a `size`-byte object; None for the whole
    object (no header, another unit, several ranges); `ValueError` if unsatisfiable or malformed.

    >>> parse_range("bytes=0-9", 100), parse_range("bytes=90-", 100), parse_range("bytes=-5", 100)
    ((0, 10), (90, 100), (95, 100))
    >>> parse_range("bytes=0-1,5-6", 100) is None
    True
    """
    if header is None:
        return None
    unit, sep, spec = header.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    if "," in spec:
        return None
    m = _RANGE_SPEC.fullmatch(spec)
    if m is None or (m[1] == "" and m[2] == ""):
        raise ValueError(f"malformed range {header[:64]!r}")
    if m[1] == "":
        suffix = int(m[2])
        if suffix == 0 or size == 0:
            raise ValueError(f"range {header[:64]!r} selects no byte of a {size}-byte object")
        return max(size - suffix, 0), size
    start = int(m[1])
    last = int(m[2]) if m[2] else size - 1
    if m[2] and last < start:
        raise ValueError(f"malformed range {header[:64]!r}: last byte before first")
    if start >= size:
        raise ValueError(f"range {header[:64]!r} starts past the end of a {size}-byte object")
    return start, min(last, size - 1) + 1


# --------------------------------------------------------------------------------------------- state


class _RateLimiter:
    """Token bucket per client address."""

    def __init__(self, rate: float, burst: int, max_clients: int, clock: Callable[[], float]) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_clients = max_clients
        self.clock = clock
        self.buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, time)

    def take(self, client: str) -> float:
        """0 if `client` may make a request now (one token taken), else the seconds until it may."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        tokens, then = self.buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens < 1.0:
            self.buckets[client] = (tokens, now)
            return (1.0 - tokens) / self.rate
        if client not in self.buckets and len(self.buckets) >= self.max_clients:
            self._prune(now)
        self.buckets[client] = (tokens - 1.0, now)
        return 0.0

    def _prune(self, now: float) -> None:
        full = [k for k, (tokens, then) in self.buckets.items() if tokens + (now - then) * self.rate >= self.burst]
        for k in full:
            del self.buckets[k]
        if len(self.buckets) >= self.max_clients:  # many active clients: forget the oldest half
            for k in sorted(self.buckets, key=lambda k: self.buckets[k][1])[: len(self.buckets) // 2]:
                del self.buckets[k]


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("kvcast_serve_requests", "Requests answered, by route and status.",
                                ["route", "status"], registry=self.registry)
        self.bytes_sent = Counter("kvcast_serve_bytes_sent", "Response body bytes sent.", registry=self.registry)
        self.latency = Histogram("kvcast_serve_request_duration_seconds",
                                 "Time from request to the response's last byte, by route.", ["route"],
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                                          10.0, 30.0, 60.0),
                                 registry=self.registry)
        self.errors = Counter("kvcast_serve_errors", "Error answers and aborted streams, by kind.", ["kind"],
                              registry=self.registry)
        self.streams = Gauge("kvcast_serve_inflight_streams", "Chunk streams in flight.", registry=self.registry)


class _State:
    def __init__(self, store: Store, token: str | None, pacer: TracePacer | None, limits: ServeLimits,
                 logger: logging.Logger) -> None:
        self.store = store
        self.token = None if token is None else check_token(token).encode()
        self.pacer = pacer
        self.limits = limits
        self.logger = logger
        self.metrics = _Metrics()
        self.limiter = _RateLimiter(limits.rate_per_s, limits.burst, limits.max_tracked_clients, time.monotonic)
        self.streams = 0
        self.executor: ThreadPoolExecutor | None = None

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking store call on the store threads."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


_STATE = web.AppKey("kvcast_serve_state", _State)
_INFO = web.RequestKey("kvcast_serve_info", dict)  # per request: the access log's fields


# --------------------------------------------------------------------------------------------- middlewares


def _error(kind: str, message: str, *, status: int | None = None, headers: dict[str, str] | None = None,
           request: web.Request | None = None) -> web.Response:
    if request is not None:
        request[_INFO]["error"] = kind
    return web.json_response({"error": kind, "message": message}, status=status or ERROR_KINDS[kind],
                             headers=headers)


def _route(request: web.Request) -> str:
    resource = getattr(getattr(request.match_info, "route", None), "resource", None)
    return resource.canonical if resource is not None else "unmatched"


def _http_exception(exc: web.HTTPException) -> tuple[str, str, dict[str, str]]:
    status = exc.status
    kind = {401: "unauthorized", 404: "not_found", 413: "too_large", 416: "range_not_satisfiable",
            429: "rate_limited"}.get(status, "bad_request" if status < 500 else "internal")
    headers = {"Allow": exc.headers["Allow"]} if status == 405 and "Allow" in exc.headers else {}
    return kind, exc.reason or "", headers


@web.middleware
async def _outer(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """Error answers as JSON, metrics, the access log."""
    state = request.app[_STATE]
    t0 = time.perf_counter()
    info: dict[str, Any] = {"bytes": 0, "context_id": None, "chunk": None, "level": None, "error": None,
                            "streamed": False}
    request[_INFO] = info
    status = 500
    try:
        try:
            response = await handler(request)
        except _Fail as f:
            response = _error(f.kind, f.message, status=f.status, headers=f.headers, request=request)
        except web.HTTPException as exc:
            kind, message, headers = _http_exception(exc)
            response = _error(kind, message, status=exc.status, headers=headers, request=request)
        except NotFound as exc:
            response = _error("not_found", str(exc), request=request)
        except (StoreError, OSError) as exc:
            response = _error("store_unavailable", f"the store failed: {exc}", request=request)
        except asyncio.CancelledError:  # the client went away (aiohttp cancels the handler)
            info["error"] = info["error"] or "disconnected"
            status = info.get("status", 499)  # 499: nginx's "client closed request", before any answer
            raise
        except Exception:
            _log.exception("internal error on %s %s", request.method, _route(request))
            response = _error("internal", "internal server error", request=request)
        status = response.status
        if not info["streamed"] and isinstance(response, web.Response) and request.method != "HEAD":
            info["bytes"] = len(response.body or b"") if isinstance(response.body, bytes) else 0
        return response
    finally:
        _record(request, state, info, status, time.perf_counter() - t0)


def _record(request: web.Request, state: _State, info: dict[str, Any], status: int, duration: float) -> None:
    m = state.metrics
    route = _route(request)
    m.requests.labels(route=route, status=str(status)).inc()
    m.latency.labels(route=route).observe(duration)
    if not info["streamed"]:  # streams count their bytes as they go
        m.bytes_sent.inc(info["bytes"])
    if info["error"]:
        m.errors.labels(kind=info["error"]).inc()
    if state.logger.isEnabledFor(logging.INFO):
        path = request.rel_url.raw_path
        entry = {"time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                 "remote": request.remote, "method": request.method,
                 "path": path if len(path) <= _MAX_LOGGED_PATH else path[:_MAX_LOGGED_PATH] + "...",
                 "status": status, "bytes": info["bytes"], "duration_s": round(duration, 6),
                 "context_id": info["context_id"], "chunk": info["chunk"], "level": info["level"],
                 "error": info["error"]}
        state.logger.info(json.dumps(entry, separators=(",", ":")))


def _authorized(header: str | None, token: bytes) -> bool:
    if not header:
        return False
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credentials.strip().encode("utf-8", "surrogateescape"), token)


@web.middleware
async def _guard(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """Rate limit, no bodies, the token (all routes but /healthz)."""
    state = request.app[_STATE]
    wait = state.limiter.take(request.remote or "")
    if wait > 0:
        raise _Fail("rate_limited", f"more than {state.limits.rate_per_s:g} requests/s from this address",
                    {"Retry-After": str(max(1, math.ceil(wait)))})
    if request.body_exists:
        raise _Fail("too_large", "request bodies are not accepted")
    if state.token is not None and getattr(request.match_info, "handler", None) is not _healthz:
        if not _authorized(request.headers.get("Authorization"), state.token):
            raise _Fail("unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": 'Bearer realm="kvcast"'})
    return await handler(request)


# --------------------------------------------------------------------------------------------- handlers


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[_STATE].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _contexts(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    return web.json_response({"contexts": list(await state.call(state.store.contexts))})


def _context_id(request: web.Request) -> str:
    raw = request.match_info["context_id"]
    try:
        context_id = check_context_id(raw)
    except StoreError:
        raise _Fail("bad_request", "bad context id: 1-128 characters of A-Z a-z 0-9 . _ -, "
                                   "starting with a letter or digit") from None
    request[_INFO]["context_id"] = context_id
    return context_id


async def _manifest(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    context_id = _context_id(request)
    if state.pacer is not None:
        await state.pacer.round_trip()
    manifest = await state.call(state.store.get_manifest, context_id)
    body = manifest.to_json().encode()
    if state.pacer is not None and request.method != "HEAD":
        await state.pacer.wait(len(body))
    return web.Response(body=body, content_type="application/json")


async def _chunk(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]
    info = request[_INFO]
    context_id = _context_id(request)
    raw_index, raw_level = request.match_info["index"], request.match_info["level"]
    if not _INDEX.fullmatch(raw_index):
        raise _Fail("bad_request", "the chunk index must be a non-negative integer")
    try:
        level = check_level(raw_level)
    except StoreError:
        raise _Fail("bad_request", "bad level name: 1-32 characters of a-z 0-9 -") from None
    info["chunk"], info["level"] = int(raw_index), level
    if state.streams >= state.limits.max_streams:
        raise _Fail("busy", f"{state.limits.max_streams} streams in flight; retry later",
                    {"Retry-After": str(state.limits.retry_after_s)})
    state.streams += 1
    state.metrics.streams.inc()
    try:
        return await _stream(request, state, info, context_id, int(raw_index), level)
    finally:
        state.streams -= 1
        state.metrics.streams.dec()


async def _stream(request: web.Request, state: _State, info: dict[str, Any], context_id: str, index: int,
                  level: str) -> web.StreamResponse:
    pacer = state.pacer
    if pacer is not None:
        await pacer.round_trip()
    manifest = await state.call(state.store.get_manifest, context_id)
    entry = manifest.object(index, level)  # NotFound -> 404
    size = entry.nbytes
    etag = f'"{entry.sha256}"'
    headers = {"Accept-Ranges": "bytes", "ETag": etag, "X-Kvcast-Sha256": entry.sha256,
               "Content-Type": "application/octet-stream"}
    span: tuple[int, int] | None = None
    if_range = request.headers.get("If-Range")
    if if_range is None or if_range.strip() == etag:
        try:
            span = parse_range(request.headers.get("Range"), size)
        except ValueError as exc:
            raise _Fail("range_not_satisfiable", str(exc), {"Content-Range": f"bytes */{size}"}) from None
    start, stop = span if span is not None else (0, size)
    response = web.StreamResponse(status=200 if span is None else 206, headers=headers)
    if span is not None:
        response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    response.content_length = stop - start
    piece, block = state.limits.piece_bytes, state.limits.read_bytes
    get = state.store.get_object

    def read_ahead(at: int) -> asyncio.Task[bytes]:
        return asyncio.ensure_future(state.call(get, entry.key, at, min(at + block, stop)))

    # the first block is read before the headers go out, so a missing object is a clean error answer
    data = await state.call(get, entry.key, start, min(start + block, stop)) if stop > start else b""
    info["streamed"] = True
    await response.prepare(request)
    info["status"] = response.status
    if request.method == "HEAD":
        return response
    pos = start
    ahead: asyncio.Task[bytes] | None = None
    try:
        while pos < stop:
            if len(data) != min(block, stop - pos):
                raise StoreError(f"object {entry.key} is shorter than its manifest says ({size} bytes)")
            after = pos + len(data)
            ahead = read_ahead(after) if after < stop else None  # the store reads while the network writes
            view = memoryview(data)
            for offset in range(0, len(view), piece):
                part = view[offset:offset + piece]
                if pacer is not None:
                    await pacer.wait(len(part))
                await response.write(part)
                info["bytes"] += len(part)
                state.metrics.bytes_sent.inc(len(part))
            pos = after
            if ahead is not None:
                data, ahead = await ahead, None
        await response.write_eof()
    except (StoreError, OSError) as exc:  # headers are out: abort the connection, the client sees a short body
        info["error"] = "disconnected" if isinstance(exc, ConnectionError) else "store_unavailable"
        if info["error"] == "store_unavailable":
            _log.warning("stream of %s chunk %d %s aborted: %s", context_id, index, level, exc)
        response.force_close()
        if request.transport is not None:
            request.transport.close()
    finally:
        if ahead is not None:  # abandoned: drop its result (or error) without a "never retrieved" warning
            ahead.cancel()
            ahead.add_done_callback(lambda t: t.cancelled() or t.exception())
    return response


async def _pacing_reset(request: web.Request) -> web.Response:
    pacer = request.app[_STATE].pacer
    if pacer is None:
        raise _Fail("not_found", "this server does not pace (start it with --trace)")
    pacer.reset()
    return web.json_response({"status": "ok", "trace": pacer.trace.name or pacer.trace.source})


# --------------------------------------------------------------------------------------------- app


def make_app(store: Store, *, token: str | None, pacer: TracePacer | None = None,
             limits: ServeLimits = DEFAULT_LIMITS, access_logger: logging.Logger | None = None) -> web.Application:
    """The aiohttp application serving `store`.

    `token`: the bearer token every route but ``/healthz`` requires (`check_token`); None serves without
    authentication (the CLI allows that only on loopback, with ``--no-auth``). `pacer`: pace the data routes
    by a trace (see the module docstring). `access_logger`: where the JSON access lines go (INFO level;
    default the ``kvcast.serve`` logger).
    """
    if token is not None:
        check_token(token)
    state = _State(store, token, pacer, limits, access_logger or logging.getLogger(ACCESS_LOGGER))
    app = web.Application(middlewares=[_outer, _guard], client_max_size=1024,
                          handler_args={"max_line_size": limits.max_line_size,
                                        "max_field_size": limits.max_field_size,
                                        "max_headers": limits.max_headers})
    app[_STATE] = state

    async def executor(app: web.Application) -> AsyncIterator[None]:
        state.executor = ThreadPoolExecutor(limits.store_threads, thread_name_prefix="kvcast-serve-store")
        yield
        state.executor.shutdown(wait=False, cancel_futures=True)

    app.cleanup_ctx.append(executor)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/v1/contexts", _contexts)
    app.router.add_get("/v1/contexts/{context_id}/manifest", _manifest)
    app.router.add_get("/v1/contexts/{context_id}/chunks/{index}/{level}", _chunk)
    app.router.add_post("/v1/pacing/reset", _pacing_reset)
    return app


async def serve(app: web.Application, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                on_ready: Callable[[str, int], None] | None = None, stop: asyncio.Event | None = None) -> None:
    """Serve `app` on ``host:port`` until `stop` is set (forever without one). `on_ready(host, port)` is called
    once listening (port 0 picks a free port, which it reports)."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=5.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        if on_ready is not None:
            bound = runner.addresses[0]
            on_ready(str(bound[0]), int(bound[1]))
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()


def run_server(store: Store, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None,
               pacer: TracePacer | None = None, limits: ServeLimits = DEFAULT_LIMITS,
               access_logger: logging.Logger | None = None,
               on_ready: Callable[[str, int], None] | None = None) -> None:
    """Serve `store` until SIGINT or SIGTERM (`make_app`'s arguments; `serve`'s `on_ready`)."""
    app = make_app(store, token=token, pacer=pacer, limits=limits, access_logger=access_logger)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
                pass
        await serve(app, host, port, on_ready=on_ready, stop=stop)

    asyncio.run(main())
