"""``kvcast store put|ls|rm|du|gc`` end to end on a tiny Llama saved to a folder, into both backends; stored
objects are the bytes a local encode gives; bad input exits 2 with one line and leaves the store unchanged."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from kvcast import codec
from kvcast.cli import app
from kvcast.streamer.ingest import IngestError, put_context
from kvcast.streamer.store import StoreError, open_store
from tests.factories import free_port
from tests.streamer.store.support import assert_consistent, backend_url, raw_state

TEXT = "The quick brown fox jumps over the lazy dog; " * 7  # 315 bytes: 315 tokens of the byte-level model
LEVELS = "raw,int8,cachegen-2,kvcast-2"  # kvcast-2: the tiny model has no sensitivity table: skipped
CHUNK = 64


def _run(*args: str):
    return CliRunner().invoke(app, ["store", *args], catch_exceptions=False)


def _json(*args: str):
    result = _run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _local_kv(model, text: str):
    ids = model.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    with torch.inference_mode():
        out = model.model(torch.tensor([ids]), use_cache=True)
    from kvcast.codec.hf import kv_from_cache

    return ids, kv_from_cache(out.cache)


@pytest.mark.parametrize("kind", ["dir", "redis"])
def test_store_commands_end_to_end(kind, tmp_path, redis_server, tiny_model_dir, tiny_model):
    url = backend_url(kind, tmp_path, redis_server)
    text_file = tmp_path / "fox.txt"
    text_file.write_text(TEXT)
    put = ["put", "--store", url, "--model", str(tiny_model_dir), "--chunk-tokens", str(CHUNK), "--levels", LEVELS,
           "--no-progress", "--threads", "1"]
    result = _run(*put, "--context-id", "fox-1", str(text_file))
    assert result.exit_code == 0, result.output
    chunks = -(-len(TEXT) // CHUNK)
    assert "skipped kvcast-2: no sensitivity table" in result.stdout
    assert f"{3 * chunks} objects written" in result.stdout
    (row,) = _json("ls", "--store", url)
    assert row["context_id"] == "fox-1" and row["tokens"] == len(TEXT) and row["chunks"] == chunks
    assert row["levels"] == ["raw", "int8", "cachegen-2"] and row["model"] == "tiny-llama"
    usage = _json("du", "--store", url)
    assert usage["contexts"] == 1 and usage["objects"] == 3 * chunks and usage["unreferenced_objects"] == 0
    assert usage["object_bytes"] == row["bytes"]

    # The stored objects are exactly what encoding the model's KV here gives.
    store = open_store(url)
    manifest = store.get_manifest("fox-1")
    ids, kv = _local_kv(tiny_model, TEXT)
    fingerprint = tiny_model.fingerprint()
    assert manifest.model == fingerprint.to_dict() and manifest.tokens == len(ids)
    from kvcast.codec.hf import slice_kv

    for chunk in manifest.chunks:
        part = slice_kv(kv, chunk.start_token, chunk.start_token + chunk.tokens)
        for level, entry in chunk.objects.items():
            stored = store.get_object(entry.key)
            assert stored == codec.encode(part, level, model=fingerprint, token_start=chunk.start_token)
            decoded = codec.decode(stored, expect_model=fingerprint)
            if level == "raw":
                for (k, v), (k2, v2) in zip(part, decoded):
                    assert torch.equal(k.half().float(), k2.float()) and torch.equal(v.half().float(), v2.float())
    assert_consistent(store)

    # Again: nothing new. A longer text sharing the prefix re-uses the objects of its whole chunks.
    result = _run(*put, "--context-id", "fox-1", str(text_file))
    assert result.exit_code == 0 and "0 objects written" in result.stdout and f"{3 * chunks} re-used" in result.stdout
    longer = tmp_path / "fox-2.txt"
    longer.write_text(TEXT + "and runs away.")
    assert _run(*put, str(longer)).exit_code == 0  # the context id defaults to the file's stem
    assert [r["context_id"] for r in _json("ls", "--store", url)] == ["fox-1", "fox-2"]
    shared = 3 * (len(TEXT) // CHUNK)
    assert _json("du", "--store", url)["objects"] == 3 * chunks + 3 * (-(-len(TEXT + "and runs away.") // CHUNK)) \
        - shared

    # rm frees what only that context names; gc then finds nothing, until an interrupted put leaves something.
    assert _run("rm", "--store", url, "fox-1").exit_code == 0
    assert [r["context_id"] for r in _json("ls", "--store", url)] == ["fox-2"]
    assert _json("du", "--store", url)["unreferenced_objects"] == 0
    leftover = codec.encode(slice_kv(kv, 0, 4), "raw", model=fingerprint)
    store.put_object(hashlib.sha256(leftover).hexdigest(), leftover)
    assert _json("du", "--store", url)["unreferenced_objects"] == 1
    result = _run("gc", "--store", url)
    assert result.exit_code == 0 and f"{len(leftover):,} bytes freed" in result.stdout
    assert _json("du", "--store", url)["unreferenced_objects"] == 0
    assert _run("rm", "--store", url, "fox-2").exit_code == 0
    assert _json("du", "--store", url) == {"store": store.url, "contexts": 0, "objects": 0, "object_bytes": 0,
                                           "unreferenced_objects": 0}
    assert store.object_keys() == []
    store.close()


def test_grid_levels_with_a_table_and_the_keys_that_follow(tmp_path, tiny_model):
    """With a sensitivity table the kvcast-* levels are stored; their bytes depend on the context's end, so a
    longer context shares raw objects with a shorter one but not grid ones. A damaged object is rewritten."""
    from kvcast.codec.hf import slice_kv
    from kvcast.codec.sensitivity import SensitivityTable, TableRegistry

    tables = tmp_path / "tables"
    tables.mkdir()
    table = SensitivityTable.uniform(2, 2, 8, name=tiny_model.name)
    table.save(tables / "tiny.safetensors")
    registry = TableRegistry([tables])
    store = open_store(tmp_path / "store")
    result = put_context(store, "short", TEXT, model=tiny_model, levels=["kvcast-2"], chunk_tokens=CHUNK,
                         tables=registry)
    assert result.skipped == {} and result.manifest.levels == ("raw", "kvcast-2")
    ids, kv = _local_kv(tiny_model, TEXT)
    fingerprint = tiny_model.fingerprint()
    for chunk in result.manifest.chunks:
        part = slice_kv(kv, chunk.start_token, chunk.start_token + chunk.tokens)
        local = codec.encode(part, "kvcast-2", model=fingerprint, token_start=chunk.start_token,
                             context_end=len(ids), sensitivity=registry.find(fingerprint))
        assert store.get_object(chunk.objects["kvcast-2"].key) == local
    longer = put_context(store, "long", TEXT + "x" * 40, model=tiny_model, levels=["kvcast-2"],
                         chunk_tokens=CHUNK, tables=registry)
    first = (result.manifest.chunks[0], longer.manifest.chunks[0])
    assert first[0].objects["raw"].key == first[1].objects["raw"].key
    assert first[0].objects["kvcast-2"].key != first[1].objects["kvcast-2"].key

    damaged = store.root / "objects" / first[0].objects["raw"].key[:2] / first[0].objects["raw"].key
    damaged.write_bytes(damaged.read_bytes()[:-3] + b"bad")
    again = put_context(store, "short", TEXT, model=tiny_model, levels=["kvcast-2"], chunk_tokens=CHUNK,
                        tables=registry)
    assert again.written == 1 and again.manifest == replace(result.manifest, created_s=again.manifest.created_s)
    assert_consistent(store)


def test_put_context_rejects_bad_input_before_writing(tmp_path, tiny_model):
    store = open_store(tmp_path / "store")
    for kwargs in [dict(context_id="../x"), dict(levels=["nope"]), dict(chunk_tokens=0), dict(text="  "),
                   dict(text=[]), dict(text=[1, 999]), dict(text="y" * 3000)]:
        args = {"context_id": "ok", "text": TEXT, "levels": ["raw"], "chunk_tokens": CHUNK, **kwargs}
        with pytest.raises(IngestError):
            put_context(store, args.pop("context_id"), args.pop("text"), model=tiny_model, **args)
    assert raw_state(store.url) == {}
    assert issubclass(IngestError, StoreError)


@pytest.mark.parametrize("kind", ["dir", "redis"])
def test_bad_input_exits_2_with_one_line_and_the_store_unchanged(kind, tmp_path, redis_server, tiny_model_dir,
                                                                  tiny_model):
    url = backend_url(kind, tmp_path, redis_server)
    store = open_store(url)
    put_context(store, "seed", TEXT, model=tiny_model, levels=["raw"], chunk_tokens=CHUNK)
    store.put_object("f" * 64, b"loose")  # an unreferenced object, as an interrupted put leaves
    before = raw_state(url)
    good = tmp_path / "ok.txt"
    good.write_text(TEXT)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "long.txt").write_text("z" * 3000)  # the model takes 2,048 positions
    (tmp_path / ".hidden.txt").write_text(TEXT)
    common = ["--model", str(tiny_model_dir), "--no-progress", "--levels", "raw"]
    cases = {
        "bad context id": ["put", "--store", url, "--context-id", "../x", *common, str(good)],
        "bad default context id": ["put", "--store", url, *common, str(tmp_path / ".hidden.txt")],
        "unknown level": ["put", "--store", url, "--model", str(tiny_model_dir), "--levels", "raw,nope", str(good)],
        "missing file": ["put", "--store", url, *common, str(tmp_path / "missing.txt")],
        "not UTF-8": ["put", "--store", url, *common, str(tmp_path / "latin1.txt")],
        "empty text": ["put", "--store", url, *common, str(tmp_path / "empty.txt")],
        "too long": ["put", "--store", url, *common, str(tmp_path / "long.txt")],
        "zero chunk": ["put", "--store", url, *common, "--chunk-tokens", "0", str(good)],
        "missing model": ["put", "--store", url, "--model", str(tmp_path / "no-model"), str(good)],
        "bad scheme": ["put", "--store", "ftp://host/x", *common, str(good)],
        "unreachable redis": ["put", "--store", f"redis://127.0.0.1:{free_port()}/0?timeout_s=2", *common,
                              str(good)],
        "rm bad id": ["rm", "--store", url, "seed", "a/b"],
        "rm missing": ["rm", "--store", url, "seed", "nope"],
        "ls bad scheme": ["ls", "--store", "s3://bucket"],
        "gc unreachable": ["gc", "--store", f"redis://127.0.0.1:{free_port()}/0"],
    }
    for name, args in cases.items():
        result = _run(*args)
        assert result.exit_code == 2, (name, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, result.stderr)
        assert raw_state(url) == before, name
    store.close()


def test_broken_manifest_in_ls_gc_and_rm(tmp_path, tiny_model):
    store = open_store(tmp_path / "store")
    put_context(store, "good", TEXT, model=tiny_model, levels=["raw"], chunk_tokens=CHUNK)
    (store.root / "manifests" / "broken.json").write_text("{not json")
    rows = _json("ls", "--store", str(store.root))
    assert [r["context_id"] for r in rows] == ["broken", "good"] and "malformed" in rows[0]["error"]
    result = _run("gc", "--store", str(store.root))
    assert result.exit_code == 1 and "malformed" in result.stderr  # gc cannot know what it names
    assert _run("rm", "--store", str(store.root), "broken").exit_code == 0
    assert _run("gc", "--store", str(store.root)).exit_code == 0
    assert store.contexts() == ["good"]
    assert_consistent(store)
