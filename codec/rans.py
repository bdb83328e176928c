"""kvcast's interleaved rANS coder (format version 2): the CPU side, and the stream geometry the GPU shares.

A *stream* of ``n`` symbols is coded by ``lanes`` interleaved rANS coders (`lane_count`: one per
``lane_symbols`` symbols, a power of two, at most ``max_lanes``); symbol ``i`` belongs to lane ``i % lanes``.
Each symbol's CDF is row ``row0 + i % period`` of the group's CDF table (a grid class: one row, period 1;
CacheGen's per-channel CDFs: the stream's first channel, period = its channels). CDF tables are the ones
kvcast ships (16-bit, strictly increasing from 0, torchac's layout); the coder reads them as cumulative
frequencies with the last symbol's end at 65536 (`cum_tables`).

Stream bytes: every lane's initial decoder state (u32 little-endian), then 16-bit words in reading order; a
valid stream ends with every lane at state 2^16 and every byte read, which the decoder checks. The
arithmetic lives in ``csrc/rans_core.h``, shared by the C++ coder here (``csrc/rans_cpu.cpp``, built at first
use, the GIL released while it runs) and the CUDA kernels (`kvcast.codec.gpu`), so both read and write the same
bytes. Many lanes per stream and many streams per object are what let a GPU decode an object in one launch.

>>> import numpy as np
>>> cdf = np.array([[0, 40000, 60000, 65535]], dtype=np.uint16).view(np.int16)   # 3 symbols
>>> cum, nsym = cum_tables([cdf])
>>> symbols = np.array([0, 1, 0, 2, 0, 0, 1, 0], dtype=np.int16)
>>> geometry = StreamGeometry.of(counts=[8], row0=[0], period=[1], lane_symbols=4, max_lanes=32)
>>> geometry.lanes.tolist()
[2]
>>> data, lengths = encode_streams(symbols, geometry, cum, nsym)
>>> decode_streams(data, geometry, cum, nsym, *back_to_back(lengths)).tolist() == symbols.tolist()
True
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvcast.codec.errors import CodecError
from kvcast.codec.extensions import CSRC, build_extension

LANE_SYMBOLS = 4096
"""Default symbols per interleaved lane: a lane's 4-byte state costs under 0.5% of what its symbols take at
1.5 bits each (levels store the value they use in their spec, so objects stay self-describing)."""
MAX_LANES = 32
"""Default (and largest) lanes per stream: one GPU warp."""
STATE_BYTES = 4
STATUS_MESSAGES = {
    1: "truncated rANS stream (its lane states or words end early)",
    2: "rANS stream does not end in its initial state (corrupt stream)",
    3: "rANS stream has bytes left after its last symbol (corrupt stream)",
    4: "rANS stream starts with an impossible lane state (corrupt stream)",
    5: "stream's escapes or raw bits disagree with its symbols (corrupt stream)",
}


@functools.cache
def cpu_backend():
    """The C++ coder, built once with -O3 (cached by `kvcast.codec.extensions`)."""
    return build_extension("kvcast_rans_cpu", [CSRC / "rans_cpu.cpp"])


def lane_count(counts: np.ndarray | Sequence[int], lane_symbols: int, max_lanes: int) -> np.ndarray:
    """Lanes of streams of `counts` symbols: the largest power of two ``<= count // lane_symbols``, at least 1,
    at most `max_lanes` (mirrors ``kvrans::lane_count``)."""
    if lane_symbols < 1 or max_lanes not in (1, 2, 4, 8, 16, 32):
        raise CodecError(f"bad lane geometry: lane_symbols={lane_symbols}, max_lanes={max_lanes}")
    want = np.asarray(counts, dtype=np.int64) // lane_symbols
    lanes = np.ones_like(want)
    while True:
        grow = (lanes * 2 <= max_lanes) & (lanes * 2 <= want)
        if not grow.any():
            return lanes.astype(np.int32)
        lanes[grow] *= 2


@dataclass(frozen=True)
class StreamGeometry:
    """What the coder needs to know of a list of streams besides their bytes: symbol offsets, lanes and the
    CDF row of every symbol (``row0 + i % period``)."""

    sym_start: np.ndarray
    """int64 ``[S + 1]``: stream ``k`` holds symbols ``sym_start[k]:sym_start[k + 1]`` of the flat array."""
    lanes: np.ndarray
    row0: np.ndarray
    period: np.ndarray

    @classmethod
    def of(cls, *, counts, row0, period, lane_symbols: int, max_lanes: int) -> StreamGeometry:
        counts = np.asarray(counts, dtype=np.int64)
        start = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=start[1:])
        return cls(start, lane_count(counts, lane_symbols, max_lanes), np.asarray(row0, dtype=np.int32),
                   np.asarray(period, dtype=np.int32))

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.sym_start)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in (self.sym_start, self.lanes, self.row0,
                                                                          self.period))


def cum_tables(cdfs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative-frequency rows from CDF tables (int16-stored uint16, ``[rows, Lp]`` or ``[Lp]`` each, torchac's
    layout: symbols ``0..Lp-2``, the last one ending at 65536). Returns int32 ``[R, W]`` and ``nsym`` int32
    ``[R]`` (rows padded with 65536)."""
    rows = [np.atleast_2d(np.asarray(c)).view(np.uint16) for c in cdfs]
    n_rows = sum(r.shape[0] for r in rows)
    width = max((r.shape[1] for r in rows), default=2)
    cum = np.full((n_rows, width), 1 << 16, dtype=np.int32)
    nsym = np.empty(n_rows, dtype=np.int32)
    r0 = 0
    for r in rows:
        lp = r.shape[1]
        if lp < 2 or lp - 1 > 256:
            raise CodecError(f"CDF rows of {lp} entries: the rANS coder takes 1 to 256 symbols")
        cum[r0:r0 + r.shape[0], :lp - 1] = r[:, :lp - 1]
        nsym[r0:r0 + r.shape[0]] = lp - 1
        r0 += r.shape[0]
    return cum, nsym


def encode_streams(symbols: np.ndarray, geometry: StreamGeometry, cum: np.ndarray,
                   nsym: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Encode the streams of `geometry` (int16 `symbols`, flat); returns their bytes back to back and the
    byte length of each stream."""
    try:
        data, lengths = cpu_backend().encode_streams(
            torch.from_numpy(np.ascontiguousarray(symbols, dtype=np.int16)), *geometry.tensors(),
            torch.from_numpy(np.ascontiguousarray(cum)), torch.from_numpy(np.ascontiguousarray(nsym)))
    except RuntimeError as exc:
        raise CodecError(f"rANS encoder: {exc}") from None
    return data.numpy().tobytes(), lengths.numpy()


def decode_streams(payload: bytes | memoryview | np.ndarray, geometry: StreamGeometry, cum: np.ndarray,
                   nsym: np.ndarray, begin: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Decode the streams of `geometry` from `payload` (stream ``k`` at ``payload[begin[k]:end[k]]``;
    `back_to_back` gives the ranges of streams stored one after the other); int16 symbols, flat. `CodecError`
    names the first corrupt stream."""
    buf = np.frombuffer(payload, dtype=np.uint8) if not isinstance(payload, np.ndarray) else payload
    try:
        symbols, status = cpu_backend().decode_streams(
            torch.from_numpy(buf.copy() if not buf.flags.writeable else buf),
            torch.from_numpy(np.ascontiguousarray(begin, dtype=np.int64)),
            torch.from_numpy(np.ascontiguousarray(end, dtype=np.int64)), *geometry.tensors(),
            torch.from_numpy(np.ascontiguousarray(cum)), torch.from_numpy(np.ascontiguousarray(nsym)))
    except RuntimeError as exc:
        raise CodecError(f"rANS decoder: {exc}") from None
    raise_status(status.numpy())
    return symbols.numpy()


def status_error(stream: int, code: int) -> CodecError:
    """The error of stream `stream`'s decoding status `code` (the CPU coder's and the GPU kernel's)."""
    return CodecError(f"stream {stream}: {STATUS_MESSAGES.get(code, f'decoding status {code}')}")


def raise_status(status: np.ndarray) -> None:
    """`CodecError` for the first stream whose decoding status is not 0."""
    bad = np.flatnonzero(status)
    if bad.size:
        raise status_error(int(bad[0]), int(status[bad[0]]))


def back_to_back(lengths: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Byte ranges ``(begin, end)`` of streams of `lengths` stored back to back."""
    lengths = np.asarray(lengths, dtype=np.int64)
    end = np.cumsum(lengths)
    return end - lengths, end
