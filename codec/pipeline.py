"""The per-(K/V, layer) pipeline of entropy-coded levels: quantize, transform, estimate CDFs, range-code.

Each (K or V, layer) *group* is independent: its scales, CDFs, anchors and streams depend on nothing else,
so groups are coded in parallel worker processes or in-process for small objects (`kvcast.codec.pool`), by the
same functions. A group travels as a small JSON description plus typed binary parts
(`kvcast.codec.packing.pack_parts`); `handle_encode_layer` / `handle_decode_layer` are the coder ops
(``encode_layer``, ``decode_layer``) that `kvcast.codec.ops` dispatches to.

Group tensor layout: ``[kv_heads, tokens, head_dim]`` as transformers holds one layer's K or V; the
quantizer works on ``[tokens, channels]`` with ``channels = kv_heads * head_dim`` (CacheGen merges heads).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvcast.codec.errors import CodecError
from kvcast.codec.packing import FP16_MAX, TORCH_DTYPES, block_rows, pack_parts, split_payload, unpack_parts
from kvcast.codec.rangecoder import StreamGroup, cachegen_cdf, check_cdf, decode_group, encode_group, iter_streams
from kvcast.codec.rans import StreamGeometry, back_to_back, cum_tables, decode_streams, encode_streams

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


# ---------------------------------------------------------------------------------- rANS stream groups


def rans_geometry(block_rows: tuple[int, ...], channels: int, channels_per_stream: int, *, lane_symbols: int,
                  max_lanes: int) -> StreamGeometry:
    """The rANS geometry of a group's streams (block-major, then channel group): symbol ``i`` of stream
    ``(block, channels c0:c1)`` is token ``i // (c1 - c0)`` of the block, channel ``c0 + i % (c1 - c0)``, and
    takes that channel's CDF row."""
    spans = list(iter_streams(block_rows, channels, channels_per_stream))
    return StreamGeometry.of(counts=[n * (c1 - c0) for _, n, c0, c1 in spans], row0=[c0 for _, _, c0, _ in spans],
                             period=[c1 - c0 for _, _, c0, c1 in spans], lane_symbols=lane_symbols,
                             max_lanes=max_lanes)


def encode_group_rans(symbols: np.ndarray, cdf: np.ndarray, block_rows: tuple[int, ...], channels_per_stream: int,
                      *, lane_symbols: int, max_lanes: int) -> tuple[bytes, list[int]]:
    """Encode the symbols ``[rows, channels]`` of one group as rANS streams; their bytes and lengths."""
    channels = symbols.shape[1]
    flat = [symbols[r0:r0 + n, c0:c1].reshape(-1) for r0, n, c0, c1 in iter_streams(block_rows, channels,
                                                                                     channels_per_stream)]
    geometry = rans_geometry(block_rows, channels, channels_per_stream, lane_symbols=lane_symbols,
                             max_lanes=max_lanes)
    cum, nsym = cum_tables([cdf])
    data, lengths = encode_streams(np.concatenate(flat) if flat else np.zeros(0, np.int16), geometry, cum, nsym)
    return data, [int(n) for n in lengths]


def decode_group_rans(cdf: np.ndarray, block_rows: tuple[int, ...], channels_per_stream: int, payload: bytes,
                      lengths: list[int], *, lane_symbols: int, max_lanes: int) -> np.ndarray:
    """Inverse of `encode_group_rans`: int16 ``[sum(block_rows), channels]``."""
    channels = cdf.shape[0]
    geometry = rans_geometry(block_rows, channels, channels_per_stream, lane_symbols=lane_symbols,
                             max_lanes=max_lanes)
    if len(lengths) != len(geometry.lanes):
        raise CodecError("group has the wrong number of streams")
    begin, end = back_to_back(np.asarray(lengths, dtype=np.int64))
    if end.size and int(end[-1]) != len(payload):
        raise CodecError("group's stream lengths do not cover its payload")
    cum, nsym = cum_tables([cdf])
    flat = decode_streams(payload, geometry, cum, nsym, begin, end)
    out = np.empty((int(sum(block_rows)), channels), dtype=np.int16)
    for (r0, n, c0, c1), a, b in zip(iter_streams(block_rows, channels, channels_per_stream), geometry.sym_start,
                                     geometry.sym_start[1:]):
        out[r0:r0 + n, c0:c1] = flat[a:b].reshape(n, c1 - c0)
    return out


# ----------------------------------------------------------------------------------------- one group


def encode_layer(x: torch.Tensor, *, bins: int, slots: int, delta_group: int, anchor_bins: int,
                 tokens_per_stream: int, channels_per_stream: int, coder: str = "torchac", lane_symbols: int = 0,
                 max_lanes: int = 32) -> dict[str, Any]:
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
    if coder == "rans":
        out["streams"], out["lengths"] = encode_group_rans(q.numpy(), cdf, rows, channels_per_stream,
                                                           lane_symbols=lane_symbols, max_lanes=max_lanes)
    else:
        streams = encode_group(StreamGroup(q.numpy(), cdf, rows, channels_per_stream))
        out["streams"], out["lengths"] = b"".join(streams), [len(b) for b in streams]
    return out


def decode_layer(parts: dict[str, Any], *, bins: int, slots: int, heads: int, tokens: int, head_dim: int,
                 delta_group: int, anchor_bins: int, tokens_per_stream: int, channels_per_stream: int,
                 out_dtype: str, coder: str = "torchac", lane_symbols: int = 0, max_lanes: int = 32) -> torch.Tensor:
    """Decode one group back to ``[heads, tokens, head_dim]`` in `out_dtype`."""
    channels = heads * head_dim
    scales, cdf, streams = parts["scales"], parts["cdf"], parts["streams"]
    if tuple(scales.shape) != (tokens,) or tuple(cdf.shape) != (channels, slots + 1):
        raise CodecError("group side information has the wrong shape")
    check_cdf(cdf)
    is_anchor = anchor_mask(tokens, delta_group)
    coded = ~is_anchor
    rows = block_rows(coded, tokens_per_stream)
    if coder == "rans":
        q = decode_group_rans(cdf, rows, channels_per_stream, streams, parts["lengths"], lane_symbols=lane_symbols,
                              max_lanes=max_lanes)
    else:
        q = decode_group(cdf, rows, channels_per_stream, split_payload(streams, parts["lengths"]))
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


# ------------------------------------------------------------------------------------------ coder ops


def handle_encode_layer(meta: dict, blob: bytes) -> tuple[dict, bytes]:
    parts = unpack_parts(meta["parts"], blob)
    x = parts["x"]
    res = encode_layer(x, **meta["params"])
    lengths = res.pop("lengths")
    parts_meta, out = pack_parts(res)
    return {"parts": parts_meta, "lengths": lengths}, out


def handle_decode_layer(meta: dict, blob: bytes) -> tuple[dict, bytes]:
    parts = unpack_parts(meta["parts"], blob)
    parts["lengths"] = meta["lengths"]
    y = decode_layer(parts, **meta["params"])
    parts_meta, out = pack_parts({"y": y})
    return {"parts": parts_meta}, out
