"""kvcast codec: KV cache <-> self-describing bitstream at several levels.

Public API (stable):

* ``codec.levels()``: level names, best quality first (measured top-1 agreement)
* ``codec.describe(level)``: the level's spec as a dict
* ``codec.encode(kv, level, *, model=None, token_start=0, context_end=None, sensitivity=None) -> bytes``
* ``codec.decode(data, device="cpu", dtype=None, *, expect_model=None) -> kv``
* ``codec.inspect(data) -> dict``: the header, sizes by role, values, bits per value
* ``codec.CodecError``: raised for every bad input

`kv` is a list of ``(key, value)`` per layer, each ``[1, kv_heads, tokens, head_dim]`` (fp16/bf16/fp32):

>>> import torch
>>> from kvcast import codec
>>> codec.levels()[:3]
['raw', 'int8', 'kvcast-4']
>>> codec.describe("cachegen-3")["coder"]
'rans'
>>> g = torch.Generator().manual_seed(0)
>>> kv = [(torch.randn(1, 2, 16, 8, generator=g).half(), torch.randn(1, 2, 16, 8, generator=g).half())
...       for _ in range(3)]
>>> data = codec.encode(kv, "int8")
>>> out = codec.decode(data)
>>> len(out), tuple(out[0][0].shape), out[0][0].dtype
(3, (1, 2, 16, 8), torch.float16)
>>> bool(max((a.float() - b.float()).abs().max() for p, q in zip(kv, out) for a, b in zip(p, q)) < 0.05)
True
>>> info = codec.inspect(data)
>>> info["level"]["name"], info["values"], info["tokens"]["count"]
('int8', 1536, 16)
>>> codec.decode(data[:-1])  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
kvcast.codec.errors.CodecError: truncated object: ...

Modules, bottom to top (each imports only modules listed before it):

* `errors`: `CodecError`.
* `container`: the binary container (prefix, JSON header, typed sections, CRC32C).
* `levels`: `LevelSpec` and `LevelRegistry`, the built-in levels.
* `fingerprint`: `ModelFingerprint` (header ``model`` entry) and `KVSignature` (what determines a model's KV).
* `sensitivity`: per-model sensitivity tables of the grid levels, found by fingerprint.
* `protocol`: the coder workers' framed pipe messages (imports nothing of the codec).
* `rangecoder`: CacheGen CDFs, torchac backend, encode/decode of stream groups.
* `packing`: typed parts (`pack_parts`/`unpack_parts`), `split_payload`, `block_rows`, dtype tables, `FP16_MAX`.
* `pipeline`: CacheGen per-(K/V, layer) quantize/transform/code and its coder ops.
* `grid`: kvcast's grid levels per (K/V, layer) and their coder ops (independent of `pipeline`).
* `ops`: op name -> handler (`handle`), over both pipelines.
* `pool`: `CoderPool`, runs ops in-process or in `worker` subprocesses.
* `worker`: ``python -m kvcast.codec.worker``, the subprocess main (imported by nothing).
* `api`: `Codec` (encode/decode/inspect of whole KV caches); then this package.
* On top, not imported by the above: `hf` (transformers caches, `fingerprint_from_config`), `model`
  (SmolLM2 loader), `evaluate`, `position` (loss by the position of a lossy chunk), `calibrate`, `demo`, `bench`,
  `cli`.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Light modules (standard library only) are imported now. This also binds the submodule `levels` before the
# function `levels()` below replaces it as the package attribute.
from kvcast.codec.errors import CodecError
from kvcast.codec.levels import LevelRegistry, LevelSpec

if TYPE_CHECKING:
    from kvcast.codec.api import KV, Codec
    from kvcast.codec.fingerprint import ModelFingerprint
    from kvcast.codec.sensitivity import SensitivityTable

# Names are imported on first use, so importing a light codec module (settings, errors) or `kvcast --help`
# does not load torch.
_EXPORTS = {
    "KV": "kvcast.codec.api", "Codec": "kvcast.codec.api", "default_codec": "kvcast.codec.api",
    "KVSignature": "kvcast.codec.fingerprint", "ModelFingerprint": "kvcast.codec.fingerprint",
    "SensitivityTable": "kvcast.codec.sensitivity", "TableRegistry": "kvcast.codec.sensitivity",
}

__all__ = ["KV", "Codec", "CodecError", "KVSignature", "LevelRegistry", "LevelSpec", "ModelFingerprint",
           "SensitivityTable", "TableRegistry", "decode", "default_codec", "describe", "encode", "inspect", "levels"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvcast.codec' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def _default_codec() -> Codec:
    return importlib.import_module("kvcast.codec.api").default_codec()


def levels() -> list[str]:
    """Level names, best quality first by top-1 agreement measured on SmolLM2 (`docs/codec-experiments.md`);
    sizes are not monotone along this order."""
    return _default_codec().levels()


def describe(level: str) -> dict[str, Any]:
    """The spec of `level` (quantizer, bins, transform, coder, error bound, description)."""
    return _default_codec().describe(level)


def encode(kv: KV, level: str, *, model: ModelFingerprint | None = None, token_start: int = 0,
           context_end: int | None = None, sensitivity: SensitivityTable | None = None) -> bytes:
    """Encode `kv` at `level` into one self-describing, checksummed object.

    Grid levels (``kvcast-*``) weight their steps by the model's sensitivity table (found by `model`'s
    fingerprint, or given as `sensitivity`) and spend more bits near `context_end` (default: the object's end).
    """
    return _default_codec().encode(kv, level, model=model, token_start=token_start, context_end=context_end,
                                   sensitivity=sensitivity)


def decode(data: bytes | memoryview, device: Any = "cpu", dtype: Any = None, *,
           expect_model: ModelFingerprint | None = None, sensitivity: SensitivityTable | None = None) -> KV:
    """Decode an object made by `encode`; raises `CodecError` for corrupt, truncated or foreign data.
    `sensitivity`: the table a basis level was encoded with, where the codec's tables do not have it."""
    return _default_codec().decode(data, device=device, dtype=dtype, expect_model=expect_model,
                                   sensitivity=sensitivity)


def inspect(data: bytes | memoryview) -> dict[str, Any]:
    """Check an object and return its header with sizes (bytes by role), value count and bits per value."""
    return _default_codec().inspect(data)
