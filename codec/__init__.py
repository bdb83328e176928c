"""kvcast codec: KV cache <-> self-describing bitstream at several levels.

Public API (stable)::

    codec.levels()                     level names, best quality first (measured top-1 agreement)
    codec.describe(level)              the level's spec as a dict
    codec.encode(kv, level, *, model=None, token_start=0, context_end=None, sensitivity=None) -> bytes
    codec.decode(data, device="cpu", dtype=None, *, expect_model=None) -> kv
    codec.inspect(data) -> dict        the header, sizes by role, values, bits per value
    codec.CodecError                   raised for every bad input

`kv` is a list of ``(key, value)`` per layer, each ``[1, kv_heads, tokens, head_dim]`` (fp16/bf16/fp32).
"""

from __future__ import annotations

from typing import Any

from kvcast.codec.api import KV, Codec, ModelFingerprint, default_codec
from kvcast.codec.errors import CodecError
from kvcast.codec.levels import LevelRegistry, LevelSpec
from kvcast.codec.sensitivity import SensitivityTable, TableRegistry

__all__ = ["CodecError", "Codec", "KV", "LevelRegistry", "LevelSpec", "ModelFingerprint", "SensitivityTable", "TableRegistry", "decode", "describe",
           "encode", "inspect", "levels"]


def levels() -> list[str]:
    """Level names, best quality first by top-1 agreement measured on SmolLM2 (`docs/codec-experiments.md`);
    sizes are not monotone along this order."""
    return default_codec().levels()


def describe(level: str) -> dict[str, Any]:
    """The spec of `level` (quantizer, bins, transform, coder, error bound, description)."""
    return default_codec().describe(level)


def encode(kv, level: str, *, model: ModelFingerprint | None = None, token_start: int = 0,
           context_end: int | None = None, sensitivity: SensitivityTable | None = None) -> bytes:
    """Encode `kv` at `level` into one self-describing, checksummed object.

    Grid levels (``kvcast-*``) weight their steps by the model's sensitivity table (found by `model`'s
    fingerprint, or given as `sensitivity`) and spend more bits near `context_end` (default: the object's end).
    """
    return default_codec().encode(kv, level, model=model, token_start=token_start, context_end=context_end,
                                  sensitivity=sensitivity)


def decode(data, device="cpu", dtype=None, *, expect_model: ModelFingerprint | None = None) -> KV:
    """Decode an object made by `encode`; raises `CodecError` for corrupt, truncated or foreign data."""
    return default_codec().decode(data, device=device, dtype=dtype, expect_model=expect_model)


def inspect(data) -> dict[str, Any]:
    """Check an object and return its header with sizes (bytes by role), value count and bits per value."""
    return default_codec().inspect(data)
