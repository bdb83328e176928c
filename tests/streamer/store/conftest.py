"""Fixtures of the store tests: a real redis-server, stores of both backends, a reference store in memory, a
tiny causal LM saved to a folder (the ``--model`` of ``kvcast store put``), and consistency checks."""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from kvcast.streamer.store import Manifest, NotFound, Store, StoreError, check_context_id, open_store
from kvcast.streamer.store.base import check_key, check_range
from tests.factories import save_tiny_model

REDIS_BINARY = "redis-server"

# ----------------------------------------------------------------------------------------------- redis


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throw-away redis-server on a loopback port (no persistence), stoppable and restartable."""

    def __init__(self, binary: str, port: int, workdir: Path) -> None:
        self.binary, self.port, self.workdir = binary, port, workdir
        self.proc: subprocess.Popen | None = None

    def url(self, prefix: str | None = None, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}" + (f"?prefix={prefix}" if prefix else "")

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        for _ in range(200):  # up to ~10 s; PING answers once the server accepts commands
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} on port {self.port}")
            try:
                if client.ping():
                    break
            except redis.exceptions.RedisError:
                time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


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


class MemoryStore(Store):
    """The reference: the `Store` semantics in a few dicts (what both backends must behave like)."""

    def __init__(self) -> None:
        self.url = "memory://"
        self.objects: dict[str, bytes] = {}
        self.manifest_json: dict[str, str] = {}

    def put_object(self, key, data):
        check_key(key)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise StoreError("object data must be bytes")
        self.objects.setdefault(key, bytes(data))

    def get_object(self, key, start=0, stop=None):
        check_key(key)
        check_range(start, stop)
        if key not in self.objects:
            raise NotFound(key)
        return self.objects[key][start:stop]

    def object_size(self, key):
        check_key(key)
        if key not in self.objects:
            raise NotFound(key)
        return len(self.objects[key])

    def has_object(self, key):
        return check_key(key) in self.objects

    def delete_object(self, key):
        self.objects.pop(check_key(key), None)

    def object_keys(self):
        return sorted(self.objects)

    def put_manifest(self, manifest):
        if not isinstance(manifest, Manifest):
            raise StoreError("expected a Manifest")
        check_context_id(manifest.context_id)
        if any(check_key(k) not in self.objects for k in manifest.keys()):
            raise StoreError("missing objects")
        self.manifest_json[manifest.context_id] = manifest.to_json()

    def get_manifest(self, context_id):
        check_context_id(context_id)
        if context_id not in self.manifest_json:
            raise NotFound(context_id)
        return Manifest.from_json(self.manifest_json[context_id])

    def delete_manifest(self, context_id):
        self.manifest_json.pop(check_context_id(context_id), None)

    def contexts(self):
        return sorted(self.manifest_json)


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

