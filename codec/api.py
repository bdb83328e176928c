"""KV cache <-> bitstream: the codec's pipeline (layout, quantizer, transform, coder) driven by level specs.

KV layout everywhere: a list with one ``(key, value)`` pair per layer, each a tensor
``[1, kv_heads, tokens, head_dim]`` as transformers holds them (fp16, bf16 or fp32).

Header fields (JSON, see `kvcast.codec.container` for the binary layout)::

    codec      "kvcast"
    level      the full LevelSpec of the level used (the decoder reads it, not its own tables)
    model      fingerprint (`kvcast.codec.fingerprint`): name, layers, kv_heads, head_dim, dtype, rope (or null)
    tokens     {"start": first token position, "count": tokens}
    dtype      the input dtype, restored by decode() unless told otherwise
    bins       {"key": [bins per layer], "value": [...]} (quantized levels)
    streams    {"count", "tokens_per_stream", "channels_per_stream", "order"} (entropy-coded levels)
    sections   the body's sections (container)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvcast.codec.container import Section, Unpacked, pack, unpack
from kvcast.codec.errors import CodecError
from kvcast.codec.fingerprint import ModelFingerprint
from kvcast.codec.gpu import decode_batch
from kvcast.codec.grid import channel_steps, token_multipliers
from kvcast.codec.header import header_basics, header_bins, parse_coded, parse_grid, section
from kvcast.codec.levels import LevelRegistry, LevelSpec
from kvcast.codec.packing import FP16_MAX as _FP16_MAX
from kvcast.codec.packing import pack_parts, split_payload, unpack_parts
from kvcast.codec.pipeline import dequantize_absmax, quantize_absmax
from kvcast.codec.pool import CoderPool
from kvcast.codec.sensitivity import SensitivityTable, TableRegistry, find_synthesis

KV = list[tuple[torch.Tensor, torch.Tensor]]
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
STREAM_ORDER = "kv,layer,token_block,channel_group"
GRID_STREAM_ORDER = "kv,layer,token_block,class"


# ----------------------------------------------------------------------------------------------- layout


def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise CodecError(f"unsupported KV dtype {dtype}; use float16, bfloat16 or float32")


def check_kv(kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, int, int, int, str]:
    """Check the structure of `kv`; return (layers, kv_heads, tokens, head_dim, dtype name)."""
    if not isinstance(kv, (list, tuple)) or not kv:
        raise CodecError("kv must be a non-empty list of (key, value) pairs, one per layer")
    shape = dtype = None
    for i, pair in enumerate(kv):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise CodecError(f"layer {i}: expected a (key, value) pair")
        for name, t in zip(("key", "value"), pair):
            if not isinstance(t, torch.Tensor):
                raise CodecError(f"layer {i} {name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4 or t.shape[0] != 1:
                raise CodecError(f"layer {i} {name}: shape {tuple(t.shape)}, expected [1, kv_heads, tokens, head_dim]")
            shape = shape or tuple(t.shape)
            dtype = dtype or t.dtype
            if tuple(t.shape) != shape:
                raise CodecError(f"layer {i} {name}: shape {tuple(t.shape)} differs from layer 0's {shape}")
            if t.dtype != dtype:
                raise CodecError(f"layer {i} {name}: dtype {t.dtype} differs from {dtype}")
    name = _dtype_name(dtype)
    if shape[2] < 1 or shape[1] < 1 or shape[3] < 1:
        raise CodecError(f"empty KV tensors of shape {shape}")
    return len(kv), shape[1], shape[2], shape[3], name


def stack_kv(kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, str]:
    """Check `kv` and stack it to float32 ``[2, layers, tokens, kv_heads * head_dim]`` (K first)."""
    name = check_kv(kv)[4]
    rows = [torch.stack([k[0], v[0]]) for k, v in kv]
    x = torch.stack(rows, dim=1).to(device="cpu", dtype=torch.float32)  # [2, L, H, T, D]
    if not torch.isfinite(x).all():
        raise CodecError("KV contains NaN or infinite values")
    two, layers, heads, tokens, dim = x.shape
    return x.permute(0, 1, 3, 2, 4).reshape(2, layers, tokens, heads * dim).contiguous(), name


def unstack_kv(x: torch.Tensor, heads: int, dtype: torch.dtype, device: str | torch.device) -> KV:
    """Inverse of `stack_kv`: ``[2, L, T, H*D]`` -> list of ``([1,H,T,D], [1,H,T,D])``."""
    two, layers, tokens, channels = x.shape
    y = x.reshape(2, layers, tokens, heads, channels // heads).permute(0, 1, 3, 2, 4).to(dtype)
    y = y.to(device)
    return [(y[0, i].unsqueeze(0).contiguous(), y[1, i].unsqueeze(0).contiguous()) for i in range(layers)]


# ------------------------------------------------------------------------------------------------ codec


class Codec:
    """Encodes and decodes KV caches with the levels of a registry, coding streams on a `CoderPool`."""

    def __init__(self, registry: LevelRegistry | None = None, pool: CoderPool | None = None,
                 tables: TableRegistry | None = None) -> None:
        self.registry = registry or LevelRegistry.default()
        self.pool = pool or CoderPool()
        self.tables = tables or TableRegistry()

    def levels(self) -> list[str]:
        return self.registry.names()

    def describe(self, level: str) -> dict[str, Any]:
        return self.registry.get(level).to_dict()

    # -- encode --------------------------------------------------------------------------------------

    def encode(self, kv: Sequence[tuple[torch.Tensor, torch.Tensor]], level: str | LevelSpec, *,
               model: ModelFingerprint | None = None, token_start: int = 0, context_end: int | None = None,
               sensitivity: SensitivityTable | None = None) -> bytes:
        """Encode `kv` at `level` into one self-describing object.

        `context_end` is the position after the context's last token (default: the object's end); grid levels
        spend more bits on tokens near it. `sensitivity` overrides the table grid levels find by `model`.
        """
        spec = level if isinstance(level, LevelSpec) else self.registry.get(level)
        layers, heads, tokens, head_dim, dtype_name = check_kv(kv)
        if model is None:
            model = ModelFingerprint(name="", layers=layers, kv_heads=heads, head_dim=head_dim, dtype=dtype_name)
        elif (model.layers, model.kv_heads, model.head_dim) != (layers, heads, head_dim):
            raise CodecError(f"KV shape (layers={layers}, kv_heads={heads}, head_dim={head_dim}) does not match "
                             f"model {model.name!r} ({model.layers}, {model.kv_heads}, {model.head_dim})")
        if not isinstance(token_start, int) or token_start < 0:
            raise CodecError(f"token_start must be a non-negative int, got {token_start!r}")
        header: dict[str, Any] = {"codec": "kvcast", "level": spec.to_dict(), "model": model.to_dict(),
                                  "tokens": {"start": token_start, "count": tokens}, "dtype": dtype_name}
        if spec.quantizer == "grid":
            if context_end is None:
                context_end = token_start + tokens
            if not isinstance(context_end, int) or context_end < token_start + 1:
                raise CodecError(f"context_end must be an int past the object's first token, got {context_end!r}")
            table = sensitivity if sensitivity is not None else self.tables.find(model)
            if table.key.shape != (layers, heads, head_dim):
                raise CodecError(f"sensitivity table shape {table.key.shape} does not match the KV's")
            return self._encode_grid(kv, spec, header, table, token_start, context_end,
                                     (layers, heads, tokens, head_dim))
        if spec.quantizer == "fp16":
            x, _ = stack_kv(kv)
            if (x.abs() > _FP16_MAX).any():
                raise CodecError("KV values exceed the fp16 range; level 'raw' stores fp16")
            values = x.reshape(2, layers, tokens, heads, head_dim).permute(0, 1, 3, 2, 4).to(torch.float16)
            return pack(header, [Section("values", values.contiguous().numpy(), role="payload")])
        kbins, vbins = spec.bins_per_layer(layers)
        header["bins"] = {"key": list(kbins), "value": list(vbins)}
        half = torch.tensor([kbins, vbins], dtype=torch.float32).div(2).sub(1).view(2, layers, 1, 1)
        if spec.coder == "none":
            q, s16 = quantize_absmax(stack_kv(kv)[0], half)
            payload = (q - half.to(torch.int16)).to(torch.int8)
            return pack(header, [Section("scales", s16.numpy()), Section("values", payload.numpy(), "payload")])
        return self._encode_coded(kv, spec, header, (kbins, vbins), tokens, heads * head_dim)

    def _group_params(self, spec: LevelSpec, bins: tuple[Sequence[int], Sequence[int]]):
        common = {"delta_group": spec.delta_group, "anchor_bins": spec.anchor_bins,
                  "tokens_per_stream": spec.tokens_per_stream, "channels_per_stream": spec.channels_per_stream,
                  "coder": spec.coder, "lane_symbols": spec.lane_symbols, "max_lanes": spec.max_lanes}
        for kv in range(2):
            slots = max(bins[kv])  # CacheGen: Lp = B_max + 1 for every layer of K (resp. V)
            for layer, b in enumerate(bins[kv]):
                yield kv, layer, dict(common, bins=b, slots=slots)

    def _encode_coded(self, kv, spec: LevelSpec, header: dict[str, Any], bins, tokens: int, channels: int) -> bytes:
        calls = []
        for i, layer, params in self._group_params(spec, bins):
            parts_meta, blob = pack_parts({"x": kv[layer][i][0]})
            calls.append(({"op": "encode_layer", "parts": parts_meta, "params": params}, blob))
        results = self.pool.run(calls, total_symbols=2 * len(kv) * tokens * channels)
        layers = len(kv)
        scales, cdfs, anchors, streams = [], ([], []), [], []
        for (reply, data), (i, _, _) in zip(results, self._group_params(spec, bins)):
            parts = unpack_parts(reply["parts"], data)
            scales.append(parts["scales"])
            cdfs[i].append(parts["cdf"])
            if spec.delta_group:
                anchors.append(parts["anchors"])
            streams.extend(split_payload(parts["streams"], reply["lengths"]))
        header["streams"] = {"count": len(streams), "tokens_per_stream": spec.tokens_per_stream,
                             "channels_per_stream": spec.channels_per_stream, "order": STREAM_ORDER}
        sections = [Section("scales", torch.stack(scales).view(2, layers, tokens).numpy()),
                    Section("cdf_key", np.stack(cdfs[0])), Section("cdf_value", np.stack(cdfs[1])),
                    Section("stream_lengths", np.array([len(s) for s in streams], dtype=np.uint32))]
        if spec.delta_group:
            sections.append(Section("anchors", np.stack(anchors).reshape(2, layers, *anchors[0].shape), "payload"))
        sections.append(Section("streams", b"".join(streams), role="payload"))
        return pack(header, sections)

    def _encode_grid(self, kv, spec: LevelSpec, header: dict[str, Any], table: SensitivityTable, token_start: int,
                     context_end: int, shape: tuple[int, int, int, int]) -> bytes:
        layers, heads, tokens, head_dim = shape
        channels = heads * head_dim
        sink_rows = max(0, min(tokens, spec.sink_tokens - token_start))
        if spec.basis:
            if table.basis is None:
                raise CodecError(f"level {spec.name!r} codes in the sensitivity table's basis, and the table for "
                                 f"{table.describe()} has none: recalibrate it (`kvcast calibrate`)")
            steps = channel_steps(np.full((2, layers, channels), table.basis_scale), spec.step)  # one step
            basis = torch.from_numpy(table.basis)                                           # [2, L, H, D, D]
        else:
            steps = channel_steps(table.channel_fisher(), spec.step)           # fp16 [2, L, C]
        keys = torch.stack([k[0] for k, _ in kv]).to(torch.float32).numpy() if spec.recency else None
        mult = token_multipliers(table, token_start, tokens, context_end, spec.recency, keys)
        params = {"sink_rows": sink_rows, "tokens_per_stream": spec.tokens_per_stream, "rounding": spec.rounding,
                  "coder": spec.coder, "lane_symbols": spec.lane_symbols, "max_lanes": spec.max_lanes}
        calls = []
        for i in range(2):
            for layer in range(layers):
                parts = {"x": kv[layer][i][0], "steps": steps[i, layer], "multipliers": mult}
                if spec.basis:
                    parts["basis"] = basis[i, layer]
                parts_meta, blob = pack_parts(parts)
                calls.append(({"op": "encode_grid", "parts": parts_meta, "params": params}, blob))
        results = self.pool.run(calls, total_symbols=2 * layers * tokens * channels)
        groups = [(reply, unpack_parts(reply["parts"], data)) for reply, data in results]
        streams: list[bytes] = []
        for reply, parts in groups:
            streams.extend(split_payload(parts["streams"], reply["lengths"]))
        header["grid"] = {"context_end": context_end, "sink_rows": sink_rows,
                          "tops": [[int(t) for t in reply["tops"]] for reply, _ in groups],
                          "raw_bits": [[int(b) for b in reply["raw_bits"]] for reply, _ in groups]}
        if spec.basis:
            header["grid"]["basis"] = table.basis_digest
        in_streams = spec.coder == "rans"  # format 2 keeps escaped values in their streams
        if not in_streams:
            header["grid"]["outliers"] = [int(p["outliers"].numel()) for _, p in groups]
        header["streams"] = {"count": len(streams), "tokens_per_stream": spec.tokens_per_stream,
                             "order": GRID_STREAM_ORDER}
        sections = [
            Section("steps", steps.numpy()), Section("multipliers", mult.numpy()),
            Section("means", torch.stack([p["mean"] for _, p in groups]).view(2, layers, channels).numpy()),
            Section("classes", np.stack([p["classes"] for _, p in groups]).reshape(2, layers, channels)),
            Section("cdfs", np.concatenate([p["cdf"] for _, p in groups])),
            Section("stream_lengths", np.array([len(s) for s in streams], dtype=np.uint32)),
            Section("sink", torch.stack([p["sink"] for _, p in groups]).view(2, layers, sink_rows, channels).numpy(),
                    "payload"),
            Section("streams", b"".join(streams), role="payload")]
        if not in_streams:
            sections.insert(-1, Section("outliers", torch.cat([p["outliers"] for _, p in groups]).numpy(), "payload"))
        return pack(header, sections)

    def _decode_grid(self, h: dict[str, Any], sec, spec: LevelSpec, model: ModelFingerprint, tokens: int,
                     out_dtype: torch.dtype, device, sensitivity: SensitivityTable | None = None) -> KV:
        layers, heads, dim = model.layers, model.kv_heads, model.head_dim
        p = parse_grid(h, sec, spec, model, tokens)
        offsets = np.concatenate([[0], np.cumsum(p.lengths)])
        first_stream = np.concatenate([[0], np.cumsum(p.per_group)])
        cdf_pos = np.concatenate([[0], np.cumsum(p.cdf_sizes)])
        out_pos = np.concatenate([[0], np.cumsum(p.outliers)])
        dtype_name = str(out_dtype).removeprefix("torch.")
        steps, mult, means, sink, outliers = (torch.from_numpy(a.copy()) for a in (
            p.steps, p.multipliers, p.means, p.sink, p.outlier_values))
        synthesis = torch.from_numpy(self.synthesis_for(h, model, sensitivity)) if spec.basis else None
        calls = []
        for gi in range(2 * layers):
            i, layer = divmod(gi, layers)
            s0, s1 = first_stream[gi], first_stream[gi + 1]
            parts = {"steps": steps[i, layer], "multipliers": mult, "mean": means[i, layer],
                     "classes": p.classes[i, layer], "cdf": p.cdfs[cdf_pos[gi]:cdf_pos[gi + 1]],
                     "sink": sink[i, layer], "outliers": outliers[out_pos[gi]:out_pos[gi + 1]],
                     "streams": p.payload[offsets[s0]:offsets[s1]]}
            if synthesis is not None:
                parts["synthesis"] = synthesis[i, layer]
            parts_meta, blob = pack_parts(parts)
            params = {"tops": p.tops[gi], "raw_bits": p.raw_bits[gi], "sink_rows": p.sink_rows, "heads": heads,
                      "tokens": tokens, "head_dim": dim, "tokens_per_stream": spec.tokens_per_stream,
                      "out_dtype": dtype_name, "coder": spec.coder, "lane_symbols": spec.lane_symbols,
                      "max_lanes": spec.max_lanes}
            calls.append(({"op": "decode_grid", "parts": parts_meta, "params": params,
                           "lengths": [int(n) for n in p.lengths[s0:s1]]}, blob))
        results = self.pool.run(calls, total_symbols=2 * layers * tokens * heads * dim)
        ys = [unpack_parts(reply["parts"], data)["y"] for reply, data in results]
        return [(ys[layer].unsqueeze(0).to(device), ys[layers + layer].unsqueeze(0).to(device))
                for layer in range(layers)]

    def synthesis_for(self, header: dict[str, Any], model: ModelFingerprint,
                      sensitivity: SensitivityTable | None = None) -> np.ndarray:
        """float32 ``[2, layers, kv_heads, head_dim, head_dim]``: the synthesis transforms of the basis an
        object was coded in (its header's ``grid.basis`` digest): from `sensitivity`, one of the codec's tables,
        or a flat table's identity (`kvcast.codec.sensitivity.find_synthesis`)."""
        tables = [sensitivity] if sensitivity is not None else []
        try:
            return find_synthesis((header.get("grid") or {}).get("basis"),
                                  (model.layers, model.kv_heads, model.head_dim), [*tables, *self.tables.tables()])
        except CodecError as exc:
            raise CodecError(f"{exc} (model {model.name!r}; tables searched: "
                             f"{', '.join(str(f) for f in self.tables.folders) or 'none'})") from None

    # -- decode --------------------------------------------------------------------------------------

    def decode(self, data: bytes | memoryview, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               *, expect_model: ModelFingerprint | None = None, sensitivity: SensitivityTable | None = None) -> KV:
        """Decode an object to a KV list; `CodecError` for anything corrupt, truncated or mismatched. On a CUDA
        `device`, format-2 entropy-coded objects decode on the GPU (`kvcast.codec.gpu`, bit-exact with the CPU;
        a basis level's synthesis is one float32 matrix product per head there). `sensitivity`: the table a
        basis level was encoded with, where the codec's tables (`Codec.tables`) do not have it."""
        obj = unpack(data)
        h = obj.header
        spec, model, tokens = header_basics(h)
        if spec.coder == "rans" and obj.version < 2:
            raise CodecError("a format-1 object names the rANS coder, which format 1 does not have: corrupt object")
        if expect_model is not None and not expect_model.same_shape(model):
            raise CodecError(f"object is for model shape {model} but {expect_model} was expected")
        if expect_model is not None and expect_model.rope and model.rope and expect_model.rope != model.rope:
            raise CodecError(f"object's RoPE parameters {model.rope} differ from the model's {expect_model.rope}")
        out_dtype = dtype or _DTYPES.get(h.get("dtype"), None)
        if out_dtype is None:
            raise CodecError(f"unknown dtype {h.get('dtype')!r} in header")
        layers, heads, dim = model.layers, model.kv_heads, model.head_dim
        channels = heads * dim
        sec = obj.sections
        if spec.coder == "rans" and torch.device(device).type == "cuda":
            return decode_batch([obj], device, out_dtype,   # one launch, dequantization fused
                                synthesis=lambda digest: self.synthesis_for(h, model, sensitivity))[0]
        if spec.quantizer == "grid":
            return self._decode_grid(h, sec, spec, model, tokens, out_dtype, device, sensitivity)
        if spec.quantizer == "fp16":
            values = section(sec, "values", "float16", (2, layers, heads, tokens, dim))
            x = torch.from_numpy(values.copy()).permute(0, 1, 3, 2, 4).reshape(2, layers, tokens, channels)
            return unstack_kv(x.to(torch.float32), heads, out_dtype, device)
        kbins, vbins = header_bins(h, spec, layers)
        half = torch.tensor([kbins, vbins], dtype=torch.float32).div(2).sub(1).view(2, layers, 1, 1)
        scales = torch.from_numpy(section(sec, "scales", "float16", (2, layers, tokens)).copy())
        if spec.coder == "none":
            vals = torch.from_numpy(section(sec, "values", "int8", (2, layers, tokens, channels)).copy())
            x = dequantize_absmax(vals.to(torch.int16) + half.to(torch.int16), scales, half)
            return unstack_kv(x, heads, out_dtype, device)
        return self._decode_coded(h, sec, spec, (kbins, vbins), model, tokens, scales, out_dtype, device)

    def _decode_coded(self, h, sec, spec: LevelSpec, bins, model: ModelFingerprint, tokens: int,
                      scales: torch.Tensor, out_dtype: torch.dtype, device) -> KV:
        layers, heads, dim = model.layers, model.kv_heads, model.head_dim
        p = parse_coded(h, sec, spec, model, tokens)
        offsets = np.concatenate([[0], np.cumsum(p.lengths)])
        per_group = p.per_group
        coded_tokens = tokens - (-(-tokens // spec.delta_group) if spec.delta_group else 0)
        dtype_name = str(out_dtype).removeprefix("torch.")
        calls = []
        for g, (i, layer, params) in enumerate(self._group_params(spec, bins)):
            lo, hi = offsets[g * per_group], offsets[(g + 1) * per_group]
            parts = {"scales": scales[i, layer], "cdf": p.cdfs[i][layer], "streams": p.payload[lo:hi]}
            if p.anchors is not None:
                parts["anchors"] = p.anchors[i, layer]
            parts_meta, blob = pack_parts(parts)
            params = dict(params, heads=heads, tokens=tokens, head_dim=dim, out_dtype=dtype_name)
            calls.append(({"op": "decode_layer", "parts": parts_meta, "params": params,
                           "lengths": [int(n) for n in p.lengths[g * per_group:(g + 1) * per_group]]}, blob))
        results = self.pool.run(calls, total_symbols=2 * layers * coded_tokens * heads * dim)
        ys = [unpack_parts(reply["parts"], data)["y"] for reply, data in results]
        return [(ys[layer].unsqueeze(0).to(device), ys[layers + layer].unsqueeze(0).to(device))
                for layer in range(layers)]

    # -- inspect -------------------------------------------------------------------------------------

    def inspect(self, data: bytes | memoryview) -> dict[str, Any]:
        """The object's header (checked), plus sizes by role, value count and bits per value."""
        obj = unpack(data)
        spec, model, tokens = header_basics(obj.header)
        return inspect_unpacked(obj, model, tokens)


def inspect_unpacked(obj: Unpacked, model: ModelFingerprint, tokens: int) -> dict[str, Any]:
    values = 2 * model.layers * model.kv_heads * model.head_dim * tokens
    info = {k: v for k, v in obj.header.items()}
    info["sizes"] = {"header": obj.header_bytes, "side": obj.side_bytes, "payload": obj.payload_bytes,
                     "total": obj.total_bytes}
    info["values"] = values
    info["bits_per_value"] = 8 * obj.total_bytes / values
    info["bits_per_value_payload"] = 8 * obj.payload_bytes / values
    return info


@functools.cache
def default_codec() -> Codec:
    """The process-wide codec behind `kvcast.codec.encode`/`decode` (built-in levels, one coder process per core)."""
    return Codec()
