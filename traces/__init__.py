"""Throughput traces: the `Trace` class (exact piecewise-constant integration), readers for common trace
formats, synthetic generators and kvcast's default trace set. See `traces/README.md`."""

from traces.trace import ChunkTrace, Trace, TraceError

__all__ = ["ChunkTrace", "Trace", "TraceError"]
