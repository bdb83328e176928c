"""`RedisStore`: the store in a Redis database (``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?QUERY]``).

Needs the `redis` package (``pip install 'kvcast[redis]'``). Keys, with the prefix ``kvcast`` (query
``?prefix=NAME`` for another; several stores can share a database)::

    kvcast:obj:<key>          an object's bytes (a string)
    kvcast:manifest:<id>      a context's manifest (`kvcast.streamer.store.Manifest.to_json`)
    kvcast:generation         a counter that every manifest write increments (garbage collection's guard)

Objects are written with ``SET NX`` (immutable: the first writer of a key wins); a manifest is written by a
Lua script, atomic on the server, that checks every object it names exists, stores the manifest and
increments the generation. Garbage collection finds the live keys, then deletes in batches by a script that
first checks the generation is unchanged (a manifest written meanwhile may name a candidate: then it finds
the live keys again), so it never removes an object a manifest names. Ranges are read with ``GETRANGE``,
listings use ``SCAN`` (never ``KEYS``). Query ``?timeout_s=SECONDS`` (default 5) bounds connecting and every
command. Any Redis failure raises `StoreError` naming the server.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from kvcast.streamer.store.base import (
    Manifest,
    NotFound,
    Store,
    StoreError,
    check_context_id,
    check_key,
    check_range,
    is_context_id,
    is_key,
    parse_stored_manifest,
)

__all__ = ["DEFAULT_PREFIX", "DEFAULT_TIMEOUT_S", "RedisStore"]

DEFAULT_PREFIX = "kvcast"
DEFAULT_TIMEOUT_S = 5.0
INSTALL_HINT = "pip install 'kvcast[redis]'"
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SCAN_COUNT = 1000
_DELETE_BATCH = 256
_GC_ATTEMPTS = 20
_MAX_MISSING_SHOWN = 3

# KEYS: manifest, generation, objects...; ARGV: the manifest JSON. Returns the missing object keys (none: stored).
_PUT_MANIFEST = """
local missing = {}
for i = 3, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    missing[#missing + 1] = KEYS[i]
    if #missing >= 16 then break end
  end
end
if #missing > 0 then return missing end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('INCR', KEYS[2])
return missing
"""

# KEYS: generation, objects...; ARGV: the generation the live keys were computed at. Returns the number deleted,
# or -1 when a manifest was written since.
_DELETE_IF_GENERATION = """
local current = redis.call('GET', KEYS[1]) or '0'
if current ~= ARGV[1] then return -1 end
if #KEYS < 2 then return 0 end
return redis.call('DEL', unpack(KEYS, 2))
"""


def _redis_module() -> Any:
    try:
        import redis
    except ImportError:
        raise StoreError(f"redis:// stores need the redis package: {INSTALL_HINT}") from None
    return redis


class RedisStore(Store):
    """Content-addressed objects and manifests in Redis (see the module docstring)."""

    def __init__(self, url: str) -> None:
        redis = _redis_module()
        self._exc = redis.exceptions
        parts = _parse(url)
        self.host, self.port, self.db = parts["host"], parts["port"], parts["db"]
        self.prefix, self.timeout_s = parts["prefix"], parts["timeout_s"]
        query = [f"prefix={self.prefix}"] if self.prefix != DEFAULT_PREFIX else []
        if self.timeout_s != DEFAULT_TIMEOUT_S:
            query.append(f"timeout_s={self.timeout_s:g}")
        self.url = f"redis://{_netloc(self.host)}:{self.port}/{self.db}" + ("?" + "&".join(query) if query else "")
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._client = redis.Redis(
            host=self.host, port=self.port, db=self.db, username=parts["username"], password=parts["password"],
            socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s, retry=Retry(NoBackoff(), 0),
            decode_responses=False)
        self._put_manifest = self._client.register_script(_PUT_MANIFEST)
        self._delete_if_generation = self._client.register_script(_DELETE_IF_GENERATION)
        with self._errors("connecting"):
            self._client.ping()

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r})"

    # -- keys (only from validated names) -------------------------------------------------------------------

    def _obj(self, key: str) -> str:
        return f"{self.prefix}:obj:{check_key(key)}"

    def _manifest(self, context_id: str) -> str:
        return f"{self.prefix}:manifest:{check_context_id(context_id)}"

    @property
    def _generation(self) -> str:
        return f"{self.prefix}:generation"

    # -- objects --------------------------------------------------------------------------------------------

    def put_object(self, key: str, data: bytes) -> None:
        name = self._obj(key)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise StoreError(f"object data must be bytes, got {type(data).__name__}")
        with self._errors(f"writing object {key}"):
            self._client.set(name, bytes(data), nx=True)

    def get_object(self, key: str, start: int = 0, stop: int | None = None) -> bytes:
        name = self._obj(key)
        check_range(start, stop)
        with self._errors(f"reading object {key}"):
            if start == 0 and stop is None:
                data = self._client.get(name)
                exists = data is not None
            else:
                pipe = self._client.pipeline(transaction=True)
                pipe.exists(name)
                if stop is None:
                    pipe.getrange(name, start, -1)
                elif stop > start:
                    pipe.getrange(name, start, stop - 1)
                exists, *rest = pipe.execute()
                data = rest[0] if rest else b""
        if not exists:
            raise NotFound(f"no object {key} in {self.url}")
        return bytes(data)

    def object_size(self, key: str) -> int:
        name = self._obj(key)
        with self._errors(f"reading object {key}"):
            pipe = self._client.pipeline(transaction=True)
            pipe.exists(name)
            pipe.strlen(name)
            exists, size = pipe.execute()
        if not exists:
            raise NotFound(f"no object {key} in {self.url}")
        return int(size)

    def has_object(self, key: str) -> bool:
        name = self._obj(key)
        with self._errors(f"reading object {key}"):
            return bool(self._client.exists(name))

    def delete_object(self, key: str) -> None:
        name = self._obj(key)
        with self._errors(f"removing object {key}"):
            self._client.delete(name)

    def object_keys(self) -> list[str]:
        head = f"{self.prefix}:obj:"
        return sorted(k for k in self._scan(head) if is_key(k))

    # -- manifests ------------------------------------------------------------------------------------------

    def put_manifest(self, manifest: Manifest) -> None:
        if not isinstance(manifest, Manifest):
            raise StoreError(f"expected a Manifest, got {type(manifest).__name__}")
        name = self._manifest(manifest.context_id)
        objects = [self._obj(k) for k in sorted(set(manifest.keys()))]
        data = manifest.to_json().encode()
        Manifest.from_json(data)  # never store what could not be read back
        with self._errors(f"writing the manifest of {manifest.context_id!r}"):
            missing = self._put_manifest(keys=[name, self._generation, *objects], args=[data])
        if missing:
            shown = [m.decode().rsplit(":", 1)[-1] for m in missing[:_MAX_MISSING_SHOWN]]
            raise StoreError(f"manifest of {manifest.context_id!r} names missing object(s) "
                             f"(e.g. {', '.join(shown)}); put the objects first")

    def get_manifest(self, context_id: str) -> Manifest:
        name = self._manifest(context_id)
        with self._errors(f"reading the manifest of {context_id!r}"):
            data = self._client.get(name)
        if data is None:
            raise NotFound(f"no context {context_id!r} in {self.url}")
        return parse_stored_manifest(data, context_id, self.url)

    def delete_manifest(self, context_id: str) -> None:
        name = self._manifest(context_id)
        with self._errors(f"removing the manifest of {context_id!r}"):
            self._client.delete(name)

    def contexts(self) -> list[str]:
        return sorted(c for c in self._scan(f"{self.prefix}:manifest:") if is_context_id(c))

    # -- garbage collection ---------------------------------------------------------------------------------

    def _collect(self, candidates: set[str]) -> int:
        remaining = set(candidates)
        freed = 0
        for _ in range(_GC_ATTEMPTS):
            with self._errors("reading the generation"):
                generation = (self._client.get(self._generation) or b"0").decode()
            remaining -= self._live_keys()
            batches = sorted(remaining)
            restart = False
            for i in range(0, len(batches), _DELETE_BATCH):
                batch = batches[i:i + _DELETE_BATCH]
                names = [self._obj(k) for k in batch]
                with self._errors("collecting garbage"):
                    pipe = self._client.pipeline(transaction=False)
                    for n in names:
                        pipe.strlen(n)
                    sizes = pipe.execute()
                    deleted = self._delete_if_generation(keys=[self._generation, *names], args=[generation])
                if deleted == -1:  # a manifest was written since the live keys were found: find them again
                    restart = True
                    break
                freed += sum(int(s) for s in sizes)
                remaining.difference_update(batch)
            if not restart:
                return freed
        raise StoreError(f"garbage collection in {self.url} gave up: manifests kept being written; try again")

    # -- helpers --------------------------------------------------------------------------------------------

    def _scan(self, head: str) -> Iterator[str]:
        with self._errors("listing keys"):
            names = list(self._client.scan_iter(match=head + "*", count=_SCAN_COUNT))
        for raw in names:
            text = raw.decode("utf-8", "replace")
            if text.startswith(head):
                yield text[len(head):]

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except StoreError:
            raise
        except (self._exc.ConnectionError, self._exc.TimeoutError, OSError) as exc:
            raise StoreError(f"redis at {_netloc(self.host)}:{self.port} (db {self.db}) is unreachable while "
                             f"{what}: {_one_line(exc)}") from None
        except self._exc.RedisError as exc:
            raise StoreError(f"redis at {_netloc(self.host)}:{self.port} (db {self.db}) failed while {what}: "
                             f"{_one_line(exc)}") from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()


def _parse(url: str) -> dict[str, Any]:
    """Host, port, db, credentials, prefix and timeout of a ``redis://`` URL; `StoreError` naming the problem."""
    if not isinstance(url, str) or not url.startswith("redis://"):
        raise StoreError(f"not a redis:// store URL: {url!r}")
    form = "redis://HOST:PORT/DB[?prefix=NAME&timeout_s=SECONDS]"
    try:
        parts = urlsplit(url)
        port = parts.port if parts.port is not None else 6379
    except ValueError as exc:
        raise StoreError(f"bad store URL {url!r} ({exc}): expected {form}") from None
    host = parts.hostname or "localhost"
    path = parts.path.strip("/")
    if parts.fragment or not (path == "" or path.isdigit()):
        raise StoreError(f"bad store URL {url!r}: the database must be a number; expected {form}")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise StoreError(f"bad store URL {url!r}: malformed query; expected {form}") from None
    unknown = sorted(set(query) - {"prefix", "timeout_s"})
    if unknown or any(len(v) != 1 for v in query.values()):
        raise StoreError(f"bad store URL {url!r}: unknown or repeated query parameter(s) "
                         f"{', '.join(unknown) or ', '.join(query)}; expected {form}")
    prefix = query.get("prefix", [DEFAULT_PREFIX])[0]
    if not _PREFIX.fullmatch(prefix):
        raise StoreError(f"bad store URL {url!r}: prefix {prefix!r} must be 1-64 characters of A-Z a-z 0-9 . _ -")
    try:
        timeout_s = float(query.get("timeout_s", [DEFAULT_TIMEOUT_S])[0])
    except ValueError:
        timeout_s = -1.0
    if not 0 < timeout_s <= 3600:
        raise StoreError(f"bad store URL {url!r}: timeout_s must be a number of seconds in (0, 3600]")
    return {"host": host, "port": port, "db": int(path or 0), "prefix": prefix, "timeout_s": timeout_s,
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None}


def _netloc(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
