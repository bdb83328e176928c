"""The ``grid`` quantizer: sensitivity-weighted uniform grids, class-shared CDFs, range coding.

One (K/V, layer) group ``[heads, tokens, head_dim]`` is coded as ``[tokens, channels]``:

* every channel ``c`` has its own step ``step_c`` (from the model's sensitivity table, chosen by the encoder
  and shipped as fp16) and its own mean ``mu_c`` (fp16); every token ``t`` a step multiplier ``m_t`` (fp16,
  shared by all groups of the object). A value becomes the symbol ``q = round((x - mu_c) / (step_c * m_t))``
  and is decoded as ``mu_c + q * step_c * m_t``: the error is at most half a step.
* tokens before the object's ``sink_rows`` (the model's attention sinks, absolute positions below the
  level's ``sink_tokens``) are stored as fp16, not quantized.
* symbols are range-coded with torchac. Channels are put in classes by the spread of their symbols (half an
  octave apart); each class has one CDF estimated from the object and shipped, so side information stays
  small while each channel still gets a distribution of its own width.
* a class whose symbols spread widely stores their low bits raw (`low_bits`) and range-codes the rest.
* a class's symbols are bounded by its ``top`` (escape level: about one value in 10,000 is beyond it, and at
  most `ESCAPE`); values with ``|q| >= top`` are coded as ``+-top`` and stored exactly (fp16) in order.

Streams are independent per (token block, class): the symbols of a class's channels (ascending channel order)
in a block, token-major. A stream's CDF has only its class's ``2 top + 1`` symbols, so narrow classes cost
little side information and little range-coder time however wide the widest class of the group is.

`handle_encode_grid` / `handle_decode_grid` are the coder ops (``encode_grid``, ``decode_grid``) that
`kvcast.codec.ops` dispatches to. This module builds on `kvcast.codec.packing` and `kvcast.codec.rangecoder`
only, never on the CacheGen pipeline (`kvcast.codec.pipeline`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvcast.codec.errors import CodecError
from kvcast.codec.packing import FP16_MAX, TORCH_DTYPES, block_rows, pack_parts, split_payload, unpack_parts
from kvcast.codec.rangecoder import cachegen_cdf, check_cdf, torchac_backend
from kvcast.codec.rans import StreamGeometry, cum_tables, decode_streams, encode_streams

ESCAPE = 127
ESCAPE_RATE = 1e-4
CLASS_OCTAVE_STEPS = 2   # classes per octave of symbol spread
MIN_SPREAD = 0.05
RAW_MARGIN_BITS = 1      # low bits go raw while the symbol spread is >= 2 * 2^bits


def _coded_rows(tokens: int, sink_rows: int, tokens_per_stream: int) -> tuple[int, ...]:
    """Quantized (non-sink) tokens per stream block."""
    return block_rows(torch.arange(tokens) >= sink_rows, tokens_per_stream)


def escape_level(abs_counts: torch.Tensor) -> int:
    """The group's escape symbol magnitude from the counts of ``|q| = 0..ESCAPE`` (the last one counts all
    larger): just past all but a fraction `ESCAPE_RATE` of the values, at most `ESCAPE`. Every ``|q| >=`` it
    is stored exactly, which keeps CDF tables short when a few values are far out."""
    total = int(abs_counts.sum())
    if total == 0:
        return 0
    allowed = math.floor(ESCAPE_RATE * total)
    beyond = total - torch.cumsum(abs_counts, 0)          # values with |q| > m, for m = 0..ESCAPE
    return int(min(ESCAPE, int(torch.nonzero(beyond <= allowed)[0]) + 1))


def grid_of(steps: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """float32 ``[tokens, channels]`` quantizer steps from fp16 channel steps and token multipliers."""
    return multipliers.to(torch.float32).unsqueeze(1) * steps.to(torch.float32).unsqueeze(0)


def per_head(rows: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Rows ``[n, heads * head_dim]`` with each head's ``head_dim`` values multiplied by its matrix
    (``[heads, head_dim, head_dim]``): ``out[n, h] = matrices[h] @ rows[n, h]``."""
    heads, dim, _ = matrices.shape
    n = rows.shape[0]
    out = torch.einsum("hde,nhe->nhd", matrices.to(torch.float32), rows.reshape(n, heads, dim))
    return out.reshape(n, heads * dim)


def encode_grid_layer(x: torch.Tensor, steps: torch.Tensor, multipliers: torch.Tensor, *, sink_rows: int,
                      tokens_per_stream: int, rounding: float = 0.5, coder: str = "torchac", lane_symbols: int = 0,
                      max_lanes: int = 32, basis: torch.Tensor | None = None) -> dict[str, Any]:
    """Encode one group ``[heads, tokens, head_dim]`` with fp16 `steps` ``[channels]`` and `multipliers`
    ``[tokens]``. `rounding` 0.5 rounds to nearest; less widens the zero bin (a dead zone). With a `basis`
    ``[heads, head_dim, head_dim]``, the non-sink tokens are coded as ``y = basis[h] @ x`` per head (the
    channels are then the basis components)."""
    heads, tokens, dim = x.shape
    channels = heads * dim
    x = x.to(torch.float32).permute(1, 0, 2).reshape(tokens, channels)
    lo, hi = torch.aminmax(x)
    peak = max(-float(lo), float(hi))
    if not math.isfinite(peak):
        raise CodecError("KV contains NaN or infinite values")
    if peak > FP16_MAX:
        raise CodecError("KV values exceed the fp16 range")
    body = x[sink_rows:]
    if basis is not None:
        if tuple(basis.shape) != (heads, dim, dim):
            raise CodecError(f"grid basis is {tuple(basis.shape)}, expected {(heads, dim, dim)}")
        body = per_head(body, basis)
        if body.numel() and float(body.abs().max()) > FP16_MAX:
            raise CodecError("KV values in the basis exceed the fp16 range")
    n = body.shape[0]
    mean = (body.mean(0) if n else torch.zeros(channels)).to(torch.float16)
    u = (body - mean.to(torch.float32)).div_(grid_of(steps, multipliers)[sink_rows:])
    q = u.round_() if rounding == 0.5 else u.sign().mul_(u.abs().add_(rounding).floor_())
    # one histogram per channel of q clipped to +-ESCAPE: class spreads, escape level and CDF counts from it
    width = 2 * ESCAPE + 1
    qi = q.clamp(-ESCAPE, ESCAPE).to(torch.int64).add_(ESCAPE + torch.arange(channels) * width)
    hist = torch.bincount(qi.reshape(-1), minlength=channels * width).view(channels, width)
    level = torch.round(CLASS_OCTAVE_STEPS * torch.log2(histogram_spread(hist).clamp_min(MIN_SPREAD)))
    _, cls = torch.unique(level.to(torch.int64), return_inverse=True)
    classes = int(cls.max()) + 1
    class_hist = torch.zeros(classes, width, dtype=torch.int64).index_add_(0, cls, hist)
    tops, raw_bits, cdfs = [], [], []
    for h, spread in zip(class_hist, histogram_spread(class_hist).tolist()):
        folded = h[ESCAPE:].clone()
        folded[1:] += h[:ESCAPE].flip(0)
        top = escape_level(folded)
        kept = h[ESCAPE - top:ESCAPE + top + 1].clone()             # |q| >= top: coded as +-top (escapes)
        if top:
            kept[0] += h[:ESCAPE - top].sum()
            kept[-1] += h[ESCAPE + top + 1:].sum()
        bits = low_bits(spread, top)
        tops.append(top)
        raw_bits.append(bits)
        cdfs.append(cachegen_cdf(high_counts(kept, bits).view(1, -1)).numpy()[0])
    top_c = torch.tensor(tops, dtype=torch.float32)[cls]
    escaped = (q.abs() >= top_c) & (top_c > 0)
    sym = torch.minimum(torch.maximum(q, -top_c), top_c).add_(top_c).to(torch.int16).numpy()
    members = [np.flatnonzero(cls.numpy() == k) for k in range(classes)]
    rows = _coded_rows(tokens, sink_rows, tokens_per_stream)
    out = {"mean": mean, "classes": cls.to(torch.uint8).numpy(), "cdf": np.concatenate(cdfs), "tops": tops,
           "raw_bits": raw_bits, "sink": x[:sink_rows].to(torch.float16)}
    if coder == "rans":
        out["streams"], out["lengths"] = encode_class_streams_rans(
            sym, members, cdfs, raw_bits, rows, escaped.numpy(), body.numpy(), lane_symbols=lane_symbols,
            max_lanes=max_lanes)
    else:
        out["outliers"] = body[escaped].to(torch.float16)
        streams = encode_class_streams(sym, members, cdfs, raw_bits, rows)
        out["streams"], out["lengths"] = b"".join(streams), [len(b) for b in streams]
    return out


def histogram_spread(hist: torch.Tensor) -> torch.Tensor:
    """Standard deviation of the symbols ``-ESCAPE..ESCAPE`` counted in each row of `hist`."""
    values = torch.arange(-ESCAPE, ESCAPE + 1, dtype=torch.float64)
    h = hist.to(torch.float64)
    n = h.sum(1).clamp_min(1)
    mean = (h @ values) / n
    return ((h @ values ** 2) / n - mean ** 2).clamp_min(0).sqrt()


def low_bits(spread: float, top: int) -> int:
    """Low bits of a class's symbols stored raw, not range-coded: while a symbol's spread is at least
    ``2 * 2^bits`` its low bits are nearly uniform, so raw storage costs almost nothing in size and takes them
    out of the range coder (whose time grows with the bits it writes)."""
    bits = max(0, math.floor(math.log2(max(spread, 1.0))) - RAW_MARGIN_BITS)
    while bits and (2 * top) >> bits < 1:
        bits -= 1
    return min(bits, 7)


def high_counts(counts: torch.Tensor, bits: int) -> torch.Tensor:
    """Counts of ``symbol >> bits`` from counts of the symbols ``0..len-1``."""
    if not bits:
        return counts
    size = 1 << bits
    pad = (-len(counts)) % size
    return torch.cat([counts, counts.new_zeros(pad)]).view(-1, size).sum(1)


def cdf_length(top: int, bits: int) -> int:
    """Entries of a class CDF: one more than its high symbols ``0..(2 top) >> bits``."""
    return ((2 * top) >> bits) + 2


def _expanded(cdf: np.ndarray, rows: int) -> torch.Tensor:
    return torch.from_numpy(np.require(np.broadcast_to(cdf, (rows, len(cdf))), requirements=["C", "W"]))


def _pack_low(values: np.ndarray, bits: int) -> bytes:
    planes = np.unpackbits(values.astype(np.uint8).reshape(-1, 1), axis=1)[:, 8 - bits:]
    return np.packbits(planes.reshape(-1)).tobytes()


def _unpack_low(data: bytes, count: int, bits: int) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:count * bits].reshape(count, bits)
    return planes.astype(np.int16) @ (1 << np.arange(bits - 1, -1, -1, dtype=np.int16))


def encode_class_streams(sym: np.ndarray, members: list[np.ndarray], cdfs: list[np.ndarray], raw_bits: list[int],
                         block_rows: tuple[int, ...]) -> list[bytes]:
    """One stream per (token block, class): int16 symbols ``sym[rows_b][:, members_k]``, token-major; the
    high part range-coded, then the `raw_bits` low bits of each symbol packed (MSB first)."""
    backend = torchac_backend()
    out: list[bytes] = []
    expanded: dict[int, torch.Tensor] = {}
    r0 = 0
    for n in block_rows:
        for k, idx in enumerate(members):
            count = n * len(idx)
            if count == 0:
                out.append(b"")
                continue
            if k not in expanded:
                expanded[k] = _expanded(cdfs[k], max(block_rows) * len(idx))
            block = np.ascontiguousarray(sym[r0:r0 + n][:, idx]).reshape(-1)
            bits = raw_bits[k]
            coded = backend.encode_cdf(expanded[k][:count], torch.from_numpy(block >> bits if bits else block))
            out.append(coded + (_pack_low(block & ((1 << bits) - 1), bits) if bits else b""))
        r0 += n
    return out


def decode_class_streams(channels: int, members: list[np.ndarray], cdfs: list[np.ndarray], raw_bits: list[int],
                         block_rows: tuple[int, ...], streams: list) -> np.ndarray:
    """Inverse of `encode_class_streams`: int16 ``[sum(block_rows), channels]``."""
    backend = torchac_backend()
    out = np.zeros((int(sum(block_rows)), channels), dtype=np.int16)
    expanded: dict[int, torch.Tensor] = {}
    r0, i = 0, 0
    for n in block_rows:
        for k, idx in enumerate(members):
            count = n * len(idx)
            data = bytes(streams[i])
            i += 1
            if count == 0:
                if data:
                    raise CodecError("grid group: an empty stream holds data")
                continue
            if k not in expanded:
                expanded[k] = _expanded(cdfs[k], max(block_rows) * len(idx))
            bits = raw_bits[k]
            raw = -(-count * bits // 8)
            if len(data) < raw:
                raise CodecError("grid group: a stream is shorter than its raw low bits")
            high = backend.decode_cdf(expanded[k][:count], data[:len(data) - raw]).numpy()
            values = (high << bits) | _unpack_low(data[len(data) - raw:], count, bits) if bits else high
            out[r0:r0 + n, idx] = values.reshape(n, len(idx))
        r0 += n
    return out


# --------------------------------------------------------------------------------- rANS class streams


def stream_positions(block_rows: tuple[int, ...], members: list[np.ndarray], channels: int) -> list[np.ndarray]:
    """Flat indices into the coded ``[rows, channels]`` matrix of every symbol of every stream, in stream order
    (block-major, then class; within a stream token-major over the class's channels in ascending order)."""
    out, r0 = [], 0
    for n in block_rows:
        rows = np.arange(r0, r0 + n, dtype=np.int64)[:, None] * channels
        out.extend((rows + idx[None, :].astype(np.int64)).reshape(-1) for idx in members)
        r0 += n
    return out


def grid_geometry(block_rows: tuple[int, ...], members: list[np.ndarray], *, lane_symbols: int,
                  max_lanes: int) -> StreamGeometry:
    """The rANS geometry of a grid group: one stream per (block, class), the class's CDF row for every symbol."""
    counts = [n * len(idx) for n in block_rows for idx in members]
    row0 = [k for _ in block_rows for k in range(len(members))]
    return StreamGeometry.of(counts=counts, row0=row0, period=[1] * len(counts), lane_symbols=lane_symbols,
                             max_lanes=max_lanes)


def varint(n: int) -> bytes:
    """LEB128: 7 bits a byte, low first."""
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def read_varint(data: memoryview | bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it) of the LEB128 number at `pos`; `CodecError` if it runs past `end`."""
    value = shift = 0
    while True:
        if pos >= end or shift > 35:
            raise CodecError("grid stream: truncated or oversized escape count")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def encode_class_streams_rans(sym: np.ndarray, members: list[np.ndarray], cdfs: list[np.ndarray],
                              raw_bits: list[int], block_rows: tuple[int, ...], escaped: np.ndarray,
                              body: np.ndarray, *, lane_symbols: int, max_lanes: int) -> tuple[bytes, list[int]]:
    """Format 2's streams of a grid group. Stream ``(block, class)``: the number of escaped symbols (LEB128),
    the rANS-coded high parts, the `raw_bits` low bits of every symbol (MSB first, packed), then the escaped
    values as fp16 in stream order. Returns the streams back to back and their lengths."""
    positions = stream_positions(block_rows, members, sym.shape[1])
    geometry = grid_geometry(block_rows, members, lane_symbols=lane_symbols, max_lanes=max_lanes)
    flat_sym, flat_esc, flat_body = sym.reshape(-1), escaped.reshape(-1), body.reshape(-1)
    classes = len(members)
    bits = [raw_bits[k % classes] for k in range(len(positions))]
    values = [flat_sym[p] for p in positions]
    high = [v >> b if b else v for v, b in zip(values, bits)]
    cum, nsym = cum_tables(cdfs)
    coded, lengths = encode_streams(np.concatenate(high) if high else np.zeros(0, np.int16), geometry, cum, nsym)
    out, pos = [], 0
    for p, v, b, n in zip(positions, values, bits, lengths):
        if not len(p):  # an empty stream (a block of sink tokens only) has no bytes at all
            out.append(b"")
            continue
        esc = flat_esc[p]
        outliers = flat_body[p][esc].astype("<f2")
        out.append(varint(int(esc.sum())) + coded[pos:pos + n] + (_pack_low(v & ((1 << b) - 1), b) if b else b"")
                   + outliers.tobytes())
        pos += int(n)
    return b"".join(out), [len(s) for s in out]


def parse_grid_streams(payload: memoryview | bytes, lengths: Sequence[int], counts: Sequence[int],
                       bits: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Byte ranges of format 2's grid streams: (rANS begin, rANS end = raw bits begin, outliers begin, escape
    count), each int64 ``[S]``; `CodecError` where a stream cannot hold its parts."""
    s = len(lengths)
    begin, raw_at, out_at, escapes = (np.zeros(s, dtype=np.int64) for _ in range(4))
    pos = 0
    for k, (n, count, b) in enumerate(zip(lengths, counts, bits)):
        end = pos + int(n)
        if count == 0:
            if n:
                raise CodecError("grid group: an empty stream holds data")
            begin[k] = raw_at[k] = out_at[k] = pos
            continue
        esc, start = read_varint(payload, pos, end)
        raw = -(-count * b // 8)
        out_at[k] = end - 2 * esc
        raw_at[k] = out_at[k] - raw
        if esc > count or raw_at[k] < start:
            raise CodecError("grid group: a stream is shorter than its escapes and raw low bits")
        begin[k], escapes[k] = start, esc
        pos = end
    return begin, raw_at, out_at, escapes


def decode_class_streams_rans(channels: int, members: list[np.ndarray], cdfs: list[np.ndarray],
                              raw_bits: list[int], block_rows: tuple[int, ...], payload: memoryview | bytes,
                              lengths: Sequence[int], tops: list[int], *, lane_symbols: int,
                              max_lanes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of `encode_class_streams_rans`: symbols int16 ``[rows, channels]``, the flat positions of the
    escaped symbols in stream order, and their fp16 values in the same order."""
    positions = stream_positions(block_rows, members, channels)
    if len(lengths) != len(positions):
        raise CodecError("grid group: wrong number of streams")
    if sum(int(n) for n in lengths) != len(payload):
        raise CodecError("grid group: stream lengths do not cover the payload")
    geometry = grid_geometry(block_rows, members, lane_symbols=lane_symbols, max_lanes=max_lanes)
    classes = len(members)
    bits = [raw_bits[k % classes] for k in range(len(positions))]
    counts = [len(p) for p in positions]
    begin, raw_at, out_at, escapes = parse_grid_streams(payload, lengths, counts, bits)
    cum, nsym = cum_tables(cdfs)
    high = decode_streams(payload, geometry, cum, nsym, begin, raw_at)
    sym = np.zeros(sum(block_rows) * channels, dtype=np.int16)
    esc_pos, esc_vals = [], []
    for k, (p, b) in enumerate(zip(positions, bits)):
        v = high[geometry.sym_start[k]:geometry.sym_start[k + 1]]
        if b:
            v = (v << b) | _unpack_low(bytes(payload[raw_at[k]:out_at[k]]), len(p), b).astype(np.int16)
        sym[p] = v
        top = tops[k % classes]
        esc = (v == 0) | (v == 2 * top) if top else np.zeros(len(v), dtype=bool)
        if int(esc.sum()) != escapes[k]:
            raise CodecError(f"grid group: a stream has {int(esc.sum())} escaped symbols but stores "
                             f"{int(escapes[k])} escaped values")
        esc_pos.append(p[esc])
        end = out_at[k] + 2 * int(escapes[k])
        esc_vals.append(np.frombuffer(bytes(payload[out_at[k]:end]), dtype="<f2"))
    positions_out = np.concatenate(esc_pos) if esc_pos else np.zeros(0, dtype=np.int64)
    values_out = np.concatenate(esc_vals) if esc_vals else np.zeros(0, dtype=np.float16)
    return sym.reshape(-1, channels), positions_out, values_out


def decode_grid_layer(parts: dict[str, Any], *, tops: list[int], raw_bits: list[int], sink_rows: int, heads: int,
                      tokens: int, head_dim: int, tokens_per_stream: int, out_dtype: torch.dtype,
                      coder: str = "torchac", lane_symbols: int = 0, max_lanes: int = 32) -> torch.Tensor:
    """Decode one group back to ``[heads, tokens, head_dim]``; `tops` and `raw_bits` are per class."""
    channels = heads * head_dim
    steps, multipliers, mean = parts["steps"], parts["multipliers"], parts["mean"]
    classes, cdf, sink = parts["classes"], parts["cdf"], parts["sink"]
    if (tuple(steps.shape), tuple(mean.shape), tuple(classes.shape), tuple(multipliers.shape)) != (
            (channels,), (channels,), (channels,), (tokens,)):
        raise CodecError("grid group side information has the wrong shape")
    if not tops or len(raw_bits) != len(tops) or any(not (0 <= t <= ESCAPE) for t in tops) or any(
            not (0 <= b <= 7) for b in raw_bits):
        raise CodecError("grid group: bad class escape levels or raw bits")
    sizes = [cdf_length(t, b) for t, b in zip(tops, raw_bits)]
    if cdf.ndim != 1 or len(cdf) != sum(sizes):
        raise CodecError("grid group CDF tables have the wrong shape")
    if tuple(sink.shape) != (sink_rows, channels):
        raise CodecError("grid group sink rows have the wrong shape")
    cls = classes.astype(np.int64)
    if cls.size and int(cls.max()) >= len(tops):
        raise CodecError("grid group: a channel names a CDF class that does not exist")
    bounds = np.cumsum([0] + sizes)
    cdfs = [cdf[bounds[k]:bounds[k + 1]] for k in range(len(tops))]
    for table in cdfs:
        check_cdf(table.reshape(1, -1))
    members = [np.flatnonzero(cls == k) for k in range(len(tops))]
    rows = _coded_rows(tokens, sink_rows, tokens_per_stream)
    if coder == "rans":
        sym, esc_pos, esc_vals = decode_class_streams_rans(
            channels, members, cdfs, raw_bits, rows, parts["streams"], parts["lengths"], tops,
            lane_symbols=lane_symbols, max_lanes=max_lanes)
    else:
        if len(parts["lengths"]) != len(rows) * len(tops):
            raise CodecError("grid group: wrong number of streams")
        streams = split_payload(parts["streams"], parts["lengths"])
        sym = decode_class_streams(channels, members, cdfs, raw_bits, rows, streams)
    top_c = torch.tensor(tops, dtype=torch.int32)[torch.from_numpy(cls)]
    q = torch.from_numpy(sym.astype(np.int32)) - top_c
    if q.numel() and bool(((q > top_c) | (q < -top_c)).any()):
        raise CodecError("decoded symbol out of range for its class: corrupt stream")
    body = mean.to(torch.float32) + q.to(torch.float32) * grid_of(steps, multipliers)[sink_rows:]
    if coder == "rans":
        body.view(-1)[torch.from_numpy(esc_pos)] = torch.from_numpy(esc_vals.astype(np.float32))
    else:
        outliers = parts["outliers"]
        escaped = (q.abs() >= top_c) & (top_c > 0)
        n_escaped = int(escaped.sum())
        if n_escaped != outliers.numel():
            raise CodecError(f"grid group: {n_escaped} escaped symbols but {outliers.numel()} stored outliers")
        if n_escaped:
            body[escaped] = outliers.to(torch.float32)
    synthesis = parts.get("synthesis")
    if synthesis is not None:
        if tuple(synthesis.shape) != (heads, head_dim, head_dim):
            raise CodecError("grid group: the synthesis transform has the wrong shape")
        body = per_head(body, synthesis)
    x = torch.cat([sink.to(torch.float32), body]) if sink_rows else body
    return x.reshape(tokens, heads, head_dim).permute(1, 0, 2).to(out_dtype).contiguous()


def token_multipliers(table: Any, token_start: int, tokens: int, context_end: int, strength: float,
                      keys: np.ndarray | None = None) -> torch.Tensor:
    """fp16 step multiplier per token: ``w^(-strength/2)`` where ``w`` is the token's relative sensitivity by
    the table: its distance ``d = context_end - 1 - position`` from the context's last token (tokens past it
    count as 0) times, given the object's `keys` ``[layers, kv_heads, tokens, head_dim]``, its sink score."""
    positions = np.arange(token_start, token_start + tokens)
    distance = np.clip(context_end - 1 - positions, 0, None)
    weight = table.distance_weight(distance)
    if keys is not None:
        weight = weight * table.score_weight(table.sink_scores(keys))
    mult = np.power(weight, -strength / 2.0) if strength else np.ones(tokens)
    return torch.from_numpy(np.clip(mult, 1 / 256, 256).astype(np.float16))


def channel_steps(fisher: np.ndarray, step: float) -> torch.Tensor:
    """fp16 steps ``step / sqrt(F)`` per channel (kept within fp16's normal range)."""
    raw = step / np.sqrt(np.maximum(fisher.astype(np.float64), 1e-30))
    return torch.from_numpy(np.clip(raw, 2.0 ** -14, 2.0 ** 15).astype(np.float16))


# ------------------------------------------------------------------------------------------ coder ops


def handle_encode_grid(meta: dict, blob: bytes) -> tuple[dict, bytes]:
    parts = unpack_parts(meta["parts"], blob)
    res = encode_grid_layer(parts["x"], parts["steps"], parts["multipliers"], basis=parts.get("basis"),
                            **meta["params"])
    tops, raw_bits, lengths = res.pop("tops"), res.pop("raw_bits"), res.pop("lengths")
    parts_meta, out = pack_parts(res)
    return {"parts": parts_meta, "lengths": lengths, "tops": tops, "raw_bits": raw_bits}, out


def handle_decode_grid(meta: dict, blob: bytes) -> tuple[dict, bytes]:
    parts = unpack_parts(meta["parts"], blob)
    parts["lengths"] = meta["lengths"]
    for name in ("classes", "cdf"):
        parts[name] = np.asarray(parts[name])
    params = dict(meta["params"])
    params["out_dtype"] = TORCH_DTYPES[params["out_dtype"]]
    y = decode_grid_layer(parts, **params)
    parts_meta, out = pack_parts({"y": y})
    return {"parts": parts_meta}, out
