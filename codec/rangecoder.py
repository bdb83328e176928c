"""Range coding of quantized symbols: CacheGen-style CDFs and torchac range coding on the CPU.

* `cachegen_cdf` estimates one CDF per row (CacheGen: per (K/V, layer, channel)) from the object's own
  symbols with CacheGen's normalisation ``F(i) = floor((65535 - B) * cum_i / N) + i``: strictly increasing,
  so every symbol, seen or not, keeps a non-zero width.
* `encode_group` / `decode_group` code the independent streams of a `StreamGroup` with torchac's range
  coder (32-bit range, 16-bit CDF precision). torchac needs one CDF row per symbol; rows are expanded for one
  token block of one channel group at a time, so memory stays bounded by the largest stream, never by the object.
* `check_cdf` validates CDF tables read from an object before they reach torchac.
* torchac's C++ source is compiled here with ``-O3`` (the package's own build uses default flags and is about
  half as fast); if that build fails, the package's own build is used.

torchac holds the GIL, so large objects are coded in worker processes: `kvcast.codec.pool` drives them, this
module only codes the stream groups it is handed.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvcast.codec.errors import CodecError
from kvcast.codec.extensions import build_extension

CDF_PRECISION_BITS = 16
CDF_TOTAL = 1 << CDF_PRECISION_BITS


@functools.cache
def torchac_backend():
    """The torchac C++ extension, built once with -O3 (cached by `kvcast.codec.extensions`)."""
    spec = importlib.util.find_spec("torchac")
    if spec is None or not spec.submodule_search_locations:
        raise CodecError("torchac is not installed (pip install torchac==0.9.3)")
    source = Path(next(iter(spec.submodule_search_locations))) / "backend" / "torchac_backend.cpp"
    try:
        return build_extension("kvcast_torchac_o3", [source])
    except CodecError:  # pragma: no cover - fall back to the package's own build
        import torchac.torchac as torchac_module

        return torchac_module.torchac_backend


def cachegen_cdf(counts: torch.Tensor) -> torch.Tensor:
    """CacheGen's integer CDFs from symbol counts.

    `counts` is ``[rows, B]`` (B = number of symbol slots); returns int16 ``[rows, B + 1]`` holding
    ``F(i) = floor((65535 - B) * cum_i / N) + i`` for ``i = 0..B`` (values up to 65535, stored as int16 bit
    patterns, the layout torchac reads). Rows with N = 0 become uniform-ish (``F(i) = i``, then the last
    symbol takes the rest), which is still a valid CDF.
    """
    rows, slots = counts.shape
    counts = counts.to(torch.int64)
    cum = torch.zeros(rows, slots + 1, dtype=torch.int64)
    cum[:, 1:] = torch.cumsum(counts, dim=1)
    total = cum[:, -1:].clamp_min(1)
    cdf = (CDF_TOTAL - 1 - slots) * cum // total + torch.arange(slots + 1, dtype=torch.int64)
    return ((cdf + 32768) % 65536 - 32768).to(torch.int16)  # uint16 bit patterns in int16


def check_cdf(cdf: np.ndarray) -> None:
    """Raise CodecError unless every row of the int16-stored CDF table is strictly increasing from 0."""
    u = cdf.view(np.uint16).astype(np.int64)
    if u.ndim != 2 or u.shape[1] < 2:
        raise CodecError(f"CDF table has shape {u.shape}; expected [rows, Lp >= 2]")
    if np.any(u[:, 0] != 0) or np.any(np.diff(u, axis=1) <= 0):
        raise CodecError("CDF table is not strictly increasing from 0 in every row (corrupt side information)")


@dataclass(frozen=True)
class StreamGroup:
    """Symbols of several streams that share one CDF table, cut from one ``[tokens, channels]`` matrix.

    Stream ``(token block b, channel group g)`` holds ``symbols[rows_b, channels_g]`` in row-major order
    (token-major), where ``rows_b`` are the coded rows of block ``b`` and the CDF of channel ``c`` is
    ``cdf[c]``.
    """

    symbols: np.ndarray
    """int16 ``[rows, channels]``: the coded rows only (rows not coded are left out by the caller)."""
    cdf: np.ndarray
    """int16 ``[channels, Lp]``."""
    block_rows: tuple[int, ...]
    """Number of coded rows in each token block, in order; their sum is ``symbols.shape[0]``."""
    channels_per_stream: int


def iter_streams(rows_per_block: Sequence[int], channels: int, channels_per_stream: int):
    """``(first row, rows, c0, c1)`` of every stream of a group: block-major, then channel group."""
    start = 0
    for n in rows_per_block:
        for c0 in range(0, channels, channels_per_stream):
            yield start, n, c0, min(c0 + channels_per_stream, channels)
        start += n


class _ExpandedCdf:
    """One CDF row per symbol, as torchac needs, built once per channel group and sliced per token block."""

    def __init__(self, cdf: np.ndarray, rows_per_block: Sequence[int]) -> None:
        self.cdf = cdf
        self.max_rows = max(rows_per_block, default=0)
        self.cache: dict[tuple[int, int], torch.Tensor] = {}

    def rows(self, n: int, c0: int, c1: int) -> torch.Tensor:
        full = self.cache.get((c0, c1))
        if full is None:
            lp = self.cdf.shape[1]
            block = np.broadcast_to(self.cdf[c0:c1], (self.max_rows, c1 - c0, lp)).reshape(-1, lp)
            full = self.cache[(c0, c1)] = torch.from_numpy(np.require(block, requirements=["C", "W"]))
        return full[:n * (c1 - c0)]


def encode_group(group: StreamGroup) -> list[bytes]:
    """Encode every stream of `group` (block-major, then channel group); one bytes object per stream."""
    backend = torchac_backend()
    sym = group.symbols
    expanded = _ExpandedCdf(group.cdf, group.block_rows)
    out: list[bytes] = []
    for r0, n, c0, c1 in iter_streams(group.block_rows, sym.shape[1], group.channels_per_stream):
        if n == 0:
            out.append(b"")
            continue
        block = np.require(sym[r0:r0 + n, c0:c1], requirements=["C", "W"]).reshape(-1)
        out.append(backend.encode_cdf(expanded.rows(n, c0, c1), torch.from_numpy(block)))
    return out


def decode_group(cdf: np.ndarray, block_rows: Sequence[int], channels_per_stream: int,
                 streams: Sequence[bytes]) -> np.ndarray:
    """Decode the streams of one group back to int16 ``[sum(block_rows), channels]``."""
    backend = torchac_backend()
    channels = cdf.shape[0]
    expanded = _ExpandedCdf(cdf, block_rows)
    out = np.empty((int(sum(block_rows)), channels), dtype=np.int16)
    for i, (r0, n, c0, c1) in enumerate(iter_streams(block_rows, channels, channels_per_stream)):
        if n == 0:
            continue
        sym = backend.decode_cdf(expanded.rows(n, c0, c1), bytes(streams[i]))
        out[r0:r0 + n, c0:c1] = sym.numpy().reshape(n, c1 - c0)
    return out
