"""Names: context ids and object keys never become paths or foreign Redis keys; store URLs are checked."""

from __future__ import annotations

import hashlib

import pytest

from kvcast.streamer.store import (
    ChunkEntry,
    Manifest,
    ObjectEntry,
    StoreError,
    check_context_id,
    object_key,
    open_store,
    store_url,
)
from tests.streamer.store.support import raw_state

BAD_CONTEXT_IDS = ["../x", "..%2Fx", "/etc/passwd", "a/b", ".hidden", "", "a" * 200, "a\0b", "..", ".",
                   "a\\b", "x y", "-lead", "é", "a\nb", "a:b", "a*"]
BAD_KEYS = ["../" + "a" * 61, "A" * 64, "a" * 63, "a" * 65, "", "g" * 64, "a" * 62 + "/x", "a" * 63 + "\0",
            "..", "*"]


def _manifest(context_id: str, key: str) -> Manifest:
    entry = ObjectEntry(key, 1, hashlib.sha256(b"x").hexdigest())
    return Manifest(context_id=context_id, model={"name": "m"}, token_ids_sha256="0" * 64, tokens=1,
                    chunk_tokens=1, levels=("raw",), chunks=(ChunkEntry(0, 0, 1, {"raw": entry}),))


@pytest.mark.parametrize("bad", BAD_CONTEXT_IDS)
def test_bad_context_ids_are_rejected(bad):
    with pytest.raises(StoreError, match="bad context id"):
        check_context_id(bad)


def test_good_context_ids_pass():
    for good in ["wiki-0001", "a", "A.b_c-d", "9" * 128, "x..y"]:
        assert check_context_id(good) == good


def test_no_backend_builds_a_name_from_a_bad_id_or_key(any_store, tmp_path):
    """Every call naming a context or an object rejects bad names with StoreError, and nothing is written."""
    key = object_key({"name": "m"}, [1], 0, 1, "raw")
    any_store.put_object(key, b"x")
    before = raw_state(any_store.url)
    outside = sorted(p.name for p in tmp_path.iterdir())
    s = any_store
    for bad in BAD_CONTEXT_IDS:
        for call, arg in ((s.get_manifest, bad), (s.delete_manifest, bad), (s.delete_context, bad),
                          (s.put_manifest, _manifest(bad, key))):
            with pytest.raises(StoreError, match="bad context id"):
                call(arg)
    for bad in BAD_KEYS:
        for call, extra in ((s.put_object, (b"y",)), (s.get_object, ()), (s.get_object, (0, 1)),
                            (s.object_size, ()), (s.has_object, ()), (s.delete_object, ())):
            with pytest.raises(StoreError, match="bad object key"):
                call(bad, *extra)
        with pytest.raises(StoreError, match="bad object key"):
            s.put_manifest(_manifest("ok", bad))
    assert raw_state(any_store.url) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == outside


def test_bad_byte_ranges_are_rejected(any_store):
    key = object_key({"name": "m"}, [1], 0, 1, "raw")
    any_store.put_object(key, b"abc")
    for start, stop in [(-1, None), (2, 1), (0, -1), ("0", None), (0, 1.5), (True, None)]:
        with pytest.raises(StoreError, match="byte range"):
            any_store.get_object(key, start, stop)


def test_listings_ignore_foreign_names(dir_store):
    key = object_key({"name": "m"}, [1], 0, 1, "raw")
    dir_store.put_object(key, b"x")
    dir_store.put_manifest(_manifest("ok", key))
    root = dir_store.root
    (root / "manifests" / ".hidden.json").write_text("{}")
    (root / "manifests" / "notes.txt").write_text("x")
    (root / "objects" / key[:2] / key.upper()).write_text("x")
    (root / "objects" / "zz").mkdir()
    (root / "objects" / "zz" / ("f" * 64)).write_text("x")  # a key outside its fan-out folder
    (root / "objects" / key[:2] / f".tmp-host-1-{'0' * 16}").write_text("partial")
    assert dir_store.contexts() == ["ok"]
    assert dir_store.object_keys() == [key]


@pytest.mark.parametrize("url", ["ftp://host/x", "s3://bucket", "redis://127.0.0.1:notaport/0",
                                 "redis://127.0.0.1:6379/x", "redis://127.0.0.1:6379/0?prefix=a:b",
                                 "redis://127.0.0.1:6379/0?timeout_s=-1", "redis://127.0.0.1:6379/0?bogus=1",
                                 "redis://127.0.0.1:6379/0?prefix=a&prefix=b", "dir://", "dir://x?y=1"])
def test_bad_store_urls_are_rejected(url):
    with pytest.raises(StoreError):
        open_store(url)


def test_plain_paths_are_dir_urls(tmp_path):
    assert store_url(tmp_path / "s") == f"dir://{tmp_path / 's'}"
    store = open_store(tmp_path / "s")
    assert store.url == f"dir://{tmp_path / 's'}" and store.contexts() == [] and store.object_keys() == []
    assert not (tmp_path / "s").exists()  # opening and listing create nothing
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a folder"):
        open_store(tmp_path / "file")


def test_redis_urls_are_normalised(redis_server):
    store = open_store(redis_server.url() + "?prefix=p1&timeout_s=2.5")
    assert store.url == f"redis://127.0.0.1:{redis_server.port}/0?prefix=p1&timeout_s=2.5"
    assert (store.prefix, store.timeout_s, store.db) == ("p1", 2.5, 0)
    store.close()


def test_missing_redis_package_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_redis(name, *args, **kwargs):
        if name == "redis" or name.startswith("redis."):
            raise ImportError("No module named 'redis'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_redis)
    with pytest.raises(StoreError, match=r"pip install 'kvcast\[redis\]'"):
        open_store("redis://127.0.0.1:1/0")
