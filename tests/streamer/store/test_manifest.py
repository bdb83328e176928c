"""Manifests: JSON round trip (alone and through each backend); malformed manifests are rejected."""

from __future__ import annotations

import hashlib
import json
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcast.streamer.store import (
    ChunkEntry,
    Manifest,
    ObjectEntry,
    StoreError,
    object_key,
    open_store,
    token_ids_digest,
)
from tests.streamer.store.support import unique_prefix

LEVELS = ["raw", "int8", "cachegen-2", "kvcast-3"]
ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
sha = st.binary(min_size=1, max_size=8).map(lambda b: hashlib.sha256(b).hexdigest())
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.text(max_size=8))


@st.composite
def manifests(draw) -> Manifest:
    levels = tuple(draw(st.lists(st.sampled_from(LEVELS), min_size=1, unique=True)))
    sizes = draw(st.lists(st.integers(1, 50), min_size=1, max_size=5))
    tokens = [draw(st.integers(0, 255)) for _ in range(sum(sizes))]
    chunks, start = [], 0
    for i, n in enumerate(sizes):
        objects = {}
        for level in draw(st.lists(st.sampled_from(levels), min_size=1, unique=True)):
            quality = draw(st.none() | st.dictionaries(st.sampled_from(["kl_per_token", "top1_agreement"]),
                                                       st.floats(0, 1), max_size=2))
            objects[level] = ObjectEntry(object_key({"name": "m"}, tokens, start, start + n, level),
                                         draw(st.integers(0, 10**9)), draw(sha), quality)
        chunks.append(ChunkEntry(i, start, n, objects))
        start += n
    return Manifest(context_id=draw(ids), model={"name": draw(st.text(max_size=10)), "layers": 2, "rope": None},
                    token_ids_sha256=token_ids_digest(tokens), tokens=start, chunk_tokens=max(sizes),
                    levels=levels, chunks=tuple(chunks), created_s=draw(st.floats(0, 2e9)),
                    text_sha256=draw(st.none() | sha),
                    meta=draw(st.dictionaries(st.text(max_size=5), json_scalars, max_size=3)))


@settings(max_examples=60, deadline=None)
@given(manifests())
def test_manifest_json_round_trip(manifest):
    text = manifest.to_json()
    assert Manifest.from_json(text) == manifest
    assert Manifest.from_json(text.encode()).to_json() == text
    assert sorted(manifest.keys()) == sorted(e.key for c in manifest.chunks for e in c.objects.values())


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(manifest=manifests())
def test_manifest_round_trip_through_both_backends(manifest, redis_server):
    with tempfile.TemporaryDirectory() as folder:
        for url in (f"dir://{folder}", redis_server.url(unique_prefix())):
            store = open_store(url)
            with pytest.raises(StoreError, match="missing object"):
                store.put_manifest(manifest)
            assert store.contexts() == []
            for key in manifest.keys():
                store.put_object(key, b"x")
            store.put_manifest(manifest)
            assert store.contexts() == [manifest.context_id]
            assert store.get_manifest(manifest.context_id) == manifest
            store.close()


def _valid_doc() -> dict:
    key = object_key({"name": "m"}, [1, 2, 3], 0, 2, "raw")
    key2 = object_key({"name": "m"}, [1, 2, 3], 2, 3, "raw")
    m = Manifest(context_id="c1", model={"name": "m"}, token_ids_sha256=token_ids_digest([1, 2, 3]), tokens=3,
                 chunk_tokens=2, levels=("raw",),
                 chunks=(ChunkEntry(0, 0, 2, {"raw": ObjectEntry(key, 5, "a" * 64)}),
                         ChunkEntry(1, 2, 1, {"raw": ObjectEntry(key2, 4, "b" * 64)})))
    return json.loads(m.to_json())


def _mutate(path: str, value=..., delete=False):
    def apply(doc):
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if delete:
            del node[last]
        else:
            node[int(last) if isinstance(node, list) else last] = value
        return doc
    return apply


MALFORMED = {
    "format": _mutate("format", "kvcast-manifest/0"),
    "no context_id": _mutate("context_id", delete=True),
    "traversal id": _mutate("context_id", "../etc"),
    "no chunks": _mutate("chunks", delete=True),
    "chunks not a list": _mutate("chunks", {"0": 1}),
    "chunk index": _mutate("chunks.1.index", 5),
    "gap between chunks": _mutate("chunks.1.start_token", 3),
    "empty chunk": _mutate("chunks.1.tokens", 0),
    "tokens do not add up": _mutate("tokens", 4),
    "bool as int": _mutate("tokens", True),
    "negative nbytes": _mutate("chunks.0.objects.raw.nbytes", -1),
    "string nbytes": _mutate("chunks.0.objects.raw.nbytes", "5"),
    "bad key": _mutate("chunks.0.objects.raw.key", "../" + "a" * 61),
    "bad sha256": _mutate("chunks.0.objects.raw.sha256", "xyz"),
    "bad level name": _mutate("chunks.0.objects", {"RAW/..": {"key": "a" * 64, "nbytes": 1, "sha256": "a" * 64}}),
    "level outside levels": _mutate("levels", ["int8"]),
    "duplicate levels": _mutate("levels", ["raw", "raw"]),
    "zero chunk_tokens": _mutate("chunk_tokens", 0),
    "model not an object": _mutate("model", "m"),
    "bad token digest": _mutate("token_ids_sha256", "0"),
    "bad quality": _mutate("chunks.0.objects.raw.quality", {"kl": "high"}),
    "meta not an object": _mutate("meta", [1]),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_manifests_are_rejected(name):
    Manifest.from_json(json.dumps(_valid_doc()))  # the base is valid
    with pytest.raises(StoreError, match="manifest|bad"):
        Manifest.from_json(json.dumps(MALFORMED[name](_valid_doc())))


@pytest.mark.parametrize("text", ["", "not json", "[]", "null", "42", '"x"', b"\xff\xfe", "[" * 100000 + "]" * 100000])
def test_non_manifests_are_rejected(text):
    with pytest.raises(StoreError):
        Manifest.from_json(text)


def test_stored_malformed_manifest_is_a_store_error(any_store):
    """A damaged manifest in the backend is listed, but reading it (or collecting garbage) raises StoreError."""
    good = Manifest.from_json(json.dumps(_valid_doc()))
    for key in good.keys():
        any_store.put_object(key, b"x")
    any_store.put_manifest(good)
    other = Manifest.from_json(json.dumps({**_valid_doc(), "context_id": "c2"}))
    any_store.put_manifest(other)
    if any_store.url.startswith("dir://"):
        (any_store.root / "manifests" / "c1.json").write_text('{"format": "kvcast-manifest/1"')
        (any_store.root / "manifests" / "c2.json").write_text(good.to_json())  # c1's manifest under c2's name
    else:
        any_store._client.set(any_store._manifest("c1"), b'{"format": "kvcast-manifest/1"')
        any_store._client.set(any_store._manifest("c2"), good.to_json().encode())
    assert any_store.contexts() == ["c1", "c2"]
    with pytest.raises(StoreError, match="malformed"):
        any_store.get_manifest("c1")
    with pytest.raises(StoreError, match="holds context 'c1'"):
        any_store.get_manifest("c2")
    with pytest.raises(StoreError):
        any_store.collect_garbage()  # cannot know what a damaged manifest names: removes nothing
    assert len(any_store.object_keys()) == 2
