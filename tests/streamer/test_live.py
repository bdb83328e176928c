"""Live loading: the engine with the codec's real decoder and the model's real prefill, from a store.

Correctness: for every policy, the assembled KV equals, chunk by chunk, either the locally decoded object of the
level the policy chose or the model's own prefill of that chunk on the assembled prefix; the model's answer
and logits on the loaded KV equal those of a local run on the same KV.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest
import torch

from kvcast import codec
from kvcast.codec.hf import cache_from_kv, fingerprint_from_config, kv_from_cache, slice_kv
from kvcast.policies.base import TEXT, Decision, Observation, Policy
from kvcast.policies.registry import default_registry
from kvcast.streamer.live import ContextAssembly, HostProfile, LiveError, StoreLink, answer, live_menus, load_context
from kvcast.streamer.menus import RecomputeCost
from kvcast.streamer.store import ChunkEntry, Manifest, ObjectEntry, object_key, token_ids_digest
from tests.factories import MemoryStore, tiny_llama

CHUNK = 16
TOKENS = 48
LEVELS = ("raw", "int8", "cachegen-2")
HOST = HostProfile(recompute=RecomputeCost(1e-4, 0.0, 1e-3), default_decode_values_per_s=1e8)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3)


@pytest.fixture(scope="module")
def context(model):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (TOKENS,), generator=g).tolist()
    with torch.no_grad():
        kv = kv_from_cache(model(torch.tensor([ids]), use_cache=True).cache)
    return ids, kv


def store_context(store, context_id, model, ids, kv):
    """Encode every chunk at every level into `store` and commit a manifest (objects first)."""
    fp = fingerprint_from_config(model.config, name="tiny").to_dict()
    chunks = []
    for index, start in enumerate(range(0, TOKENS, CHUNK)):
        objects = {}
        for level in LEVELS:
            data = codec.encode(slice_kv(kv, start, start + CHUNK), level)
            key = object_key(fp, ids, start, start + CHUNK, level)
            store.put_object(key, data)
            objects[level] = ObjectEntry(key, len(data), hashlib.sha256(data).hexdigest())
        chunks.append(ChunkEntry(index, start, CHUNK, objects))
    manifest = Manifest(context_id=context_id, model=fp, token_ids_sha256=token_ids_digest(ids), tokens=TOKENS,
                        chunk_tokens=CHUNK, levels=LEVELS, chunks=tuple(chunks), created_s=time.time())
    store.put_manifest(manifest)
    return store.get_manifest(context_id)


class Plan(Policy):
    """Text for the chunks in `text`, the others loaded at `level`, from the back."""

    name = "plan"

    def __init__(self, text=(), level="raw"):
        self.text, self.level = set(text), level

    def decide(self, obs: Observation) -> Decision | None:
        texts = [c for c in obs.pending if c in self.text]
        loads = [c for c in obs.pending if c not in self.text]
        if obs.compute_idle and texts:
            return Decision(min(texts), TEXT)
        if obs.link_idle and loads:
            return Decision(max(loads), self.level)
        return None


def run(manifest, store, model, ids, policy, slo_s=5.0):
    async def go():
        link = StoreLink(store, manifest)
        try:
            return await load_context(manifest, link, model, ids, policy=policy, slo_s=slo_s, host=HOST)
        finally:
            link.close()
    return asyncio.run(go())


def expected_kv(manifest, store, model, ids, actions):
    """Chunk by chunk, as the live session must build it: decoded objects, or prefill on the assembled prefix."""
    parts = []
    for chunk, action in zip(manifest.chunks, actions):
        if action == TEXT:
            prefix = [(torch.cat([p[i][0] for p in parts], 2), torch.cat([p[i][1] for p in parts], 2))
                      for i in range(len(parts[0]))] if parts else None
            cache = None if prefix is None else cache_from_kv(prefix, model.config)
            with torch.no_grad():
                out = model(torch.tensor([ids[chunk.start_token:chunk.start_token + chunk.tokens]]), cache=cache,
                            use_cache=True)
            parts.append(slice_kv(kv_from_cache(out.cache), chunk.start_token, chunk.start_token + chunk.tokens))
        else:
            data = store.get_object(chunk.objects[action].key)
            parts.append(codec.decode(data, dtype=torch.float32))
    return [(torch.cat([p[i][0] for p in parts], 2), torch.cat([p[i][1] for p in parts], 2))
            for i in range(len(parts[0]))]


@pytest.mark.parametrize("policy_spec", ["fixed:raw", "fixed:int8", "fixed:cachegen-2", "text", "mixed", "hybrid",
                                         "cachegen"])
def test_live_kv_equals_the_local_run_of_the_same_actions(model, context, policy_spec):
    ids, kv = context
    store = MemoryStore()
    manifest = store_context(store, "ctx", model, ids, kv)
    policy = Plan(text=[0], level="int8") if policy_spec == "mixed" else default_registry().create(policy_spec)
    result = run(manifest, store, model, ids, policy)
    actions = [r.action for r in result.session.chunks]
    assert all(a is not None for a in actions)
    if policy_spec == "mixed":
        assert actions == [TEXT, "int8", "int8"]
    want = expected_kv(manifest, store, model, ids, actions)
    for (k, v), (wk, wv) in zip(result.kv, want):
        assert torch.equal(k, wk) and torch.equal(v, wv)
    # the model's answer and first logits on the loaded KV equal a local run on the same KV
    got_ids, got_logits, _ = answer(model, result.kv, ids[-2:], max_new_tokens=6)
    want_ids, want_logits, _ = answer(model, want, ids[-2:], max_new_tokens=6)
    assert got_ids == want_ids and torch.equal(got_logits, want_logits)
    # records: every loaded chunk was transferred then decoded, every text chunk recomputed
    for rec in result.session.chunks:
        if rec.action == TEXT:
            assert rec.recompute_start_s is not None and rec.recompute_end_s >= rec.recompute_start_s
        else:
            assert rec.transfer_end_s <= rec.decode_start_s <= rec.decode_end_s == rec.ready_s
            assert rec.nbytes == manifest.chunks[rec.index].objects[rec.action].nbytes


def test_text_only_session_equals_the_full_prefill(model, context):
    ids, kv = context
    store = MemoryStore()
    manifest = store_context(store, "ctx", model, ids, kv)
    result = run(manifest, store, model, ids, default_registry().create("text"))
    for (k, v), (wk, wv) in zip(result.kv, kv):
        torch.testing.assert_close(k, wk, rtol=1e-4, atol=1e-5)  # chunked vs whole prefill: float order only
        torch.testing.assert_close(v, wv, rtol=1e-4, atol=1e-5)


def test_a_corrupt_object_fails_the_checksum_before_decoding(model, context):
    ids, kv = context
    store = MemoryStore()
    manifest = store_context(store, "ctx", model, ids, kv)
    key = manifest.chunks[1].objects["raw"].key
    data = bytearray(store.objects[key])
    data[len(data) // 2] ^= 0x40
    store.objects[key] = bytes(data)
    with pytest.raises(LiveError, match="checksum"):
        run(manifest, store, model, ids, default_registry().create("fixed:raw"))


def test_menus_come_from_the_manifest_sizes(model, context):
    ids, kv = context
    store = MemoryStore()
    manifest = store_context(store, "ctx", model, ids, kv)
    menus = live_menus(manifest, HOST)
    assert [m.tokens for m in menus] == [CHUNK] * 3
    for menu, chunk in zip(menus, manifest.chunks):
        assert {o.level: o.nbytes for o in menu.levels} == {lv: e.nbytes for lv, e in chunk.objects.items()}
        assert menu.recompute_s == pytest.approx(HOST.recompute.prefill_s(chunk.start_token, CHUNK))


def test_assembly_refuses_a_prefix_with_holes_and_wrong_sizes(context):
    _, kv = context
    assembly = ContextAssembly([CHUNK, CHUNK, CHUNK])
    assembly.put(0, slice_kv(kv, 0, CHUNK))
    with pytest.raises(LiveError, match="not in place"):
        assembly.prefix(3)
    with pytest.raises(LiveError, match="expected 16"):
        assembly.put(1, slice_kv(kv, 0, 5))


# --------------------------------------------------------------------------- CUDA: timed to the device's real end


def slow_device(monkeypatch, seconds):
    """Replace `wait_for_device` with one that takes `seconds` (a GPU still busy with queued kernels); returns
    the devices it was asked to wait for."""
    import kvcast.streamer.live as live

    waited = []

    def wait(device):
        waited.append(device)
        time.sleep(seconds)

    monkeypatch.setattr(live, "wait_for_device", wait)
    return waited


def test_the_first_token_time_includes_waiting_for_the_device(model, context, monkeypatch):
    ids, kv = context
    waited = slow_device(monkeypatch, 0.2)
    _, _, first_step_s = answer(model, kv, ids[-2:], max_new_tokens=3)
    assert waited == [next(model.parameters()).device]  # once, for the first token
    assert first_step_s >= 0.2


def test_a_recompute_ends_when_the_device_is_done(model, context, monkeypatch):
    ids, kv = context
    store = MemoryStore()
    manifest = store_context(store, "ctx", model, ids, kv)
    waited = slow_device(monkeypatch, 0.2)
    result = run(manifest, store, model, ids, default_registry().create("text"))
    assert len(waited) == len(manifest.chunks)
    for rec in result.session.chunks:
        assert rec.action == TEXT and rec.recompute_end_s - rec.recompute_start_s >= 0.2


def test_wait_for_device_synchronizes_the_current_cuda_stream_only(monkeypatch):
    from kvcast.streamer.host import wait_for_device

    synced = []

    class Stream:
        def __init__(self, device):
            self.device = device

        def synchronize(self):
            synced.append(self.device)

    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    wait_for_device(torch.device("cpu"))
    assert synced == []
    wait_for_device(torch.device("cuda", 1))
    assert synced == [torch.device("cuda", 1)]


def test_basis_levels_made_with_a_private_table_decode_live_only_with_that_table(model, context):
    """A kvcast-basis-* object names its table's basis by digest: a host without that table refuses the chunk
    with the codec's error; given the table (``sensitivity=``, ``kvcast fetch --tables``) it decodes exactly as
    the codec does."""
    from tests.codec.test_grid import random_table

    ids, kv = context
    cfg = model.config
    table = random_table(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                         seed=3, name="tiny")
    fp = fingerprint_from_config(model.config, name="tiny").to_dict()
    store, chunks = MemoryStore(), []
    for index, start in enumerate(range(0, TOKENS, CHUNK)):
        data = codec.encode(slice_kv(kv, start, start + CHUNK), "kvcast-basis-2", token_start=start,
                            context_end=TOKENS, sensitivity=table)
        key = object_key(fp, ids, start, start + CHUNK, "kvcast-basis-2")
        store.put_object(key, data)
        chunks.append(ChunkEntry(index, start, CHUNK, {
            "kvcast-basis-2": ObjectEntry(key, len(data), hashlib.sha256(data).hexdigest())}))
    store.put_manifest(Manifest(context_id="basis", model=fp, token_ids_sha256=token_ids_digest(ids), tokens=TOKENS,
                                chunk_tokens=CHUNK, levels=("kvcast-basis-2",), chunks=tuple(chunks),
                                created_s=time.time()))
    manifest = store.get_manifest("basis")

    async def go(sensitivity):
        link = StoreLink(store, manifest)
        try:
            return await load_context(manifest, link, model, ids, policy=default_registry().create(
                "fixed:kvcast-basis-2"), slo_s=5.0, host=HOST, sensitivity=sensitivity)
        finally:
            link.close()

    with pytest.raises(codec.CodecError, match="sensitivity basis"):
        asyncio.run(go(None))
    result = asyncio.run(go(table))
    want = [codec.decode(store.get_object(c.objects["kvcast-basis-2"].key), dtype=torch.float32, sensitivity=table)
            for c in manifest.chunks]
    for layer, (k, v) in enumerate(result.kv):
        assert torch.equal(k, torch.cat([w[layer][0] for w in want], 2))
        assert torch.equal(v, torch.cat([w[layer][1] for w in want], 2))
