"""Sensitivity tables are found by what determines a model's KV (architecture, KV shape, RoPE, KV signature),
not by the model's name or path; headers stay as they were."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvcast import codec  # noqa: E402
from kvcast.codec.api import Codec  # noqa: E402
from kvcast.codec.fingerprint import KV_CONFIG_FIELDS, KVSignature, ModelFingerprint  # noqa: E402
from kvcast.codec.hf import fingerprint_from_config, kv_signature  # noqa: E402
from kvcast.codec.sensitivity import TABLES_DIR, SensitivityTable, TableRegistry  # noqa: E402
from tests.factories import make_kv  # noqa: E402

SHIPPED = "SmolLM2-135M-Instruct"

# config.json of HuggingFaceTB/SmolLM2-135M-Instruct on the Hugging Face hub (the fields that matter here)
HUB_SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "rope_theta": 100000,
    "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.42.3",
    "_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def hub_config(**changes):
    return transformers.LlamaConfig(**{**HUB_SMOLLM2_CONFIG, **changes})


def test_hub_config_finds_the_shipped_table_by_signature():
    fp = fingerprint_from_config(hub_config())
    assert fp.name == "HuggingFaceTB/SmolLM2-135M-Instruct" and fp.kv_signature is not None
    registry = TableRegistry()
    table = registry.find(fp)
    assert table.model["name"] == SHIPPED and table.kv_signature.digest == fp.kv_signature.digest
    # any name, any folder: the name is not what matches
    assert registry.find(dataclasses.replace(fp, name="/somewhere/else/model")) is table


def test_signature_ignores_keys_outside_the_allowlist_and_float_noise():
    base = kv_signature(hub_config())
    assert kv_signature(hub_config(bos_token_id=7, max_position_embeddings=2048, attention_dropout=0.1,
                                   some_future_default=True, transformers_version="9.0")) == base
    # the float32 value of 1e-5, as a GGUF stores it: the model adds it in float32, so the KV is the same
    assert kv_signature(hub_config(rms_norm_eps=9.999999747378752e-06)) == base
    assert set(base.fields) == set(KV_CONFIG_FIELDS)
    assert KVSignature.from_dict(json.loads(json.dumps(base.to_dict()))) == base


@pytest.mark.parametrize("change", [{"rope_theta": 10000}, {"hidden_size": 720}, {"rms_norm_eps": 1e-6},
                                    {"intermediate_size": 2048}, {"tie_word_embeddings": False}])
def test_a_config_differing_in_a_kv_field_gets_a_clear_error(change):
    fp = fingerprint_from_config(hub_config(**change))
    with pytest.raises(codec.CodecError) as err:
        TableRegistry().find(fp)
    message = str(err.value)
    assert "no sensitivity table" in message and "known tables" in message
    assert repr(SHIPPED) in message and "layers=30, kv_heads=3, head_dim=64" in message
    shipped = TableRegistry().find(fingerprint_from_config(hub_config()))
    assert str(shipped.kv_signature) in message and "kvcast calibrate" in message
    if "rope_theta" not in change:  # the same shape and RoPE: the message says which fields differ
        assert f"differs in {next(iter(change))}" in message
    kv = make_kv(30, 3, 4, 64, torch.bfloat16, seed=0)
    with pytest.raises(codec.CodecError, match="no sensitivity table"):
        codec.encode(kv, "kvcast-2", model=fp)


def test_signature_never_enters_the_header():
    fp = fingerprint_from_config(hub_config(), name=SHIPPED)
    bare = dataclasses.replace(fp, kv_signature=None)  # finds the table by name
    kv = make_kv(30, 3, 20, 64, torch.bfloat16, seed=1)
    for level in ("int8", "kvcast-2"):
        data = codec.encode(kv, level, model=fp)
        assert data == codec.encode(kv, level, model=bare)
        assert codec.inspect(data)["model"] == fp.to_dict()
    assert set(fp.to_dict()) == {"name", "layers", "kv_heads", "head_dim", "dtype", "rope"}
    assert fp == bare  # not compared either


def test_fingerprint_without_signature_falls_back_to_name_shape_and_rope():
    rope = {"theta": 100000.0, "type": "default"}
    registry = TableRegistry()
    assert registry.find(ModelFingerprint(SHIPPED, 30, 3, 64, "float16")).model["name"] == SHIPPED
    assert registry.find(ModelFingerprint(SHIPPED, 30, 3, 64, "float16", rope=rope)).model["name"] == SHIPPED
    with pytest.raises(codec.CodecError, match="no KV signature"):
        registry.find(ModelFingerprint("HuggingFaceTB/SmolLM2-135M-Instruct", 30, 3, 64, "float16", rope=rope))
    with pytest.raises(codec.CodecError, match="no sensitivity table"):
        registry.find(ModelFingerprint(SHIPPED, 30, 3, 64, "float16", rope={"theta": 10000.0, "type": "default"}))


def test_tables_without_signature_match_by_name(tmp_path):
    shipped = SensitivityTable.load(TABLES_DIR / "smollm2-135m-instruct.safetensors")
    old = dataclasses.replace(shipped, kv_signature=None)
    old.save(tmp_path / "old.safetensors")
    registry = TableRegistry([tmp_path])
    fp = fingerprint_from_config(hub_config())
    assert registry.find(dataclasses.replace(fp, name=SHIPPED)).kv_signature is None
    with pytest.raises(codec.CodecError, match="no KV signature"):
        registry.find(fp)


def test_shipped_table_records_its_signature_and_rejects_a_forged_one(tmp_path):
    shipped = SensitivityTable.load(TABLES_DIR / "smollm2-135m-instruct.safetensors")
    assert shipped.kv_signature == kv_signature(hub_config())
    forged = shipped.kv_signature.to_dict()
    forged["fields"]["hidden_size"] = 640
    from safetensors.numpy import save_file

    tensors = {"key": shipped.key, "value": shipped.value, "distance_edges": shipped.distance_edges,
               "distance_profile": shipped.distance_profile}
    save_file(tensors, str(tmp_path / "forged.safetensors"),
              metadata={"format": "kvcast-sensitivity/1", "model": json.dumps(shipped.model),
                        "kv_signature": json.dumps(forged)})
    with pytest.raises(codec.CodecError, match="forged.*digest"):
        SensitivityTable.load(tmp_path / "forged.safetensors")


def test_codec_encodes_a_hub_model_kv_with_the_shipped_table():
    fp = fingerprint_from_config(hub_config())
    kv = make_kv(30, 3, 24, 64, torch.bfloat16, seed=2, scale=0.5)
    coder = Codec()
    out = coder.decode(coder.encode(kv, "kvcast-3", model=fp), expect_model=fp)
    assert len(out) == 30 and out[0][0].dtype == torch.bfloat16 and out[0][0].shape == (1, 3, 24, 64)


# ------------------------------------------------------------------------------------------ SmolLM2 (real)

@pytest.mark.model
def test_project_smollm2_config_finds_the_table_under_any_name(smollm2):
    lm = smollm2
    assert lm.fingerprint().kv_signature == kv_signature(hub_config())
    for name in (lm.name, str(lm.path), "my-copy-of-smollm2", ""):
        fp = fingerprint_from_config(lm.config, name=name)
        assert TableRegistry().find(fp).model["name"] == SHIPPED
    # the GGUF-derived config holds rms_norm_eps as float32 (9.999999747e-06), the hub's as 1e-05: same model
    assert np.float32(lm.config.rms_norm_eps) == np.float32(HUB_SMOLLM2_CONFIG["rms_norm_eps"])
