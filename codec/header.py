"""Reading an unpacked object's header and sections into checked, typed parts, for every decoder (the CPU
coder ops in `kvcast.codec.api`, the GPU decoder in `kvcast.codec.gpu`): each check is written once, and a
failed one is a `CodecError` that says what is wrong."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kvcast.codec.errors import CodecError
from kvcast.codec.fingerprint import ModelFingerprint
from kvcast.codec.grid import cdf_length
from kvcast.codec.levels import LevelSpec


def header_basics(h: dict[str, Any]) -> tuple[LevelSpec, ModelFingerprint, int]:
    """The level spec, model fingerprint and token count of a header."""
    if h.get("codec") != "kvcast":
        raise CodecError(f"header codec is {h.get('codec')!r}, not 'kvcast'")
    if not isinstance(h.get("level"), dict):
        raise CodecError("header lacks the level spec")
    spec = LevelSpec.from_dict(h["level"])
    if not isinstance(h.get("model"), dict):
        raise CodecError("header lacks the model fingerprint")
    model = ModelFingerprint.from_dict(h["model"])
    try:
        tokens = int(h["tokens"]["count"])
        start = int(h["tokens"]["start"])
    except (KeyError, TypeError, ValueError):
        raise CodecError("header lacks a valid token range") from None
    if min(model.layers, model.kv_heads, model.head_dim, tokens) < 1 or start < 0:
        raise CodecError(f"header has impossible sizes: {model}, tokens={tokens}, start={start}")
    return spec, model, tokens


def header_bins(h: dict[str, Any], spec: LevelSpec, layers: int) -> tuple[list[int], list[int]]:
    """Per-layer bins of keys and values, checked against the spec."""
    bins = h.get("bins")
    try:
        kb, vb = [int(b) for b in bins["key"]], [int(b) for b in bins["value"]]
    except (KeyError, TypeError, ValueError):
        raise CodecError("header lacks valid per-layer bins") from None
    if len(kb) != layers or len(vb) != layers or any(not (4 <= b <= 256) or b % 2 for b in kb + vb):
        raise CodecError(f"per-layer bins in header are invalid for {layers} layers")
    if (tuple(kb), tuple(vb)) != spec.bins_per_layer(layers):
        raise CodecError("per-layer bins in header disagree with the level spec")
    return kb, vb


def section(sec: dict[str, Any], name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Section `name`, which must have this dtype and shape."""
    arr = sec.get(name)
    if not isinstance(arr, np.ndarray) or arr.dtype.name != dtype or tuple(arr.shape) != tuple(shape):
        got = "missing" if arr is None else f"{getattr(arr, 'dtype', 'bytes')} {getattr(arr, 'shape', '')}"
        raise CodecError(f"section {name!r}: expected {dtype} {list(shape)}, found {got}")
    return arr


def stream_payload(sec: dict[str, Any], lengths: np.ndarray) -> memoryview:
    """The 'streams' payload, which the stream lengths must cover exactly."""
    payload = sec.get("streams")
    if not isinstance(payload, memoryview):
        raise CodecError("missing section 'streams'")
    if int(lengths.sum()) != len(payload):
        raise CodecError(f"stream lengths sum to {int(lengths.sum())} bytes, the payload has {len(payload)}")
    return payload


@dataclass(frozen=True)
class GridParts:
    """A grid object's checked side information and payload (arrays as stored: fp16, uint8, int16)."""

    sink_rows: int
    tops: list[list[int]]
    raw_bits: list[list[int]]
    outliers: list[int]          # per group, format 1 only (format 2 keeps escaped values in the streams)
    steps: np.ndarray            # fp16 [2, L, C]
    multipliers: np.ndarray      # fp16 [T]
    means: np.ndarray            # fp16 [2, L, C]
    classes: np.ndarray          # uint8 [2, L, C]
    cdfs: np.ndarray             # int16, every class CDF, group by group
    cdf_sizes: list[int]         # entries per group
    sink: np.ndarray             # fp16 [2, L, sink_rows, C]
    outlier_values: np.ndarray   # fp16 [sum(outliers)]
    per_group: list[int]         # streams per group
    lengths: np.ndarray          # int64 [streams]
    payload: memoryview


def parse_grid(h: dict[str, Any], sec: dict[str, Any], spec: LevelSpec, model: ModelFingerprint,
               tokens: int) -> GridParts:
    layers, channels = model.layers, model.kv_heads * model.head_dim
    groups = 2 * layers
    g = h.get("grid")
    try:
        sink_rows = int(g["sink_rows"])
        tops = [[int(t) for t in group] for group in g["tops"]]
        raw_bits = [[int(b) for b in group] for group in g["raw_bits"]]
        outliers = [int(n) for n in g["outliers"]] if spec.coder == "torchac" else [0] * groups
    except (KeyError, TypeError, ValueError):
        raise CodecError("header lacks a valid 'grid' table") from None
    if not (0 <= sink_rows <= tokens) or not (len(tops) == len(outliers) == groups):
        raise CodecError("header's 'grid' table does not fit the object's geometry")
    if any(not (1 <= len(t) <= min(channels, 256)) for t in tops) or any(
            not (0 <= x <= 127) for t in tops for x in t) or any(n < 0 for n in outliers) or [
            len(t) for t in tops] != [len(b) for b in raw_bits] or any(not (0 <= x <= 7) for b in raw_bits
                                                                   for x in b):
        raise CodecError("header's 'grid' table holds impossible values")
    blocks = -(-tokens // spec.tokens_per_stream)
    per_group = [blocks * len(t) for t in tops]
    st = h.get("streams")
    if not isinstance(st, dict) or st.get("count") != sum(per_group) or st.get(
            "tokens_per_stream") != spec.tokens_per_stream:
        raise CodecError(f"header's stream table disagrees with the geometry ({sum(per_group)} streams)")
    cdf_sizes = [sum(cdf_length(x, b) for x, b in zip(t, r)) for t, r in zip(tops, raw_bits)]
    lengths = section(sec, "stream_lengths", "uint32", (sum(per_group),)).astype(np.int64)
    parts = GridParts(
        sink_rows=sink_rows, tops=tops, raw_bits=raw_bits, outliers=outliers,
        steps=section(sec, "steps", "float16", (2, layers, channels)),
        multipliers=section(sec, "multipliers", "float16", (tokens,)),
        means=section(sec, "means", "float16", (2, layers, channels)),
        classes=section(sec, "classes", "uint8", (2, layers, channels)),
        cdfs=section(sec, "cdfs", "int16", (sum(cdf_sizes),)), cdf_sizes=cdf_sizes,
        sink=section(sec, "sink", "float16", (2, layers, sink_rows, channels)),
        outlier_values=(section(sec, "outliers", "float16", (sum(outliers),)) if spec.coder == "torchac"
                        else np.zeros(0, dtype=np.float16)),
        per_group=per_group, lengths=lengths, payload=stream_payload(sec, lengths))
    if not all(np.isfinite(a.astype(np.float32)).all() for a in (parts.steps, parts.multipliers, parts.means)):
        raise CodecError("grid side information holds non-finite steps, multipliers or means")
    return parts


@dataclass(frozen=True)
class CodedParts:
    """An entropy-coded absmax (CacheGen) object's checked side information and payload."""

    bins: tuple[list[int], list[int]]
    scales: np.ndarray           # fp16 [2, L, T]
    cdfs: list[np.ndarray]       # int16 [L, C, B_max + 1] for keys, values
    anchors: np.ndarray | None   # int8 [2, L, n_anchor, C] (delta levels)
    per_group: int               # streams per group
    lengths: np.ndarray          # int64 [streams]
    payload: memoryview


def parse_coded(h: dict[str, Any], sec: dict[str, Any], spec: LevelSpec, model: ModelFingerprint,
                tokens: int) -> CodedParts:
    layers, channels = model.layers, model.kv_heads * model.head_dim
    bins = header_bins(h, spec, layers)
    st = h.get("streams")
    if not isinstance(st, dict):
        raise CodecError("header lacks the 'streams' table of an entropy-coded level")
    if (st.get("tokens_per_stream"), st.get("channels_per_stream")) != (spec.tokens_per_stream,
                                                                       spec.channels_per_stream):
        raise CodecError("stream geometry in header disagrees with the level spec")
    n_anchor = -(-tokens // spec.delta_group) if spec.delta_group else 0
    blocks = -(-tokens // spec.tokens_per_stream)
    per_group = blocks * -(-channels // spec.channels_per_stream)
    n_streams = 2 * layers * per_group
    if st.get("count") != n_streams:
        raise CodecError(f"header announces {st.get('count')} streams, the geometry needs {n_streams}")
    lengths = section(sec, "stream_lengths", "uint32", (n_streams,)).astype(np.int64)
    payload = stream_payload(sec, lengths)
    return CodedParts(
        bins=bins, scales=section(sec, "scales", "float16", (2, layers, tokens)),
        cdfs=[section(sec, name, "int16", (layers, channels, max(bins[i]) + 1))
              for i, name in enumerate(("cdf_key", "cdf_value"))],
        anchors=(section(sec, "anchors", "int8", (2, layers, n_anchor, channels)) if spec.delta_group else None),
        per_group=per_group, lengths=lengths, payload=payload)
