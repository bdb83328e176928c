"""The per-(K/V, layer) pipeline of entropy-coded levels: quantize, transform, estimate CDFs, range-code.

Each (K or V, layer) *group* is independent: its scales, CDFs, anchors and streams depend on nothing else,
so groups are coded in parallel worker processes (`kvcast.codec.worker`) or in-process for small objects, by the
same functions. A group travels as a small JSON description plus typed binary parts (`pack_parts`).

Group tensor layout: ``[kv_heads, tokens, head_dim]`` as transformers holds one layer's K or V; the
quantizer works on ``[tokens, channels]`` with ``channels = kv_heads * head_dim`` (CacheGen merges heads).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
import torch

from kvcast.codec.entropy import StreamGroup, cachegen_cdf, check_cdf, decode_group, encode_group
from kvcast.codec.errors import CodecError

FP16_MAX = 65504.0
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "int8": torch.int8, "int16": torch.int16, "uint32": torch.int32}
NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32, "int8": np.int8, "int16": np.int16,
                "uint32": np.uint32, "uint8": np.uint8}


# --------------------------------------------------------------------------------------- binary parts


def pack_parts(parts: dict[str, torch.Tensor | np.ndarray | bytes]) -> tuple[list, bytes]:
    """Describe and concatenate named arrays/bytes: ``([[name, dtype, shape, nbytes], ...], blob)``."""
    meta, blobs = [], []
    for name, value in parts.items():
        if isinstance(value, (bytes, bytearray, memoryview)):
            raw, dtype, shape = bytes(value), "bytes", [len(value)]
        elif isinstance(value, torch.Tensor):
            t = value.contiguous().cpu()
            dtype = str(t.dtype).removeprefix("torch.")
            shape = list(t.shape)
            raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        else:
            arr = np.ascontiguousarray(value)
            raw, dtype, shape = arr.tobytes(), arr.dtype.name, list(arr.shape)
        meta.append([name, dtype, shape, len(raw)])
        blobs.append(raw)
    return meta, b"".join(blobs)


def unpack_parts(meta: list, blob: bytes) -> dict[str, Any]:
    """Inverse of `pack_parts`: torch tensors (float/bf16), numpy arrays (ints) or bytes."""
    out: dict[str, Any] = {}
    pos = 0
    for name, dtype, shape, n in meta:
        chunk = blob[pos:pos + n]
        pos += n
        if dtype == "bytes":
            out[name] = chunk
        elif dtype == "bfloat16":
            out[name] = torch.frombuffer(bytearray(chunk), dtype=torch.bfloat16).reshape(shape)
        elif dtype in ("float16", "float32"):
            out[name] = torch.from_numpy(np.frombuffer(chunk, dtype=NUMPY_DTYPES[dtype]).reshape(shape).copy())
        else:
            out[name] = np.frombuffer(chunk, dtype=NUMPY_DTYPES[dtype]).reshape(shape)
    if pos != len(blob):
        raise CodecError("worker message parts do not cover the blob")
    return out


# ------------------------------------------------------------------------------------------ quantizer


def fp16_scale(absmax: torch.Tensor) -> torch.Tensor:
    """Round scales up to fp16 so that |x| <= scale still holds (the quantizer never clips)."""
    if (absmax > FP16_MAX).any():
        raise CodecError(f"a token's absmax exceeds the fp16 range ({float(absmax.max()):.4g} > {FP16_MAX})")
    s = absmax.to(torch.float16)
    low = s.to(torch.float32) < absmax
    if low.any():
        s = torch.where(low, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
    return s


def quantize_absmax(x: torch.Tensor, half_levels: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CacheGen's per-token absmax quantizer on float32 ``[..., T, C]``.

    Returns int16 symbols ``round(x * M / s + M)`` in ``[0, 2M]`` (M = `half_levels`, a number or a tensor
    broadcastable to ``[..., 1, 1]``) and fp16 scales ``s`` ``[..., T]``. An all-zero token gets scale 0 and
    symbols M (no division by zero). NaN or infinite input raises `CodecError`.
    """
    absmax = x.abs().amax(dim=-1)
    if not torch.isfinite(absmax).all():  # NaN and inf propagate into the absmax
        raise CodecError("KV contains NaN or infinite values")
    s16 = fp16_scale(absmax)
    s = s16.to(torch.float32).unsqueeze(-1)
    ratio = torch.where(s > 0, half_levels / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    q = torch.addcmul(torch.as_tensor(half_levels, dtype=torch.float32), x, ratio).round_()
    if isinstance(half_levels, torch.Tensor):
        q = torch.minimum(q.clamp_(min=0), 2 * half_levels)
    else:
        q.clamp_(0, 2 * half_levels)
    return q.to(torch.int16), s16


def dequantize_absmax(q: torch.Tensor | np.ndarray, scales: torch.Tensor, half_levels: float) -> torch.Tensor:
    q = torch.as_tensor(q).to(torch.float32)
    return (q - half_levels) * (scales.to(torch.float32).unsqueeze(-1) / half_levels)


def anchor_mask(tokens: int, delta_group: int) -> torch.Tensor:
    """True at anchor tokens (the first of each group of `delta_group` tokens); all False without deltas."""
    mask = torch.zeros(tokens, dtype=torch.bool)
    if delta_group:
        mask[::delta_group] = True
    return mask


def block_rows(coded: torch.Tensor, tokens_per_stream: int) -> tuple[int, ...]:
    """Coded tokens per stream block of `tokens_per_stream` tokens."""
    tokens = coded.shape[0]
    counts = torch.zeros(-(-tokens // tokens_per_stream), dtype=torch.int64)
    counts.index_add_(0, torch.arange(tokens) // tokens_per_stream, coded.to(torch.int64))
    return tuple(int(c) for c in counts)


# ----------------------------------------------------------------------------------------- one group


def encode_layer(x: torch.Tensor, *, bins: int, slots: int, delta_group: int, anchor_bins: int,
                 tokens_per_stream: int, channels_per_stream: int) -> dict[str, Any]:
    """Encode one (K/V, layer) group ``[heads, tokens, head_dim]``.

    Returns ``scales`` (fp16 [T]: the anchor's scale at anchors, the delta's elsewhere), ``cdf`` (int16
    [C, slots + 1]), ``anchors`` (int8 [n_anchors, C], delta levels only) and the coded ``streams``.
    """
    heads, tokens, dim = x.shape
    x = x.to(torch.float32).permute(1, 0, 2).reshape(tokens, heads * dim)
    half = bins / 2 - 1
    out: dict[str, Any] = {}
    is_anchor = anchor_mask(tokens, delta_group)
    if delta_group:
        a_half = anchor_bins / 2 - 1
        qa, sa = quantize_absmax(x[is_anchor], a_half)
        xa = dequantize_absmax(qa, sa, a_half)
        x = x - xa[torch.arange(tokens) // delta_group]
        q, s16 = quantize_absmax(x, half)
        s16[is_anchor] = sa
        out["anchors"] = (qa - int(a_half)).to(torch.int8).numpy()
        q = q[~is_anchor]
    else:
        q, s16 = quantize_absmax(x, half)
    channels = q.shape[1]
    idx = q.to(torch.int32) + torch.arange(0, channels * slots, slots, dtype=torch.int32)
    counts = torch.bincount(idx.reshape(-1), minlength=channels * slots).view(channels, slots)
    cdf = cachegen_cdf(counts).numpy()
    rows = block_rows(~is_anchor, tokens_per_stream)
    out["scales"] = s16
    out["cdf"] = cdf
    out["streams"] = encode_group(StreamGroup(q.numpy(), cdf, rows, channels_per_stream))
    return out


def decode_layer(parts: dict[str, Any], *, bins: int, slots: int, heads: int, tokens: int, head_dim: int,
                 delta_group: int, anchor_bins: int, tokens_per_stream: int, channels_per_stream: int,
                 out_dtype: str) -> torch.Tensor:
    """Decode one group back to ``[heads, tokens, head_dim]`` in `out_dtype`."""
    channels = heads * head_dim
    scales, cdf, streams = parts["scales"], parts["cdf"], parts["streams"]
    if tuple(scales.shape) != (tokens,) or tuple(cdf.shape) != (channels, slots + 1):
        raise CodecError("group side information has the wrong shape")
    check_cdf(cdf)
    is_anchor = anchor_mask(tokens, delta_group)
    coded = ~is_anchor
    rows = block_rows(coded, tokens_per_stream)
    q = decode_group(cdf, rows, channels_per_stream, streams)
    half = bins / 2 - 1
    if q.size and (int(q.max()) > 2 * half or int(q.min()) < 0):
        raise CodecError("decoded symbol out of range for its layer: corrupt stream")
    x = torch.empty(tokens, channels, dtype=torch.float32)
    x[coded] = dequantize_absmax(q, scales[coded], half)
    if delta_group:
        a_half = anchor_bins / 2 - 1
        anchors = parts["anchors"]
        n_anchor = int(is_anchor.sum())
        if tuple(anchors.shape) != (n_anchor, channels):
            raise CodecError("anchor section has the wrong shape")
        xa = dequantize_absmax(anchors.astype(np.int16) + int(a_half), scales[is_anchor], a_half)
        x[coded] += xa[torch.arange(tokens)[coded] // delta_group]
        x[is_anchor] = xa
    return x.reshape(tokens, heads, head_dim).permute(1, 0, 2).to(TORCH_DTYPES[out_dtype]).contiguous()


# --------------------------------------------------------------------------------- worker protocol


def handle_encode(meta: dict, blob: bytes) -> tuple[dict, bytes]:
    parts = unpack_parts(meta["parts"], blob)
    x = parts["x"]
    res = encode_layer(x, **meta["params"])
    streams = res.pop("streams")
    res["streams"] = b"".join(streams)
    parts_meta, out = pack_parts(res)
    return {"parts": parts_meta, "lengths": [len(s) for s in streams]}, out


def split_payload(payload: bytes | memoryview, lengths: Sequence[int]) -> list:
    """Cut a concatenation of streams back into streams of the given lengths."""
    out, pos = [], 0
    for n in lengths:
        out.append(payload[pos:pos + n])
        pos += n
    return out


def handle_decode(meta: dict, blob: bytes) -> tuple[dict, bytes]:
    parts = unpack_parts(meta["parts"], blob)
    parts["streams"] = split_payload(parts["streams"], meta["lengths"])
    y = decode_layer(parts, **meta["params"])
    parts_meta, out = pack_parts({"y": y})
    return {"parts": parts_meta}, out


@functools.cache
def handlers() -> dict:
    """Coder ops by name: this module's per-layer ops and `kvcast.codec.grid`'s (imported here, not at the top,
    because `kvcast.codec.grid` builds on this module)."""
    from kvcast.codec.grid import handle_decode_grid, handle_encode_grid

    return {"encode_layer": handle_encode, "decode_layer": handle_decode, "encode_grid": handle_encode_grid,
            "decode_grid": handle_decode_grid}


def handle(meta: dict, blob: bytes) -> tuple[dict, bytes]:
    """Run one request (in a worker or in-process)."""
    op = meta.get("op")
    if op == "ping":
        return {}, b""
    try:
        handler = handlers()[op]
    except KeyError:
        raise CodecError(f"unknown coder op {op!r}") from None
    return handler(meta, blob)
