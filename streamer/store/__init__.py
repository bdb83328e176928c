"""KV stores: the `Store` interface (`base`), a lazy registry of backends and `open_store(url)`.

Backends by URL scheme, imported only when used (like the policy table): ``dir://PATH`` (`dir.DirStore`,
embedded; a plain path means ``dir://PATH``) and ``redis://HOST:PORT/DB`` (`redis.RedisStore`, needs
``pip install 'kvcast[redis]'``). A third-party backend registers ``scheme = "module:Class"`` under the
``kvcast.stores`` entry-point group; the class takes the URL.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from pathlib import Path

from kvcast.streamer.store.base import (
    MANIFEST_FORMAT,
    ChunkEntry,
    Manifest,
    NotFound,
    ObjectEntry,
    Store,
    StoreError,
    StoreUsage,
    check_context_id,
    check_level,
    object_key,
    token_ids_digest,
)

__all__ = [
    "BUILTIN_BACKENDS", "MANIFEST_FORMAT", "ChunkEntry", "Manifest", "NotFound", "ObjectEntry", "Store",
    "StoreError", "StoreUsage", "check_context_id", "check_level", "object_key", "open_store", "store_url",
    "token_ids_digest",
]

BUILTIN_BACKENDS = {
    "dir": "kvcast.streamer.store.dir:DirStore",
    "redis": "kvcast.streamer.store.redis:RedisStore",
}
ENTRY_POINT_GROUP = "kvcast.stores"


def store_url(spec: str | Path) -> str:
    """A store URL from a URL or a plain path (``dir://`` + its absolute path)."""
    text = str(spec)
    if "://" in text:
        return text
    if not text:
        raise StoreError("empty store location: give a folder or a URL (dir://PATH, redis://HOST:PORT/DB)")
    return "dir://" + str(Path(text).expanduser().resolve())


def open_store(spec: str | Path) -> Store:
    """Open the store at `spec` (a URL or a plain folder path)."""
    url = store_url(spec)
    scheme = url.split("://", 1)[0]
    target = BUILTIN_BACKENDS.get(scheme)
    if target is None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == scheme:
                return ep.load()(url)
        known = sorted({*BUILTIN_BACKENDS, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})
        raise StoreError(f"unknown store scheme {scheme!r} in {url!r}; known: {', '.join(known)}")
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(url)
