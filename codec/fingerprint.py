"""Model fingerprints: what a KV object is for (in every header) and what a sensitivity table fits.

`ModelFingerprint` is the ``model`` entry of every object's header: name, KV shape, KV dtype and RoPE
parameters. Its header form (`ModelFingerprint.to_dict`) is frozen: changing it changes every bitstream.

`KVSignature` travels beside it, never in the header: a hash of the model-config fields that determine what
the KV holds, used to find the sensitivity table of a model whatever it is called or wherever it was loaded
from (`kvcast.codec.sensitivity`). It is filled by `kvcast.codec.hf.fingerprint_from_config`.

The hashed fields are an *allowlist* (`KV_CONFIG_FIELDS`), so keys that new transformers versions add to
their configs (with defaults) do not change the hash. Values are canonicalised first: shape fields are the
resolved values (``head_dim`` defaults to ``hidden_size / num_attention_heads``, ``num_key_value_heads`` to
``num_attention_heads``), RoPE is `kvcast.codec.hf.rope_parameters`' normal form (``rope_theta`` +
``rope_scaling`` of transformers 4 and ``rope_parameters`` of transformers 5 give the same entry), and floats
are compared at float32 precision, the precision the model uses them in (a GGUF stores ``rms_norm_eps`` as
float32, ``9.999999747378752e-06``, where the hub's config.json says ``1e-05``: the same model).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvcast.codec.errors import CodecError

SIGNATURE_SCHEME = "kvcast-kv-signature/1"
KV_CONFIG_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "vocab_size", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "rope",
)
"""Config fields hashed into a `KVSignature` (``rope``: the normalised RoPE parameters). Anything else in a
config (token ids, dropout, ``max_position_embeddings`` of default RoPE, ``transformers_version``, names,
paths, dtypes) does not change the KV of a given position and is left out."""


def canonical(value: Any) -> Any:
    """A JSON value that compares equal for equal settings: floats at float32 precision (shortest repr), ints
    as ints, bools as bools, dicts with sorted string keys, tuples as lists, anything else as its string."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(str(np.float32(value)))
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return str(value)


@dataclass(frozen=True)
class KVSignature:
    """The KV-determining settings of a model config and their hash (see the module docstring)."""

    model_type: str
    fields: dict[str, Any]
    """Canonical values of `KV_CONFIG_FIELDS` (None where the config has no such field)."""
    digest: str
    """First 16 hex digits of the SHA-256 of the scheme and `fields` as canonical JSON."""

    @classmethod
    def from_fields(cls, values: Mapping[str, Any]) -> KVSignature:
        """The signature of config `values` (keys outside `KV_CONFIG_FIELDS` are ignored)."""
        fields = {name: canonical(values.get(name)) for name in KV_CONFIG_FIELDS}
        return cls(model_type=str(fields["model_type"]), fields=fields, digest=_digest(fields))

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": SIGNATURE_SCHEME, "model_type": self.model_type, "digest": self.digest,
                "fields": copy.deepcopy(self.fields)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KVSignature:
        """Read `to_dict`'s form; `CodecError` if the scheme is unknown or the digest does not match."""
        if not (isinstance(d, Mapping) and d.get("scheme") == SIGNATURE_SCHEME
                and isinstance(d.get("fields"), Mapping)):
            raise CodecError(f"KV signature: expected a {SIGNATURE_SCHEME!r} object, got {d!r}")
        sig = cls.from_fields(d["fields"])
        if d.get("digest") != sig.digest or d.get("model_type") != sig.model_type:
            raise CodecError(f"KV signature: digest {d.get('digest')!r} does not match its fields ({sig.digest!r})")
        return sig

    def differences(self, other: KVSignature) -> list[str]:
        """Names of the fields whose values differ from `other`'s."""
        return [name for name in KV_CONFIG_FIELDS if self.fields.get(name) != other.fields.get(name)]

    def __str__(self) -> str:
        return f"{self.model_type}/{self.digest}"


def _digest(fields: Mapping[str, Any]) -> str:
    raw = json.dumps({"scheme": SIGNATURE_SCHEME, "fields": fields}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class ModelFingerprint:
    """What a KV object must match to be used with a model.

    `kv_signature` is not part of the header (`to_dict`) and not compared: objects carry the other fields
    only. Fingerprints built by `kvcast.codec.hf.fingerprint_from_config` have one; hand-built ones usually
    do not, and then find a sensitivity table by name, KV shape and RoPE (`kvcast.codec.sensitivity`).
    """

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    rope: dict[str, Any] | None = None
    kv_signature: KVSignature | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The header form: ``name, layers, kv_heads, head_dim, dtype, rope`` (never the KV signature)."""
        return {"name": self.name, "layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "dtype": self.dtype, "rope": copy.deepcopy(self.rope)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelFingerprint:
        try:
            return cls(name=str(d["name"]), layers=int(d["layers"]), kv_heads=int(d["kv_heads"]),
                       head_dim=int(d["head_dim"]), dtype=str(d["dtype"]), rope=d.get("rope"))
        except (KeyError, TypeError, ValueError) as exc:
            raise CodecError(f"malformed model fingerprint in header: {exc}") from None

    def same_shape(self, other: ModelFingerprint) -> bool:
        return (self.layers, self.kv_heads, self.head_dim) == (other.layers, other.kv_heads, other.head_dim)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(layers, kv_heads, head_dim)``."""
        return (self.layers, self.kv_heads, self.head_dim)
