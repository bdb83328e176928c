"""The coder pool: runs coder ops (`kvcast.codec.ops`) on (K/V, layer) groups, in parallel when it pays.

torchac holds the GIL, so threads alone would not help: `CoderPool` starts ``python -m kvcast.codec.worker``
subprocesses (lazily, once, reused) and drives each from one thread here (pipe I/O releases the GIL), speaking
`kvcast.codec.protocol`. Objects with fewer symbols than ``min_parallel_symbols`` are coded in-process by the
same `kvcast.codec.ops.handle`, so the output never depends on where a group was coded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from kvcast.codec.errors import CodecError
from kvcast.codec.ops import handle
from kvcast.codec.protocol import read_message, write_message


class _Worker:
    """One `kvcast.codec.worker` subprocess and its pipes."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "kvcast.codec.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd=str(Path(__file__).resolve().parent.parent))

    def call(self, meta: dict, blob: bytes) -> tuple[dict, bytes]:
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
                    except BaseException as exc:  # re-raised below, after the other threads stop
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
        """Run `kvcast.codec.ops.handle` on every call, in workers when the object is large enough."""
        if not self._parallel(total_symbols):
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

    def __enter__(self) -> CoderPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._close_workers()
        except Exception:
            pass
