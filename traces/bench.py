"""`kvcast bench traces`: cost of the `Trace` integration hot path (`transfer_end_s`, `delivered_bits`).

Returns a `kvcast.benchmark.result` dict: one row per (trace size, wrap) with the median microseconds per
scalar call and nanoseconds per element of the vectorised forms. Printing is the CLI's job
(`kvcast.traces.cli`); this module does not import it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from kvcast.benchmark import result

__all__ = ["TracesBenchSettings", "bench_traces", "run_benchmark"]


@dataclass(frozen=True)
class TracesBenchSettings:
    """Inputs of `bench_traces`."""

    sizes: tuple[int, ...] = (10, 1_000, 100_000)
    """Segments per random trace (5% outages), each timed with and without wrap-around."""
    calls: int = 20_000
    """Calls per timing sample."""
    repeats: int = 7
    """Timing samples; the median is reported."""
    seed: int = 0
    """Seed of the random traces and calls."""

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < 1 or self.calls < 1 or self.repeats < 1:
            raise ValueError("sizes, calls and repeats must be >= 1")


def _median_us(fn: Callable[[], Any], calls: int, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


def bench_traces(settings: TracesBenchSettings = TracesBenchSettings()) -> dict[str, Any]:
    """The benchmark's result; its summary holds the slowest scalar calls over the trace sizes."""
    rows = run_benchmark(settings.sizes, settings.calls, settings.repeats, settings.seed)
    summary = {"statistic": "median",
               "transfer_end_s_us_per_call_max": max(r["transfer_end_s_us_per_call"] for r in rows),
               "delivered_bits_us_per_call_max": max(r["delivered_bits_us_per_call"] for r in rows)}
    return result("traces", asdict(settings), rows, summary)


def run_benchmark(sizes: tuple[int, ...] = TracesBenchSettings.sizes, calls: int = TracesBenchSettings.calls,
                  repeats: int = TracesBenchSettings.repeats, seed: int = TracesBenchSettings.seed
                  ) -> list[dict[str, Any]]:
    """Median microseconds per scalar call and per vectorised element, one row per (trace size, wrap)."""
    import numpy as np

    from kvcast.traces.trace import Trace

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
