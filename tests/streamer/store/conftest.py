"""Fixtures of the store tests: a real redis-server, stores of both backends, a reference store in memory, a
tiny causal LM saved to a folder (the ``--model`` of ``kvcast store put``), and consistency checks."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from pathlib import Path

import pytest

from kvcast.streamer.store import Store, open_store
from tests.factories import (  # noqa: F401 (MemoryStore, RedisServer: for the tests)
    REDIS_BINARY,
    MemoryStore,
    RedisServer,
    free_port,
    save_tiny_model,
)

# ----------------------------------------------------------------------------------------------- redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> RedisServer:
    """A real redis-server for the session (skips only when the binary is missing)."""
    pytest.importorskip("redis", reason="the redis package (kvcast[redis]) is not installed")
    binary = shutil.which(REDIS_BINARY)
    if binary is None:
        pytest.skip(f"{REDIS_BINARY} not found on PATH (apt-get install redis-server): Redis store tests skipped")
    server = RedisServer(binary, free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def unique_prefix() -> str:
    return "t" + uuid.uuid4().hex[:16]


@pytest.fixture
def redis_store(redis_server) -> Store:
    """A `RedisStore` under a prefix of its own."""
    store = open_store(redis_server.url(unique_prefix()))
    yield store
    store.close()


@pytest.fixture
def dir_store(tmp_path) -> Store:
    store = open_store(tmp_path / "store")
    yield store
    store.close()


@pytest.fixture(params=["dir", "redis"])
def any_store(request) -> Store:
    """Each backend in turn."""
    return request.getfixturevalue(f"{request.param}_store")


def backend_url(kind: str, tmp_path: Path, redis_server: RedisServer | None) -> str:
    """A fresh, empty store URL of `kind` (``dir`` or ``redis``)."""
    if kind == "dir":
        folder = tmp_path / f"store-{uuid.uuid4().hex[:8]}"
        return f"dir://{folder}"
    assert redis_server is not None
    return redis_server.url(unique_prefix())


# ----------------------------------------------------------------------------------------------- reference


# ----------------------------------------------------------------------------------------------- checks


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


# ----------------------------------------------------------------------------------------------- tiny model

@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The folder of the tiny model (``--model DIR``)."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")  # a Llama (tests.factories)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """The tiny model loaded (`kvcast.codec.model.load_model`), once per test process."""
    from kvcast.codec.model import load_model

    return load_model(tiny_model_dir, progress=False)

