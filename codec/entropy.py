"""Entropy coding of quantized symbols: CacheGen-style CDFs and torchac range coding on the CPU.

* `cachegen_cdf` estimates one CDF per row (CacheGen: per (K/V, layer, channel)) from the object's own
  symbols with CacheGen's normalisation ``F(i) = floor((65535 - B) * cum_i / N) + i``: strictly increasing,
  so every symbol, seen or not, keeps a non-zero width.
* `RangeCoder` encodes/decodes independent streams with torchac's range coder (32-bit range, 16-bit CDF
  precision). torchac needs one CDF row per symbol; rows are expanded one stream at a time, so memory stays
  bounded by the largest stream, never by the object.
* torchac's C++ source is compiled here with ``-O3`` (the package's own build uses default flags and is about
  half as fast); if that build fails, the package's own build is used.
* torchac holds the GIL, so large objects are coded by a pool of worker processes (`CoderPool`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kvcast.codec.errors import CodecError

CDF_PRECISION_BITS = 16
CDF_TOTAL = 1 << CDF_PRECISION_BITS


@functools.cache
def torchac_backend():
    """The torchac C++ extension, built once with -O3 (cached by torch's extension builder)."""
    spec = importlib.util.find_spec("torchac")
    if spec is None or not spec.submodule_search_locations:
        raise CodecError("torchac is not installed (pip install torchac==0.9.3)")
    source = Path(next(iter(spec.submodule_search_locations))) / "backend" / "torchac_backend.cpp"
    try:
        from torch.utils.cpp_extension import load

        return load(name="kvcast_torchac_o3", sources=[str(source)], extra_cflags=["-O3"], verbose=False)
    except Exception:  # pragma: no cover - fall back to the package's own build
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


def _iter_streams(rows_per_block: Sequence[int], channels: int, channels_per_stream: int):
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
            full = self.cache[(c0, c1)] = torch.from_numpy(np.ascontiguousarray(block))
        return full[:n * (c1 - c0)]


def encode_group(group: StreamGroup) -> list[bytes]:
    """Encode every stream of `group` (block-major, then channel group); one bytes object per stream."""
    backend = torchac_backend()
    sym = group.symbols
    expanded = _ExpandedCdf(group.cdf, group.block_rows)
    out: list[bytes] = []
    for r0, n, c0, c1 in _iter_streams(group.block_rows, sym.shape[1], group.channels_per_stream):
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
    for i, (r0, n, c0, c1) in enumerate(_iter_streams(block_rows, channels, channels_per_stream)):
        if n == 0:
            continue
        sym = backend.decode_cdf(expanded.rows(n, c0, c1), bytes(streams[i]))
        out[r0:r0 + n, c0:c1] = sym.numpy().reshape(n, c1 - c0)
    return out


class _Worker:
    """One `kvcast.codec.worker` subprocess and its pipes."""

    def __init__(self) -> None:
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-m", "kvcast.codec.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd=str(Path(__file__).resolve().parent.parent))

    def call(self, meta: dict, blob: bytes) -> tuple[dict, bytes]:
        from kvcast.codec.worker import read_message, write_message

        try:
            write_message(self.proc.stdin, meta, blob)
            reply, data = read_message(self.proc.stdout)
        except (EOFError, BrokenPipeError, OSError) as exc:
            raise CodecError(f"coder worker died: {exc}") from None
        if "error" in reply:
            raise CodecError(reply["error"] if reply.get("codec_error") else f"coder worker failed: {reply['error']}")
        return reply, data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except Exception:
                self.proc.kill()


class CoderPool:
    """Encodes and decodes stream groups, in worker processes when the work is large enough.

    torchac holds the GIL, so threads alone would not help: each worker is a `kvcast.codec.worker` subprocess,
    driven by one thread here (pipe I/O releases the GIL). Workers start lazily, once, and are reused; a
    group is always coded whole by one worker, so the output does not depend on the number of workers.
    """

    def __init__(self, workers: int | None = None, min_parallel_symbols: int = 1 << 21) -> None:
        self.workers = workers if workers and workers > 0 else (os.cpu_count() or 1)
        self.min_parallel_symbols = min_parallel_symbols
        self._procs: list[_Worker] = []
        self._lock = threading.Lock()

    def _parallel(self, symbols: int) -> bool:
        return self.workers > 1 and symbols >= self.min_parallel_symbols

    def _run(self, calls: Sequence[tuple[dict, bytes]]) -> list[tuple[dict, bytes]]:
        with self._lock:
            while len(self._procs) < self.workers:
                self._procs.append(_Worker())
            results: list[tuple[dict, bytes] | None] = [None] * len(calls)
            errors: list[BaseException] = []
            next_job = iter(range(len(calls)))
            job_lock = threading.Lock()

            def drive(worker: _Worker) -> None:
                while not errors:
                    with job_lock:
                        i = next(next_job, None)
                    if i is None:
                        return
                    try:
                        results[i] = worker.call(*calls[i])
                    except BaseException as exc:  # noqa: BLE001 - re-raised below
                        errors.append(exc)

            threads = [threading.Thread(target=drive, args=(w,), daemon=True) for w in self._procs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                self._close_workers()
                raise errors[0]
            return results  # type: ignore[return-value]

    def run(self, calls: Sequence[tuple[dict, bytes]], total_symbols: int) -> list[tuple[dict, bytes]]:
        """Run `kvcast.codec.pipeline.handle` on every call, in workers when the object is large enough."""
        if not self._parallel(total_symbols):
            from kvcast.codec.pipeline import handle

            return [handle(meta, blob) for meta, blob in calls]
        return self._run(calls)

    def warm_up(self) -> None:
        """Start the worker processes now (benchmarks call this before timing)."""
        if self.workers > 1:
            self._run([({"op": "ping"}, b"")] * self.workers)

    def _close_workers(self) -> None:
        for w in self._procs:
            w.close()
        self._procs = []

    def close(self) -> None:
        with self._lock:
            self._close_workers()

    def __enter__(self) -> "CoderPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._close_workers()
        except Exception:
            pass
