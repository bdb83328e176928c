"""Decoding format-2 objects on a CUDA GPU: one kernel launch per batch of objects, dequantization fused.

`plan_batch` reads a batch of objects (same level, model shape and token count: a context's chunks) on the
host into flat arrays: every stream's byte range, lanes, CDF rows and output position, the CDF tables, the
per-channel and per-token dequantization parameters, and the launch geometry (every warp holds whole
streams; thread ``t`` decodes lane ``lane_of[t]`` of stream ``stream_of[t]``). `decode_plan_cuda` runs it:
the kernels (``csrc/rans_cuda.cu``, the arithmetic of ``csrc/rans_core.h`` that the CPU coder also uses) are
built at first use with torch's extension builder and cached; the result is bit-exact with the CPU decoder.
`emulate_plan` runs the same plan with NumPy, lane by lane and step by step as the kernel does, so the
planning and the kernel's logic are tested on machines without a GPU.

Every read of the kernel is checked against its stream's bytes; a corrupt stream sets an error flag and the
call raises `CodecError`, never reads or writes out of bounds (sizes and positions come from the checked
header, never from the stream's bytes).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from kvcast.codec.container import Unpacked, unpack
from kvcast.codec.errors import CodecError
from kvcast.codec.extensions import CSRC, build_extension
from kvcast.codec.grid import cdf_length, grid_geometry, parse_grid_streams, per_head
from kvcast.codec.header import CodedParts, GridParts, header_basics, parse_coded, parse_grid
from kvcast.codec.packing import block_rows
from kvcast.codec.pipeline import rans_geometry
from kvcast.codec.rangecoder import check_cdf, iter_streams
from kvcast.codec.rans import STATUS_MESSAGES, StreamGeometry, back_to_back, cum_tables, status_error
from kvcast.codec.sensitivity import TableRegistry, find_synthesis

STATE_LOW = 1 << 16
LUT_BITS = 6
"""Bits of the GPU's lookup table (``kvrans::kPackedLutBits``)."""
LUT_SIZE = 1 << LUT_BITS
STREAM_FIELDS = ("rans_begin", "rans_end", "count", "lanes", "row0", "period", "group", "row_base", "width",
                 "col_off", "raw_begin", "outl_begin", "n_esc", "top", "bits")
INT64_FIELDS = ("rans_begin", "rans_end", "raw_begin", "outl_begin")


@functools.cache
def cuda_backend():
    """The CUDA kernels, built once (cached by `kvcast.codec.extensions`); `CodecError` without CUDA."""
    if not torch.cuda.is_available():
        raise CodecError("GPU decoding needs a CUDA device and torch built with CUDA; decode on the CPU instead")
    return build_extension("kvcast_rans_cuda", [CSRC / "rans_cuda.cu", CSRC / "rans_cuda_bind.cpp"],
                           cuda_cflags=("-O3", "-lineinfo"), what="CUDA")


@dataclass
class Plan:
    """A batch of objects laid out for one launch (host arrays; see the module docstring)."""

    grid: bool
    delta_group: int
    objects: int
    layers: int
    heads: int
    tokens: int
    head_dim: int
    out_dtype: torch.dtype
    payload: np.ndarray                        # uint8, every object's streams back to back
    streams: dict[str, np.ndarray]             # STREAM_FIELDS, one entry per stream
    cum: np.ndarray                            # int32 [R, W]
    nsym: np.ndarray                           # int32 [R]
    entry: np.ndarray                          # int32 [R, W - 1]: `packed_tables`
    lut: np.ndarray                            # uint8 [R, LUT_SIZE]
    row_token: np.ndarray                      # int32 [coded rows]: coded row -> token
    stream_of: np.ndarray                      # int32 [threads]
    lane_of: np.ndarray                        # int8 [threads]
    members: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))   # grid: class channels
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float16))    # grid [G, C]
    step: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float16))    # grid [G, C]
    mult: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float16))    # grid [objects, T]
    sink: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float16))    # grid [G, sink_rows, C]
    scale: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float16))   # absmax [G, T]
    half_levels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # absmax [G]
    anchors: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))    # delta [G, n_anchor, C]
    anchor_scale: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float16))  # delta [G, n_anchor]
    basis: str | None = None                   # grid in a basis: its digest; `out_dtype` is then float32
    final_dtype: torch.dtype | None = None     # the dtype asked for, where it differs from `out_dtype`
    sink_rows: int = 0

    @property
    def groups(self) -> int:
        return self.objects * 2 * self.layers

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim

    def symbols(self) -> int:
        return int(self.streams["count"].sum())


def _empty_streams(n: int) -> dict[str, np.ndarray]:
    return {f: np.zeros(n, dtype=np.int64 if f in INT64_FIELDS else np.int32) for f in STREAM_FIELDS}


def plan_batch(objects: Sequence[bytes | memoryview | Unpacked], dtype: torch.dtype | None = None) -> Plan:
    """Lay out a batch of format-2 objects (bytes, or already unpacked and checked) of one level, model shape
    and token count for one launch."""
    if not objects:
        raise CodecError("nothing to decode: an empty batch")
    unpacked = [data if isinstance(data, Unpacked) else unpack(data) for data in objects]
    first = unpacked[0].header
    spec, model, tokens = header_basics(first)
    for obj in unpacked:
        s2, m2, t2 = header_basics(obj.header)
        if obj.version < 2 and s2.coder == "torchac":
            raise CodecError(f"GPU decoding reads format-2 objects; level {s2.name!r} of format 1 (torchac) "
                             "decodes on the CPU (or re-encode the context with this kvcast)")
        if s2.coder != "rans":
            raise CodecError(f"level {s2.name!r} is not entropy-coded with rANS; decode it on the CPU and move it")
        if (s2, m2.layers, m2.kv_heads, m2.head_dim, t2) != (spec, model.layers, model.kv_heads, model.head_dim,
                                                              tokens):
            raise CodecError("a GPU batch needs objects of one level, model shape and token count")
    out_dtype = dtype or {"float16": torch.float16, "bfloat16": torch.bfloat16,
                          "float32": torch.float32}.get(first.get("dtype"))
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise CodecError(f"unsupported output dtype {out_dtype}")
    if spec.quantizer == "grid":
        parts = [parse_grid(o.header, o.sections, spec, model, tokens) for o in unpacked]
        if not spec.basis:
            return _plan_grid(parts, spec, model, tokens, out_dtype)
        digests = {(o.header.get("grid") or {}).get("basis") for o in unpacked}
        if len(digests) != 1:
            raise CodecError("a GPU batch needs objects coded in one basis")
        plan = _plan_grid(parts, spec, model, tokens, torch.float32)   # synthesis in float32, then the dtype
        return replace(plan, basis=digests.pop(), final_dtype=out_dtype, sink_rows=parts[0].sink_rows)
    if spec.quantizer == "absmax_token":
        parts = [parse_coded(o.header, o.sections, spec, model, tokens) for o in unpacked]
        return _plan_absmax(parts, spec, model, tokens, out_dtype)
    raise CodecError(f"level {spec.name!r} has no GPU decoder; decode it on the CPU and move it")


def _batch_arrays(pieces: list[dict[str, np.ndarray]], cdf_rows: list[np.ndarray],
                  payloads: list[memoryview]) -> dict[str, Any]:
    """The parts of a `Plan` every level kind shares: the streams of all groups, their CDF tables, the launch
    geometry and the payload, from per-group stream tables, CDF rows and per-object payloads."""
    streams = {f: np.concatenate([np.asarray(p[f]) for p in pieces]).astype(
        np.int64 if f in INT64_FIELDS else np.int32) for f in STREAM_FIELDS}
    cum, nsym = cum_tables(cdf_rows)
    entry, lut = packed_tables(cum, nsym)
    stream_of, lane_of = _launch_geometry(streams["lanes"], streams["count"])
    return {"streams": streams, "cum": cum, "nsym": nsym, "entry": entry, "lut": lut, "stream_of": stream_of,
            "lane_of": lane_of,
            "payload": np.concatenate([np.frombuffer(p, dtype=np.uint8) for p in payloads])}


def packed_tables(cum: np.ndarray, nsym: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The GPU's tables (``csrc/rans_core.h``) from `cum_tables`' rows: ``entry`` int32 ``[R, W - 1]``, symbol
    ``s``'s ``start | (freq - 1) << 16`` (0 past the row's symbols), and ``lut`` uint8 ``[R, LUT_SIZE]``, the
    largest symbol whose start is at most ``b << (16 - LUT_BITS)``."""
    cum = np.asarray(cum, dtype=np.int64)
    rows, width = cum.shape
    start, end = cum[:, :-1], cum[:, 1:]
    valid = np.arange(width - 1)[None, :] < np.asarray(nsym)[:, None]
    entry = np.where(valid, start | ((end - start - 1) << 16), 0).astype(np.uint32).view(np.int32)
    # per row, how many of cum[1:] lie at or below each bucket's first slot: rows made disjoint by an offset
    offset = np.arange(rows, dtype=np.int64)[:, None] << 17
    flat = (end + offset).reshape(-1)
    queries = (np.arange(LUT_SIZE, dtype=np.int64)[None, :] << (16 - LUT_BITS)) + offset
    lut = np.searchsorted(flat, queries.reshape(-1), side="right").reshape(rows, LUT_SIZE) - (
        np.arange(rows, dtype=np.int64)[:, None] * (width - 1))
    return np.ascontiguousarray(entry), lut.astype(np.uint8)


def lookup_packed(entry: np.ndarray, lut: np.ndarray, r: np.ndarray, slot: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                                           np.ndarray]:
    """``kvrans::dec_lookup_packed`` for arrays of rows and slots: (symbol, start, freq)."""
    sym = lut[r, slot >> (16 - LUT_BITS)].astype(np.int64)
    while True:
        e = entry[r, sym].view(np.uint32).astype(np.int64)
        start, freq = e & 0xFFFF, (e >> 16) + 1
        beyond = slot >= start + freq
        if not beyond.any():
            return sym, start, freq
        sym = sym + beyond


def _launch_geometry(lanes: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Threads for every non-empty stream, whole streams per warp: streams sorted by lanes (powers of two,
    largest first), so a stream's lanes never cross a 32-thread boundary."""
    live = np.flatnonzero(counts > 0)
    order = live[np.argsort(-lanes[live], kind="stable")]
    per = lanes[order].astype(np.int64)
    total = int(per.sum())
    starts = np.zeros(len(order), dtype=np.int64)
    np.cumsum(per[:-1], out=starts[1:])
    stream_of = np.repeat(order, per).astype(np.int32)
    lane_of = (np.arange(total) - np.repeat(starts, per)).astype(np.int8)
    pad = (-total) % 32
    return (np.concatenate([stream_of, np.full(pad, -1, np.int32)]),
            np.concatenate([lane_of, np.zeros(pad, np.int8)]))


def _plan_grid(parts: list[GridParts], spec, model, tokens: int, out_dtype) -> Plan:
    layers, channels = model.layers, model.kv_heads * model.head_dim
    sink_rows = parts[0].sink_rows
    if any(p.sink_rows != sink_rows for p in parts):
        raise CodecError("a GPU batch needs objects with the same sink rows")
    rows = block_rows(torch.arange(tokens) >= sink_rows, spec.tokens_per_stream)
    row_start = np.concatenate([[0], np.cumsum(rows)])[:-1]
    pieces, cum_rows, members_all = [], [], []
    cum_row0 = members0 = byte0 = 0
    for b, p in enumerate(parts):
        cdf_pos = np.concatenate([[0], np.cumsum(p.cdf_sizes)])
        stream_pos = np.concatenate([[0], np.cumsum(p.per_group)])
        byte_pos = np.concatenate([[0], np.cumsum(p.lengths)])
        for gi in range(2 * layers):
            i, layer = divmod(gi, layers)
            tops, bits = p.tops[gi], p.raw_bits[gi]
            sizes = [cdf_length(t, r) for t, r in zip(tops, bits)]
            bounds = np.concatenate([[0], np.cumsum(sizes)]) + cdf_pos[gi]
            cdfs = [p.cdfs[bounds[k]:bounds[k + 1]] for k in range(len(tops))]
            for table in cdfs:
                check_cdf(table.reshape(1, -1))
            cls = p.classes[i, layer].astype(np.int64)
            if cls.size and int(cls.max()) >= len(tops):
                raise CodecError("grid group: a channel names a CDF class that does not exist")
            members = [np.flatnonzero(cls == k) for k in range(len(tops))]
            geometry = grid_geometry(rows, members, lane_symbols=spec.lane_symbols, max_lanes=spec.max_lanes)
            lengths = p.lengths[stream_pos[gi]:stream_pos[gi + 1]]
            counts = geometry.counts
            nclass = len(tops)
            sbits = np.array([bits[k % nclass] for k in range(len(counts))], dtype=np.int64)
            group_start = int(byte_pos[stream_pos[gi]])
            group_bytes = p.payload[group_start:int(byte_pos[stream_pos[gi + 1]])]
            begin, raw_at, out_at, escapes = parse_grid_streams(group_bytes, lengths, counts, sbits)
            base = byte0 + group_start
            member_off = members0 + np.concatenate([[0], np.cumsum([len(m) for m in members])])[:-1]
            n = len(counts)
            st = _empty_streams(n)
            st["rans_begin"], st["rans_end"] = begin + base, raw_at + base
            st["raw_begin"], st["outl_begin"] = raw_at + base, out_at + base
            st["count"], st["lanes"] = counts, geometry.lanes
            st["row0"] = cum_row0 + geometry.row0
            st["period"] = geometry.period
            st["group"][:] = b * 2 * layers + gi
            st["row_base"] = np.repeat(row_start, nclass)
            st["width"] = np.tile([len(m) for m in members], len(rows))
            st["col_off"] = np.tile(member_off, len(rows))
            st["n_esc"], st["bits"] = escapes, sbits
            st["top"] = np.tile(tops, len(rows))
            if np.any((counts > 0) & (begin + 4 * geometry.lanes > raw_at)):
                raise CodecError("grid group: a stream is shorter than its lanes' states")
            pieces.append(st)
            cum_rows.extend(cdfs)
            cum_row0 += len(cdfs)
            members_all.extend(members)
            members0 += channels
        byte0 += len(p.payload)
    groups = len(parts) * 2 * layers
    return Plan(grid=True, delta_group=0, objects=len(parts), layers=layers, heads=model.kv_heads, tokens=tokens,
                head_dim=model.head_dim, out_dtype=out_dtype,
                row_token=(sink_rows + np.arange(tokens - sink_rows)).astype(np.int32),
                **_batch_arrays(pieces, cum_rows, [p.payload for p in parts]),
                members=np.concatenate(members_all).astype(np.int16),
                mean=np.stack([p.means for p in parts]).reshape(groups, channels),
                step=np.stack([p.steps for p in parts]).reshape(groups, channels),
                mult=np.stack([p.multipliers for p in parts]),
                sink=np.stack([p.sink for p in parts]).reshape(groups, sink_rows, channels))


def _plan_absmax(parts: list[CodedParts], spec, model, tokens: int, out_dtype) -> Plan:
    layers, channels = model.layers, model.kv_heads * model.head_dim
    delta = spec.delta_group
    is_anchor = np.zeros(tokens, dtype=bool)
    if delta:
        is_anchor[::delta] = True
    rows = block_rows(torch.from_numpy(~is_anchor), spec.tokens_per_stream)
    geometry = rans_geometry(rows, channels, spec.channels_per_stream, lane_symbols=spec.lane_symbols,
                             max_lanes=spec.max_lanes)
    spans = list(iter_streams(rows, channels, spec.channels_per_stream))
    per_group = len(spans)
    pieces, cum_rows, halves = [], [], []
    byte0 = 0
    for b, p in enumerate(parts):
        for c in p.cdfs:
            check_cdf(c.reshape(-1, c.shape[-1]))
        kb, vb = p.bins
        begin, end = back_to_back(p.lengths)
        for gi in range(2 * layers):
            i, layer = divmod(gi, layers)
            g = b * 2 * layers + gi
            st = _empty_streams(per_group)
            sl = slice(gi * per_group, (gi + 1) * per_group)
            st["rans_begin"], st["rans_end"] = begin[sl] + byte0, end[sl] + byte0
            st["count"], st["lanes"], st["period"] = geometry.counts, geometry.lanes, geometry.period
            st["row0"] = g * channels + geometry.row0
            st["group"][:] = g
            st["row_base"] = [r0 for r0, _, _, _ in spans]
            st["width"] = [c1 - c0 for _, _, c0, c1 in spans]
            st["col_off"] = [c0 for _, _, c0, _ in spans]
            if np.any((geometry.counts == 0) & (p.lengths[sl] != 0)):
                raise CodecError("an empty stream holds data")
            pieces.append(st)
            cum_rows.append(p.cdfs[i][layer])
            halves.append((kb if i == 0 else vb)[layer] / 2 - 1)
        byte0 += len(p.payload)
    groups = len(parts) * 2 * layers
    plan = Plan(grid=False, delta_group=delta, objects=len(parts), layers=layers, heads=model.kv_heads,
                tokens=tokens, head_dim=model.head_dim, out_dtype=out_dtype,
                row_token=np.flatnonzero(~is_anchor).astype(np.int32),
                **_batch_arrays(pieces, cum_rows, [p.payload for p in parts]),
                scale=np.stack([p.scales for p in parts]).reshape(groups, tokens),
                half_levels=np.array(halves, dtype=np.float32))
    if delta:
        plan.anchors = np.stack([p.anchors for p in parts]).reshape(groups, -1, channels)
        plan.anchor_scale = plan.scale[:, is_anchor]
    return plan


# ------------------------------------------------------------------------------------ dequantization


def anchor_values(plan: Plan, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 ``[G, n_anchor, C]``: the anchors' reconstruction, as the CPU decoder computes it."""
    anchors = torch.from_numpy(plan.anchors).to(device)
    scale = torch.from_numpy(plan.anchor_scale).to(device)
    # a tensor divisor: torch divides by a scalar on CUDA as a multiplication by its reciprocal, which is not
    # the CPU decoder's correctly rounded division
    divisor = torch.full_like(scale, 127.0, dtype=torch.float32)
    return (anchors.to(torch.int16) + 127).to(torch.float32).sub(127.0) * (
        scale.to(torch.float32) / divisor).unsqueeze(-1)


# -------------------------------------------------------------------------------- NumPy emulation


def _segment_rank(flag: np.ndarray, first: np.ndarray, lanes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A warp ballot's population counts, per thread: (flags of lower lanes of the same stream, flags of the
    whole stream); `first` is the thread index of each thread's lane 0."""
    c = np.cumsum(flag) - flag
    rank = c - c[first]
    total_at = first + lanes - 1
    total = c[total_at] + flag[total_at] - c[first]
    return rank, total


def emulate_plan(plan: Plan) -> torch.Tensor:
    """Run `plan` with NumPy exactly as the kernel does (all threads in lockstep, warp ballots as segment
    counts); returns ``[groups, heads, tokens, head_dim]`` in the plan's dtype. For tests without a GPU."""
    st = plan.streams
    k = plan.stream_of
    idle = k < 0
    k = np.where(idle, 0, k)
    j = plan.lane_of.astype(np.int64)
    lanes = np.where(idle, 1, st["lanes"][k]).astype(np.int64)
    count = np.where(idle, 0, st["count"][k]).astype(np.int64)
    rb, re = st["rans_begin"][k], st["rans_end"][k]
    if np.any(~idle & (re - rb < 4 * lanes)):
        raise CodecError(STATUS_MESSAGES[1])
    data = plan.payload
    at = rb + 4 * j
    x = np.where(idle, STATE_LOW, data[np.where(idle, 0, at)].astype(np.uint64)
                 | data[np.where(idle, 0, at + 1)].astype(np.uint64) << 8
                 | data[np.where(idle, 0, at + 2)].astype(np.uint64) << 16
                 | data[np.where(idle, 0, at + 3)].astype(np.uint64) << 24).astype(np.uint64)
    if np.any(~idle & (x < STATE_LOW)):
        raise CodecError(STATUS_MESSAGES[4])
    my_steps = np.where(count > j, (count - j + lanes - 1) // lanes, 0)
    first = np.arange(len(k)) - j           # thread index of the stream's lane 0
    wp = rb + 4 * lanes
    esc_seen = np.zeros(len(k), dtype=np.int64)
    out = np.zeros((plan.groups, plan.heads, plan.tokens, plan.head_dim), dtype=np.float32)
    width = np.maximum(st["width"][k], 1).astype(np.int64)
    group = st["group"][k].astype(np.int64)
    anchors = anchor_values(plan) if plan.delta_group else torch.zeros(0)
    anchor_x = anchors.numpy()

    def segment_rank(flag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _segment_rank(flag, first, lanes)

    for s in range(int(my_steps.max(initial=0))):
        i = s * lanes + j
        active = s < my_steps
        r = (st["row0"][k] + i % st["period"][k]).astype(np.int64)
        sym, start, freq = lookup_packed(plan.entry, plan.lut, r, (x & 0xFFFF).astype(np.int64))
        start, freq = start.astype(np.uint64), freq.astype(np.uint64)
        x = np.where(active, freq * (x >> 16) + (x & 0xFFFF) - start, x)
        need = (active & (x < STATE_LOW)).astype(np.int64)
        rank, total = segment_rank(need)
        pos = wp + 2 * rank
        if np.any(need.astype(bool) & (pos + 2 > re)):
            raise CodecError(STATUS_MESSAGES[1])
        w = data[np.where(need.astype(bool), pos, 0)].astype(np.uint64) | (
            data[np.where(need.astype(bool), pos + 1, 0)].astype(np.uint64) << 8)
        x = np.where(need.astype(bool), (x << 16) | w, x)
        wp = wp + 2 * total
        row, col = i // width, i % width
        token = plan.row_token[np.where(active, st["row_base"][k] + row, 0)].astype(np.int64)
        if plan.grid:
            channel = plan.members[np.where(active, st["col_off"][k] + col, 0)].astype(np.int64)
            bits = st["bits"][k]
            v = sym.astype(np.int64)
            has = active & (bits > 0)
            bit = i * bits
            byte = st["raw_begin"][k] + (bit >> 3)
            word = (data[np.where(has, byte, 0)].astype(np.int64) << 8) | np.where(
                has & ((bit & 7) + bits > 8), data[np.where(has, np.minimum(byte + 1, len(data) - 1), 0)], 0)
            low = (word >> (16 - (bit & 7) - bits)) & ((1 << bits) - 1)
            v = np.where(has, (v << bits) | low, v)
            top = st["top"][k]
            if np.any(active & (v > 2 * top)):
                raise CodecError("decoded symbol out of range for its class: corrupt stream")
            esc = active & (top > 0) & ((v == 0) | (v == 2 * top))
            q = (v - top).astype(np.float32)
            grid = plan.mult[group // (2 * plan.layers), token].astype(np.float32) * plan.step[
                group, channel].astype(np.float32)
            value = plan.mean[group, channel].astype(np.float32) + q * grid
            erank, etotal = segment_rank(esc.astype(np.int64))
            erank = erank + esc_seen
            if np.any(esc & (erank >= st["n_esc"][k])):
                raise CodecError(STATUS_MESSAGES[5])
            epos = st["outl_begin"][k] + 2 * erank
            ebits = data[np.where(esc, epos, 0)].astype(np.uint16) | (
                data[np.where(esc, epos + 1, 0)].astype(np.uint16) << 8)
            value = np.where(esc, ebits.view(np.float16).astype(np.float32), value)
            esc_seen = esc_seen + etotal
        else:
            channel = st["col_off"][k] + col
            h = plan.half_levels[group]
            sc = plan.scale[group, token].astype(np.float32)
            value = (sym.astype(np.float32) - h) * (sc / h)
            if plan.delta_group:
                value = value + anchor_x[group, token // plan.delta_group, channel]
        a = np.flatnonzero(active)
        hh, dd = np.divmod(channel[a], plan.head_dim)
        out[group[a], hh, token[a], dd] = value[a]
    live = ~idle & (count > 0)
    if np.any(live & (x != STATE_LOW)):
        raise CodecError(STATUS_MESSAGES[2])
    if np.any(live & (j == 0) & (wp != re)):
        raise CodecError(STATUS_MESSAGES[3])
    if plan.grid and np.any(live & (j == 0) & (esc_seen != st["n_esc"][k])):
        raise CodecError(STATUS_MESSAGES[5])
    result = torch.from_numpy(out)
    _fill_fixed_rows(plan, result, torch.from_numpy(plan.sink), anchors)
    return result.to(plan.out_dtype)


def _fill_fixed_rows(plan: Plan, out: torch.Tensor, sink: torch.Tensor, anchor_x: torch.Tensor) -> None:
    """Rows the streams do not hold, as the CPU decoder writes them: grid sinks (`sink`, fp16 ``[G, S, C]``)
    and delta anchors (`anchor_x`, `anchor_values` on `out`'s device)."""
    if plan.grid and plan.sink.shape[1]:
        out[:, :, :plan.sink.shape[1], :] = sink.view(plan.groups, -1, plan.heads, plan.head_dim).permute(
            0, 2, 1, 3).to(out.dtype)
    if plan.delta_group:
        out[:, :, ::plan.delta_group, :] = anchor_x.view(plan.groups, -1, plan.heads, plan.head_dim).permute(
            0, 2, 1, 3).to(out.dtype)


# ------------------------------------------------------------------------------------------- CUDA


def decode_plan_cuda(plan: Plan, device: torch.device | str = "cuda", *, check: bool = True,
                     uploaded: dict[str, Any] | None = None) -> torch.Tensor:
    """Run `plan` on the GPU: ``[groups, heads, tokens, head_dim]`` in the plan's dtype on `device`.
    `uploaded` (from `upload_plan`) skips the host-to-device copies (benchmarks time the kernels alone)."""
    backend = cuda_backend()
    dev = uploaded or upload_plan(plan, device)
    out = torch.empty((plan.groups, plan.heads, plan.tokens, plan.head_dim), dtype=plan.out_dtype,
                      device=dev["payload"].device)
    error = dev["error"]
    error[0], error[1] = 0, 2 ** 31 - 1
    backend.decode(dev["payload"], [dev[f] for f in STREAM_FIELDS], dev["entry"], dev["lut"], dev["nsym"], out,
                   2 * plan.layers, dev["row_token"], dev["members"], dev["mean"], dev["step"], dev["mult"],
                   dev["scale"], dev["half_levels"], dev["anchor_x"], plan.delta_group, dev["stream_of"],
                   dev["lane_of"], error, int(plan.grid))
    _fill_fixed_rows(plan, out, dev["sink"], dev["anchor_x"])
    if check:
        raise_device_error(error)
    return out


def raise_device_error(error: torch.Tensor) -> None:
    """`CodecError` if the kernel flagged a corrupt stream (synchronises with the device)."""
    flags, stream = (int(v) for v in error.cpu())
    if flags:
        raise status_error(stream, (flags & -flags).bit_length() - 1)


def upload_plan(plan: Plan, device: torch.device | str = "cuda") -> dict[str, Any]:
    """The plan's arrays on the device (pinned host copies, asynchronous)."""
    def put(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.pin_memory().to(device, non_blocking=True) if t.numel() else t.to(device)

    dev = {f: put(plan.streams[f]) for f in STREAM_FIELDS}
    for name in ("payload", "entry", "lut", "nsym", "row_token", "members", "mean", "step", "mult", "scale",
                 "half_levels", "stream_of", "lane_of", "sink"):
        dev[name] = put(getattr(plan, name))
    dev["anchor_x"] = (anchor_values(plan, device).contiguous() if plan.delta_group
                       else torch.zeros(0, dtype=torch.float32, device=device))
    dev["error"] = torch.zeros(2, dtype=torch.int32, device=device)
    return dev


def decode_batch(objects: Sequence[bytes | memoryview | Unpacked], device: torch.device | str = "cuda",
                 dtype: torch.dtype | None = None, *,
                 synthesis: Callable[[str], np.ndarray] | None = None) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Decode a batch of format-2 objects (one level, model shape and token count) on a CUDA device in one
    launch; one KV list per object, views of one output tensor. Objects coded in a sensitivity basis take
    `synthesis` (the basis digest -> its synthesis transforms; `Codec.synthesis_for` finds them), by default
    from the shipped tables or a flat table's identity."""
    plan = plan_batch(objects, dtype)
    out = decode_plan_cuda(plan, device)
    if plan.basis is not None:
        if synthesis is None:   # the shipped tables (or a flat table's identity)
            shape = (plan.layers, plan.heads, plan.head_dim)
            synthesis = functools.partial(find_synthesis, shape=shape, tables=TableRegistry().tables())
        out = synthesize(plan, out, torch.from_numpy(synthesis(plan.basis)).to(out.device))
    return split_kv(plan, out)


def synthesize(plan: Plan, out: torch.Tensor, synthesis: torch.Tensor) -> torch.Tensor:
    """The decoded basis components of a plan's non-sink tokens (float32 ``out``) back to keys and values:
    per head ``x = synthesis[kv, layer, head] @ y``, then the dtype asked for."""
    view = out.view(plan.objects, 2, plan.layers, plan.heads, plan.tokens, plan.head_dim)
    n = plan.tokens - plan.sink_rows
    for b, i, layer in np.ndindex(plan.objects, 2, plan.layers):   # as the CPU decoder does, group by group
        body = view[b, i, layer, :, plan.sink_rows:].permute(1, 0, 2).reshape(n, plan.heads * plan.head_dim)
        y = per_head(body, synthesis[i, layer]).reshape(n, plan.heads, plan.head_dim).permute(1, 0, 2)
        view[b, i, layer, :, plan.sink_rows:] = y
    return out.to(plan.final_dtype or out.dtype)


def split_kv(plan: Plan, out: torch.Tensor) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    view = out.view(plan.objects, 2, plan.layers, plan.heads, plan.tokens, plan.head_dim)
    return [[(view[b, 0, layer].unsqueeze(0), view[b, 1, layer].unsqueeze(0)) for layer in range(plan.layers)]
            for b in range(plan.objects)]


# ------------------------------------------------------------------------------------------- encoding


def emulate_encode(symbols: np.ndarray, geometry: StreamGeometry, cum: np.ndarray,
                   nsym: np.ndarray) -> tuple[bytes, np.ndarray]:
    """The CUDA encoder's two passes with NumPy, threads in lockstep (for tests without a GPU): the streams'
    bytes back to back and their lengths, as `kvcast.codec.rans.encode_streams` returns them."""
    entry, _ = packed_tables(cum, nsym)
    symbols = np.asarray(symbols, dtype=np.int64)
    counts = geometry.counts
    stream_of, lane_of = _launch_geometry(geometry.lanes, counts)
    idle = stream_of < 0
    k = np.where(idle, 0, stream_of)
    j = lane_of.astype(np.int64)
    lanes = np.where(idle, 1, geometry.lanes[k]).astype(np.int64)
    begin, end = geometry.sym_start[k], geometry.sym_start[k + 1]
    count = np.where(idle, 0, end - begin)
    my_steps = np.where(count > j, (count - j + lanes - 1) // lanes, 0)
    first = np.arange(len(k)) - j
    tail = end.copy()
    x = np.full(len(k), STATE_LOW, dtype=np.int64)
    words = np.zeros(max(len(symbols), 1), dtype=np.int64)
    for s in reversed(range(int(my_steps.max(initial=0)))):
        active = s < my_steps
        i = s * lanes + j
        sym = symbols[np.where(active, begin + i, 0)] if len(symbols) else np.zeros(len(k), np.int64)
        r = (geometry.row0[k] + i % geometry.period[k]).astype(np.int64)
        if np.any(active & ((sym < 0) | (sym >= nsym[r]))):
            raise CodecError("rANS encoder: symbol out of its CDF's range")
        e = entry[r, np.clip(sym, 0, entry.shape[1] - 1)].view(np.uint32).astype(np.int64)
        start, freq = e & 0xFFFF, (e >> 16) + 1
        need = active & (x >= freq << 16)
        rank, total = _segment_rank(need.astype(np.int64), first, lanes)
        tail = tail - total
        words[(tail + rank)[need]] = x[need] & 0xFFFF
        x = np.where(need, x >> 16, x)
        x = np.where(active, ((x // freq) << 16) + x % freq + start, x)
    word_count = np.zeros(len(counts), dtype=np.int64)
    lead = ~idle & (j == 0)
    word_count[k[lead]] = (end - tail)[lead]
    lengths = np.where(counts > 0, 4 * geometry.lanes + 2 * word_count, 0).astype(np.int64)
    offset = np.cumsum(lengths) - lengths
    out = np.zeros(int(lengths.sum()) // 2, dtype=np.uint16)
    live = np.flatnonzero(~idle)
    for t in live:           # pass 2: per thread, as the pack kernel writes
        kk, jj, lane_count = k[t], j[t], lanes[t]
        o = offset[kk] // 2
        out[o + 2 * jj], out[o + 2 * jj + 1] = x[t] & 0xFFFF, x[t] >> 16
        n = word_count[kk]
        w0 = geometry.sym_start[kk + 1] - n
        idx = np.arange(jj, n, lane_count)
        out[o + 2 * lane_count + idx] = words[w0 + idx]
    return out.astype("<u2").tobytes(), lengths


def encode_tables(geometry: StreamGeometry, cum: np.ndarray, nsym: np.ndarray,
                  device: torch.device | str = "cuda") -> dict[str, torch.Tensor]:
    """What the CUDA encoder needs besides the symbols, on `device`: the streams' geometry, the packed tables
    and the launch geometry (one thread per lane, whole streams per warp, as the decoder's)."""
    entry, lut = packed_tables(cum, nsym)
    stream_of, lane_of = _launch_geometry(geometry.lanes, geometry.counts)
    arrays = {"sym_start": geometry.sym_start, "lanes": geometry.lanes, "row0": geometry.row0,
              "period": geometry.period, "entry": entry, "lut": lut, "nsym": nsym, "stream_of": stream_of,
              "lane_of": lane_of}
    return {name: torch.from_numpy(np.ascontiguousarray(a)).to(device) for name, a in arrays.items()}


def encode_streams_cuda(symbols: torch.Tensor, tables: dict[str, torch.Tensor], *,
                        check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`kvcast.codec.rans.encode_streams` on the GPU: `symbols` int16 on the device (flat, stream ``k``'s at
    ``sym_start[k]:sym_start[k + 1]``), `tables` from `encode_tables`. Returns the streams' bytes back to back
    (uint8) and their lengths (int64), on the device: the same bytes as the CPU coder. `CodecError` for a
    symbol outside its CDF (`check=False` leaves the check to the caller: ``result[2]``)."""
    data, lengths, error = cuda_backend().encode(
        symbols.to(torch.int16).contiguous(), tables["sym_start"], tables["lanes"], tables["row0"],
        tables["period"], tables["entry"], tables["lut"], tables["nsym"], tables["stream_of"], tables["lane_of"])
    if check and int(error[0]):
        raise CodecError(f"rANS encoder: stream {int(error[1])} holds a symbol outside its CDF's range")
    return data, lengths
