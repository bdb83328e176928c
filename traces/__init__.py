"""Throughput traces: the `Trace` class (exact piecewise-constant integration), readers for common trace
formats, synthetic generators and kvcast's default trace set. See `traces/README.md`."""

from kvcast.traces.defaults import default_traces
from kvcast.traces.readers import FORMATS, LoadResult, ReadOptions, TraceFile, detect_format, load_trace, load_traces
from kvcast.traces.synthetic import constant, markov_on_off, random_walk, uniform_chunks
from kvcast.traces.trace import ChunkTrace, Trace, TraceError

__all__ = [
    "FORMATS", "ChunkTrace", "LoadResult", "ReadOptions", "Trace", "TraceError", "TraceFile", "constant",
    "default_traces", "detect_format", "load_trace", "load_traces", "markov_on_off", "random_walk", "uniform_chunks",
]
