"""Microbenchmark of the `Trace` integration hot path (`transfer_end_s`, `delivered_bits`).

Run ``kvcast traces bench`` (or ``python -m traces.bench``): prints a JSON document and a table of median
costs per call (scalar) and per element (vectorised) for traces of several sizes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from kvcast.traces.trace import Trace

__all__ = ["run_benchmark"]


def _median_us(fn: Callable[[], Any], calls: int, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


def run_benchmark(sizes: tuple[int, ...] = (10, 1_000, 100_000), calls: int = 20_000, repeats: int = 7,
                  seed: int = 0) -> list[dict[str, Any]]:
    """Median microseconds per scalar call and per vectorised element, one row per (trace size, wrap)."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        widths = rng.uniform(0.05, 1.5, n)
        bw = rng.uniform(0.1e9, 10e9, n) * (rng.random(n) > 0.05)  # 5% outages
        for wrap in (True, False):
            trace = Trace(np.concatenate([[0.0], np.cumsum(widths)]), bw, wrap=wrap)
            starts = (rng.random(calls) * 3 * trace.duration_s).tolist()
            sizes_bits = (rng.uniform(1e6, 1e9, calls)).tolist()
            ends = [s + w for s, w in zip(starts, rng.uniform(0, 2.0, calls).tolist())]
            pairs = list(zip(starts, sizes_bits))
            spans = list(zip(starts, ends))
            transfer = trace.transfer_end_s
            delivered = trace.delivered_bits

            def scalar_transfer(pairs: list = pairs, transfer: Callable = transfer) -> None:
                for s, x in pairs:
                    transfer(s, x)

            def scalar_delivered(spans: list = spans, delivered: Callable = delivered) -> None:
                for a, b in spans:
                    delivered(a, b)

            s_arr = np.array(starts)
            x_arr = np.array(sizes_bits)
            e_arr = np.array(ends)
            scalar_transfer()  # warm the list cache
            rows.append({
                "segments": n, "wrap": wrap,
                "transfer_end_s_us_per_call": _median_us(scalar_transfer, calls, repeats),
                "delivered_bits_us_per_call": _median_us(scalar_delivered, calls, repeats),
                "transfer_end_s_vectorised_ns_per_elem":
                    _median_us(partial(transfer, s_arr, x_arr), calls, repeats) * 1e3,
                "delivered_bits_vectorised_ns_per_elem":
                    _median_us(partial(delivered, s_arr, e_arr), calls, repeats) * 1e3,
            })
    return rows


def main() -> None:
    from kvcast.traces.cli import bench

    bench(calls=20_000, repeats=7)


if __name__ == "__main__":
    main()
