"""DirStore and RedisStore behave like the reference store (and so like each other), round-trip objects and
ranges, write atomically, collect garbage safely, work from threads, and turn a Redis outage into StoreError."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from kvcast.streamer.store import (
    ChunkEntry,
    Manifest,
    NotFound,
    ObjectEntry,
    StoreError,
    StoreUsage,
    object_key,
    open_store,
)
from kvcast.streamer.store.dir import _host
from tests.factories import MemoryStore
from tests.streamer.store.support import snapshot, unique_prefix

KEYS = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(6)]
OP_KEYS = 4  # operations use the first four keys, so they often meet
CONTEXTS = ["c0", "c1", "c2"]
BLOBS = [b"", b"a", b"hello world", bytes(range(256)) * 3]


def _manifest(context_id: str, keys: list[str]) -> Manifest:
    chunks = tuple(ChunkEntry(i, i, 1, {"raw": ObjectEntry(k, 1, hashlib.sha256(k.encode()).hexdigest())})
                   for i, k in enumerate(keys))
    return Manifest(context_id=context_id, model={"name": "m"}, token_ids_sha256="0" * 64, tokens=len(keys),
                    chunk_tokens=1, levels=("raw",), chunks=chunks)


key_idx = st.integers(0, OP_KEYS - 1)
offsets = st.integers(0, 16) | st.integers(0, 800)


class SameBehaviour(RuleBasedStateMachine):
    """Random operations on the reference, a folder and Redis at once: every result (value or error type) and,
    after every step, the listings must agree; at the end, the whole observable state."""

    redis_url = None  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.TemporaryDirectory()
        self.stores = [MemoryStore(), open_store(f"dir://{self.folder.name}"), open_store(self.redis_url())]

    def _same(self, call):
        outcomes = []
        for store in self.stores:
            try:
                outcomes.append(call(store))
            except NotFound:
                outcomes.append("NotFound")
            except StoreError:
                outcomes.append("StoreError")
        assert outcomes[1] == outcomes[0], ("dir", outcomes)
        assert outcomes[2] == outcomes[0], ("redis", outcomes)
        return outcomes[0]

    @rule(k=key_idx, blob=st.sampled_from(BLOBS))
    def put_object(self, k, blob):
        self._same(lambda s: s.put_object(KEYS[k], blob))

    @rule(k=key_idx, a=offsets, b=st.none() | offsets)
    def get_object(self, k, a, b):
        start, stop = (a, b) if b is None else (min(a, b), max(a, b))
        self._same(lambda s: s.get_object(KEYS[k], start, stop))

    @rule(k=key_idx, a=offsets)
    def get_empty_range(self, k, a):
        self._same(lambda s: s.get_object(KEYS[k], a, a))

    @rule(k=key_idx)
    def get_whole_object(self, k):
        self._same(lambda s: (s.get_object(KEYS[k]), s.object_size(KEYS[k]), s.has_object(KEYS[k])))

    @rule(k=key_idx)
    def delete_object(self, k):
        self._same(lambda s: s.delete_object(KEYS[k]))

    @rule(c=st.sampled_from(CONTEXTS), ks=st.lists(key_idx, min_size=1, max_size=4))
    def put_manifest(self, c, ks):
        self._same(lambda s: s.put_manifest(_manifest(c, [KEYS[i] for i in ks])))

    @rule(c=st.sampled_from(CONTEXTS), name=st.sampled_from(["get_manifest", "delete_manifest", "delete_context"]))
    def manifest_call(self, c, name):
        self._same(lambda s: getattr(s, name)(c))

    @rule()
    def collect_garbage(self):
        self._same(lambda s: s.collect_garbage())

    @invariant()
    def listings_agree(self):
        self._same(lambda s: (s.contexts(), s.object_keys(), s.usage()))

    def teardown(self):
        try:
            states = [snapshot(s) for s in self.stores]
            assert states[1] == states[0] and states[2] == states[0]
        finally:
            for s in self.stores:
                s.close()
            self.folder.cleanup()


def test_backends_behave_like_the_reference(redis_server):
    """The same operations give the same results and the same state in memory, in a folder and in Redis."""
    SameBehaviour.redis_url = staticmethod(lambda: redis_server.url(unique_prefix()))
    run_state_machine_as_test(SameBehaviour, settings=settings(max_examples=40, stateful_step_count=30,
                                                               deadline=None))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=5000), ranges=st.lists(st.tuples(st.integers(0, 6000), st.integers(0, 6000)),
                                                        max_size=8))
def test_objects_and_ranges_round_trip(data, ranges, redis_server):
    key = hashlib.sha256(data).hexdigest()
    with tempfile.TemporaryDirectory() as folder:
        for url in (f"dir://{folder}", redis_server.url(unique_prefix())):
            store = open_store(url)
            assert not store.has_object(key)
            store.put_object(key, data)
            store.put_object(key, data + b"other")  # immutable: the first writer wins
            assert store.has_object(key) and store.object_size(key) == len(data)
            assert store.get_object(key) == data
            for a, b in ranges:
                start, stop = min(a, b), max(a, b)
                assert store.get_object(key, start, stop) == data[start:stop]
                assert store.get_object(key, start) == data[start:]
            store.close()


def test_garbage_collection_and_context_removal(any_store):
    shared, only_a, only_b, loose = KEYS[:4]
    for k in KEYS[:4]:
        any_store.put_object(k, b"12345")
    any_store.put_manifest(_manifest("a", [shared, only_a]))
    any_store.put_manifest(_manifest("b", [shared, only_b]))
    assert any_store.usage() == StoreUsage(contexts=2, objects=3, object_bytes=3, unreferenced_objects=1)
    assert any_store.collect_garbage() == 5 and not any_store.has_object(loose)
    assert any_store.delete_context("a") == 5  # only_a; shared stays for b
    assert sorted(any_store.object_keys()) == sorted([shared, only_b])
    with pytest.raises(NotFound):
        any_store.delete_context("a")
    assert any_store.delete_context("b") == 10 and any_store.object_keys() == []


def test_manifest_replacement_is_whole(any_store):
    for k in KEYS[:3]:
        any_store.put_object(k, b"x")
    any_store.put_manifest(_manifest("c", KEYS[:1]))
    with pytest.raises(StoreError, match="missing"):
        any_store.put_manifest(_manifest("c", [KEYS[0], KEYS[5]]))
    assert any_store.get_manifest("c") == _manifest("c", KEYS[:1])  # the failed put changed nothing
    any_store.put_manifest(_manifest("c", KEYS[:3]))
    assert any_store.get_manifest("c") == _manifest("c", KEYS[:3])


def test_threads_share_one_store(any_store):
    """Eight threads put overlapping objects and manifests and collect garbage at once: the store stays whole."""
    errors = []

    def work(t):
        try:
            for i in range(15):
                keys = [KEYS[(t + i + j) % len(KEYS)] for j in range(3)]
                for k in keys:
                    any_store.put_object(k, k.encode())
                try:
                    any_store.put_manifest(_manifest(f"t{t}", keys))
                except StoreError as exc:  # a collector removed an object first: allowed, and says so
                    assert "missing" in str(exc)
                if i % 5 == 4:
                    any_store.collect_garbage()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for c in any_store.contexts():
        for k in any_store.get_manifest(c).keys():
            assert any_store.get_object(k) == k.encode()


def test_collection_never_removes_what_a_concurrent_manifest_names(any_store, monkeypatch):
    """A manifest written while garbage collection runs keeps its objects (or fails, saying they are missing)."""
    any_store.put_object(KEYS[0], b"x")
    live_keys = type(any_store)._live_keys
    outcome = []

    def put_meanwhile():
        try:
            any_store.put_manifest(_manifest("late", [KEYS[0]]))
            outcome.append("stored")
        except StoreError as exc:
            outcome.append(str(exc))

    def live_then_put(self):
        live = live_keys(self)
        if not outcome and not getattr(self, "_raced", False):
            self._raced = True
            if any_store.url.startswith("redis://"):
                put_meanwhile()  # Redis: the collector finds a new generation and looks again
            else:  # a folder: the writer waits for the collector's lock
                writer = threading.Thread(target=put_meanwhile)
                writer.start()
                time.sleep(0.2)  # give it time to reach the lock (correct either way)
                self._writer = writer
        return live

    monkeypatch.setattr(type(any_store), "_live_keys", live_then_put)
    any_store.collect_garbage()
    if getattr(any_store, "_writer", None):
        any_store._writer.join()
    assert len(outcome) == 1
    if outcome[0] == "stored":
        assert any_store.get_object(KEYS[0]) == b"x"
    else:
        assert "missing" in outcome[0] and "late" not in any_store.contexts()


def test_dir_store_layout_and_temp_files(dir_store):
    key = KEYS[0]
    dir_store.put_object(key, b"payload")
    root = dir_store.root
    assert (root / "objects" / key[:2] / key).read_bytes() == b"payload"
    dir_store.put_manifest(_manifest("ctx", [key]))
    assert (root / "manifests" / "ctx.json").is_file()
    assert not dir_store.temp_files()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)  # reaped: no process has this pid now (unless reused, then it is kept)
    folder = root / "objects" / key[:2]
    names = {"dead": f".tmp-{_host()}-{dead_pid}-{'1' * 16}", "alive": f".tmp-{_host()}-{os.getpid()}-{'2' * 16}",
             "old": f".tmp-otherhost-1-{'3' * 16}", "new": f".tmp-otherhost-1-{'4' * 16}"}
    for name in names.values():
        (folder / name).write_bytes(b"partial")
    (root / "manifests" / names["dead"]).write_bytes(b"{partial")
    past = time.time() - 7200
    os.utime(folder / names["old"], (past, past))
    assert dir_store.object_keys() == [key] and dir_store.contexts() == ["ctx"]
    assert len(dir_store.temp_files()) == 5
    dir_store.collect_garbage()
    left = sorted(p.name for p in dir_store.temp_files())
    assert names["alive"] in left and names["new"] in left and names["old"] not in left
    assert dir_store.get_object(key) == b"payload"


def test_redis_down_mid_session_is_a_store_error(redis_server, tmp_path):
    """Stop the server under a live store: every call raises StoreError naming host and port; open_store and the
    CLI fail cleanly; after a restart the same store works again."""
    from typer.testing import CliRunner

    from kvcast.cli import app

    url = redis_server.url(unique_prefix())
    store = open_store(url)
    store.put_object(KEYS[0], b"x")
    redis_server.stop()
    try:
        where = f"127.0.0.1:{redis_server.port}"
        calls = [lambda: store.put_object(KEYS[1], b"y"), lambda: store.get_object(KEYS[0]),
                 lambda: store.get_object(KEYS[0], 0, 1), lambda: store.object_size(KEYS[0]),
                 lambda: store.has_object(KEYS[0]), lambda: store.delete_object(KEYS[0]), store.object_keys,
                 lambda: store.put_manifest(_manifest("c", KEYS[:1])), lambda: store.get_manifest("c"),
                 lambda: store.delete_manifest("c"), store.contexts, store.collect_garbage, store.usage]
        for call in calls:
            with pytest.raises(StoreError, match=where) as info:
                call()
            assert not isinstance(info.value, NotFound)
        with pytest.raises(StoreError, match="unreachable"):
            open_store(url)
        result = CliRunner().invoke(app, ["store", "ls", "--store", url])
        assert result.exit_code == 2 and result.stderr.strip().startswith("error:")
        assert len(result.stderr.strip().splitlines()) == 1 and where in result.stderr
    finally:
        redis_server.start()
    store.put_object(KEYS[1], b"y")  # reconnects (the restarted server has no data: no persistence)
    assert store.object_keys() == [KEYS[1]]
    store.close()


def test_key_layout_in_redis(redis_store):
    redis_store.put_object(KEYS[0], b"x")
    redis_store.put_manifest(_manifest("ctx", KEYS[:1]))
    p = redis_store.prefix
    names = sorted(k.decode() for k in redis_store._client.scan_iter(match=f"{p}:*"))
    assert names == [f"{p}:generation", f"{p}:manifest:ctx", f"{p}:obj:{KEYS[0]}"]
    other = open_store(redis_store.url.split("?")[0] + f"?prefix={unique_prefix()}")
    assert other.contexts() == [] and other.object_keys() == []  # prefixes separate stores
    other.close()


def test_object_key_depends_on_everything_that_determines_the_bytes():
    ids = [5, 6, 7, 8]
    base = object_key({"name": "m"}, ids, 0, 2, "raw")
    assert base == object_key({"name": "m"}, ids[:2] + [9, 9], 0, 2, "raw")  # tokens after the chunk: no effect
    assert len({base, object_key({"name": "n"}, ids, 0, 2, "raw"), object_key({"name": "m"}, [4, 6, 7], 0, 2, "raw"),
                object_key({"name": "m"}, ids, 1, 2, "raw"), object_key({"name": "m"}, ids, 0, 2, "int8"),
                object_key({"name": "m"}, ids, 0, 2, "raw", params={"context_end": 4})}) == 6
    assert object_key({"name": "m"}, ids, 0, 2, "raw", params={}) == base
    with pytest.raises(StoreError):
        object_key({"name": "m"}, ids, 2, 5, "raw")
