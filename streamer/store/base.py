"""The `Store` interface: encoded KV chunks and a manifest per context, addressed by content.

A context is stored as one object per (chunk, level) and one manifest. Objects are immutable and
content-addressed (`object_key`): the key hashes what determines the bytes (the model's fingerprint, the token
ids up to the chunk's end, the chunk's token range and the level), so storing the same context twice writes
nothing new and two contexts sharing a prefix share its objects. The manifest is written last and is the
commit point: a context is listed and served only once its manifest exists, and every backend writes each
object and manifest atomically, so an interrupted ``kvcast store put`` never leaves a partial object under a
key or a manifest naming a missing object.

Backends (`open_store`): ``dir://PATH`` (a folder, the default: a plain path means ``dir://PATH``) and
``redis://HOST:PORT/DB`` (a shared store; needs ``kvcast[redis]``).

>>> from kvcast.streamer.store import check_context_id, object_key
>>> check_context_id("wiki-0001")
'wiki-0001'
>>> len(object_key({"name": "m", "layers": 2}, [1, 2, 3], 0, 3, "int8"))
64
"""

from __future__ import annotations

import abc
import hashlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "MANIFEST_FORMAT", "ChunkEntry", "Manifest", "NotFound", "ObjectEntry", "Store", "StoreError", "StoreUsage",
    "check_context_id", "check_key", "check_level", "check_range", "is_context_id", "is_key", "object_key",
    "token_ids_digest",
]

MANIFEST_FORMAT = "kvcast-manifest/1"
KEY_FORMAT = "kvcast-object/1"
_CONTEXT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_LEVEL = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_KEY = re.compile(r"[0-9a-f]{64}")
_SHA256 = _KEY


class StoreError(Exception):
    """Any store failure: bad names, missing or corrupt objects and manifests, an unreachable backend."""


class NotFound(StoreError):
    """The context, manifest or object does not exist."""


def check_context_id(context_id: str) -> str:
    """`context_id` if it is 1-128 characters of ``A-Z a-z 0-9 . _ -`` starting with a letter or digit (so never a
    path: no ``/``, no leading ``.``); `StoreError` otherwise."""
    if not isinstance(context_id, str) or not _CONTEXT_ID.fullmatch(context_id):
        raise StoreError(f"bad context id {context_id!r}: 1-128 characters of A-Z a-z 0-9 . _ -, "
                         "starting with a letter or digit")
    return context_id


def check_level(level: str) -> str:
    """`level` if it is a level name's shape (``a-z 0-9 -``, at most 32); `StoreError` otherwise."""
    if not isinstance(level, str) or not _LEVEL.fullmatch(level):
        raise StoreError(f"bad level name {level!r}: 1-32 characters of a-z 0-9 -")
    return level


def check_key(key: str) -> str:
    """`key` if it is an object key's shape (64 lowercase hex digits); `StoreError` otherwise."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise StoreError(f"bad object key {key!r}: 64 hex digits")
    return key


def is_context_id(name: str) -> bool:
    """Whether `name` is a valid context id (for listings that skip foreign names without raising)."""
    return isinstance(name, str) and _CONTEXT_ID.fullmatch(name) is not None


def is_key(name: str) -> bool:
    """Whether `name` is an object key's shape (for listings that skip temp files and foreign names)."""
    return isinstance(name, str) and _KEY.fullmatch(name) is not None


def check_range(start: int, stop: int | None) -> None:
    """`StoreError` unless ``[start, stop)`` is a byte range of the `Store.get_object` form."""
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise StoreError(f"bad byte range start {start!r}: a non-negative int")
    if stop is not None and (isinstance(stop, bool) or not isinstance(stop, int) or stop < start):
        raise StoreError(f"bad byte range stop {stop!r}: None or an int >= start ({start})")


def token_ids_digest(token_ids: Sequence[int]) -> str:
    """SHA-256 of the token ids as little-endian int64s."""
    h = hashlib.sha256()
    for t in token_ids:
        h.update(int(t).to_bytes(8, "little", signed=True))
    return h.hexdigest()


def object_key(model: Mapping[str, Any], token_ids: Sequence[int], start: int, stop: int, level: str, *,
               params: Mapping[str, Any] | None = None) -> str:
    """The content address of chunk ``[start, stop)`` at `level`: SHA-256 over the model's fingerprint (its
    header dict), the token ids ``[0, stop)`` (a chunk's KV depends on its whole prefix), the range and the level.

    `params` (JSON-able) adds whatever else determines the bytes, e.g. a ``kvcast-*`` level's ``context_end``
    and sensitivity table; keys without `params` are unchanged by it."""
    if not (0 <= start < stop <= len(token_ids)):
        raise StoreError(f"chunk range [{start}, {stop}) is outside the {len(token_ids)} tokens")
    doc = {"format": KEY_FORMAT, "model": dict(model), "prefix": token_ids_digest(token_ids[:stop]),
           "start": int(start), "stop": int(stop), "level": check_level(level)}
    if params:
        doc["params"] = dict(params)
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class ObjectEntry:
    """One stored object of a chunk."""

    key: str
    nbytes: int
    sha256: str
    """SHA-256 of the object's bytes (verified by readers before decoding)."""
    quality: dict[str, float] | None = None
    """Measured quality of this level on this chunk where known (e.g. ``kl_per_token``, ``top1_agreement``)."""


@dataclass(frozen=True)
class ChunkEntry:
    """One chunk of a context: its token range and its objects by level."""

    index: int
    start_token: int
    tokens: int
    objects: Mapping[str, ObjectEntry]


@dataclass(frozen=True)
class Manifest:
    """What a stored context holds. JSON on the wire and in the store (`to_json`, `from_json`)."""

    context_id: str
    model: Mapping[str, Any]
    """The model's fingerprint (`kvcast.codec.ModelFingerprint.to_dict()`)."""
    token_ids_sha256: str
    tokens: int
    chunk_tokens: int
    levels: tuple[str, ...]
    chunks: tuple[ChunkEntry, ...]
    created_s: float = 0.0
    """Unix time of the ``put``."""
    text_sha256: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def keys(self) -> Iterator[str]:
        """Every object key the manifest names."""
        for chunk in self.chunks:
            for entry in chunk.objects.values():
                yield entry.key

    @property
    def nbytes(self) -> int:
        """Bytes of all the context's objects."""
        return sum(e.nbytes for c in self.chunks for e in c.objects.values())

    def object(self, index: int, level: str) -> ObjectEntry:
        """The object of chunk `index` at `level`; `NotFound` if the manifest has none."""
        if not 0 <= index < len(self.chunks):
            raise NotFound(f"context {self.context_id!r} has no chunk {index} (it has {len(self.chunks)})")
        try:
            return self.chunks[index].objects[level]
        except KeyError:
            raise NotFound(f"context {self.context_id!r} has no object for chunk {index} at level {level!r} "
                           f"(levels: {', '.join(self.chunks[index].objects)})") from None

    def to_json(self) -> str:
        doc = {"format": MANIFEST_FORMAT, **asdict(self)}
        doc["levels"] = list(self.levels)
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and check a manifest; `StoreError` naming the problem if it is malformed."""
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
                raise StoreError(f"not a {MANIFEST_FORMAT} manifest")
            chunks = []
            position = 0
            for i, c in enumerate(_list(doc["chunks"], "chunks")):
                objects = {check_level(lv): _object_entry(o) for lv, o in _dict(c["objects"], "objects").items()}
                if _int(c["index"]) != i:
                    raise StoreError(f"malformed manifest: chunk {i} has index {c['index']}")
                start, tokens = _int(c["start_token"]), _int(c["tokens"])
                if start != position or tokens < 1:
                    raise StoreError(f"malformed manifest: chunk {i} covers [{start}, {start + tokens}); "
                                     f"expected a non-empty range from token {position}")
                position += tokens
                chunks.append(ChunkEntry(i, start, tokens, objects))
            text_sha256 = doc.get("text_sha256")
            manifest = cls(context_id=check_context_id(doc["context_id"]), model=_dict(doc["model"], "model"),
                           token_ids_sha256=_sha256(doc["token_ids_sha256"]), tokens=_int(doc["tokens"]),
                           chunk_tokens=_int(doc["chunk_tokens"]),
                           levels=tuple(check_level(lv) for lv in _list(doc["levels"], "levels")),
                           chunks=tuple(chunks), created_s=float(doc.get("created_s", 0.0)),
                           text_sha256=None if text_sha256 is None else _sha256(text_sha256),
                           meta=_dict(doc.get("meta") or {}, "meta"))
        except StoreError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
            raise StoreError(f"malformed manifest: {type(exc).__name__}: {exc}") from None
        if sum(c.tokens for c in manifest.chunks) != manifest.tokens:
            raise StoreError("malformed manifest: chunk tokens do not add up to the context's tokens")
        if manifest.chunk_tokens < 1 or len(set(manifest.levels)) != len(manifest.levels):
            raise StoreError("malformed manifest: chunk_tokens must be >= 1 and levels distinct")
        for chunk in manifest.chunks:
            if not set(chunk.objects) <= set(manifest.levels):
                raise StoreError(f"malformed manifest: chunk {chunk.index} has levels "
                                 f"{sorted(set(chunk.objects) - set(manifest.levels))} outside its levels")
        return manifest


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a non-negative int, got {value!r}")
    return value


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{what}: expected an object, got {type(value).__name__}")
    return dict(value)


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"{what}: expected a list, got {type(value).__name__}")
    return value


def _sha256(value: Any) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise ValueError(f"expected a SHA-256 (64 hex digits), got {value!r}")
    return value


def _object_entry(doc: Any) -> ObjectEntry:
    doc = _dict(doc, "object")
    quality = doc.get("quality")
    if quality is not None:
        quality = {str(k): float(v) for k, v in _dict(quality, "quality").items()}
    return ObjectEntry(check_key(doc["key"]), _int(doc["nbytes"]), _sha256(doc["sha256"]), quality)


def parse_stored_manifest(data: str | bytes, context_id: str, url: str) -> Manifest:
    """The manifest a backend read for `context_id`: parsed, checked, and holding that context (`StoreError`
    naming the store otherwise)."""
    try:
        manifest = Manifest.from_json(data)
    except StoreError as exc:
        raise StoreError(f"context {context_id!r} in {url}: {exc}") from None
    if manifest.context_id != context_id:
        raise StoreError(f"the manifest of {context_id!r} in {url} holds context {manifest.context_id!r}")
    return manifest


@dataclass(frozen=True)
class StoreUsage:
    """Size accounting of a store."""

    contexts: int
    objects: int
    """Distinct objects named by manifests."""
    object_bytes: int
    unreferenced_objects: int = 0
    """Objects no manifest names (left by an interrupted put; removed by `Store.collect_garbage`)."""


class Store(abc.ABC):
    """Where encoded chunks and manifests live. One instance may be used from several threads."""

    url: str
    """The store's URL (``dir:///abs/path`` or ``redis://host:port/db``)."""

    # -- objects (immutable, content-addressed) -----------------------------------------------------------
    @abc.abstractmethod
    def put_object(self, key: str, data: bytes) -> None:
        """Store `data` under `key` atomically (readers see all of it or nothing); no-op if present."""

    @abc.abstractmethod
    def get_object(self, key: str, start: int = 0, stop: int | None = None) -> bytes:
        """Bytes ``[start, stop)`` of the object (all of it by default); `NotFound` if absent."""

    @abc.abstractmethod
    def object_size(self, key: str) -> int:
        """The object's size in bytes; `NotFound` if absent."""

    @abc.abstractmethod
    def has_object(self, key: str) -> bool: ...

    @abc.abstractmethod
    def delete_object(self, key: str) -> None:
        """Remove the object if present."""

    @abc.abstractmethod
    def object_keys(self) -> list[str]:
        """Every stored object key."""

    # -- manifests (the commit point of a context) --------------------------------------------------------
    @abc.abstractmethod
    def put_manifest(self, manifest: Manifest) -> None:
        """Store the manifest atomically, replacing any earlier one of the context. Every object it names
        must be stored already (`StoreError` otherwise)."""

    @abc.abstractmethod
    def get_manifest(self, context_id: str) -> Manifest:
        """The context's manifest; `NotFound` if there is none."""

    @abc.abstractmethod
    def delete_manifest(self, context_id: str) -> None:
        """Remove the context's manifest if present (its objects stay until `collect_garbage`)."""

    @abc.abstractmethod
    def contexts(self) -> list[str]:
        """Ids of the contexts with a manifest, sorted."""

    # -- derived operations -------------------------------------------------------------------------------
    def delete_context(self, context_id: str) -> int:
        """Remove the context's manifest, then the objects no other manifest names; returns bytes freed."""
        manifest = self.get_manifest(context_id)
        self.delete_manifest(context_id)
        return self._collect(set(manifest.keys()))

    def collect_garbage(self) -> int:
        """Remove every object no manifest names (an interrupted put's leftovers); returns bytes freed."""
        return self._collect(set(self.object_keys()))

    def _live_keys(self) -> set[str]:
        """Keys named by any manifest (`StoreError` if a manifest is malformed: nothing can be collected then)."""
        live: set[str] = set()
        for context in self.contexts():
            try:
                live.update(self.get_manifest(context).keys())
            except NotFound:  # removed meanwhile
                continue
        return live

    def _collect(self, candidates: set[str]) -> int:
        live = self._live_keys()
        freed = 0
        for key in sorted(candidates - live):
            try:
                freed += self.object_size(key)
            except NotFound:
                continue
            self.delete_object(key)
        return freed

    def manifests(self) -> list[Manifest]:
        """The manifests of `contexts` (skipping any removed meanwhile); `StoreError` if one is malformed."""
        found = []
        for context in self.contexts():
            try:
                found.append(self.get_manifest(context))
            except NotFound:
                continue
        return found

    def usage(self) -> StoreUsage:
        manifests = self.manifests()
        named = {e.key: e.nbytes for m in manifests for c in m.chunks for e in c.objects.values()}
        stored = set(self.object_keys())
        return StoreUsage(contexts=len(manifests), objects=len(named), object_bytes=sum(named.values()),
                          unreferenced_objects=len(stored - set(named)))

    def close(self) -> None:  # noqa: B027 (optional hook: a folder holds nothing)
        """Release connections (a no-op for folders)."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
