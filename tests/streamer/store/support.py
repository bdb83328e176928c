"""Helpers of the tests in tests/streamer/store/ (plain code; the fixtures are in conftest.py)."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

from kvcast.streamer.store import Store
from tests.factories import (
    RedisServer,
)


def unique_prefix() -> str:
    return "t" + uuid.uuid4().hex[:16]


def backend_url(kind: str, tmp_path: Path, redis_server: RedisServer | None) -> str:
    """A fresh, empty store URL of `kind` (``dir`` or ``redis``)."""
    if kind == "dir":
        folder = tmp_path / f"store-{uuid.uuid4().hex[:8]}"
        return f"dir://{folder}"
    assert redis_server is not None
    return redis_server.url(unique_prefix())


def snapshot(store: Store) -> dict:
    """Everything observable through the `Store` interface."""
    return {"objects": {k: store.get_object(k) for k in store.object_keys()},
            "manifests": {c: store.get_manifest(c) for c in store.contexts()}}


def raw_state(url: str) -> dict:
    """Everything in the backend itself, temp files and foreign keys included (to show a store unchanged)."""
    if url.startswith("dir://"):
        root = Path(url[len("dir://"):])
        if not root.exists():
            return {}
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    from urllib.parse import parse_qs, urlsplit

    import redis

    parts = urlsplit(url)
    prefix = parse_qs(parts.query).get("prefix", ["kvcast"])[0]
    client = redis.Redis(host=parts.hostname, port=parts.port, db=int(parts.path.strip("/") or 0))
    try:
        return {k: client.get(k) for k in sorted(client.scan_iter(match=f"{prefix}:*"))}
    finally:
        client.close()


def assert_consistent(store: Store, verified: set[str] | None = None) -> None:
    """Every listed context's manifest names only stored objects whose bytes match their size and SHA-256;
    every stored object, named or not, is a whole codec object (`kvcast.codec.inspect` checks its CRCs);
    `verified` caches the keys already inspected (objects are immutable)."""
    from kvcast import codec

    verified = set() if verified is None else verified
    keys = store.object_keys()
    assert keys == sorted(set(keys)) and all(len(k) == 64 for k in keys)
    for context in store.contexts():
        manifest = store.get_manifest(context)
        for key_entry in (e for c in manifest.chunks for e in c.objects.values()):
            data = store.get_object(key_entry.key)
            assert len(data) == key_entry.nbytes, (context, key_entry.key)
            assert hashlib.sha256(data).hexdigest() == key_entry.sha256, (context, key_entry.key)
            verified.add(key_entry.key)
    for key in keys:
        if key not in verified:
            codec.inspect(store.get_object(key))
            verified.add(key)
