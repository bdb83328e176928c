"""kvcast's own small default trace set: synthetic, generated deterministically from seeds.

The JSON files in ``traces/default/`` (kvcast's JSON trace format) are written by
``python -m traces.defaults`` (or ``kvcast traces write-defaults``) from ``DEFAULT_SPECS``; ``default_traces()``
reads them. They are the traces ``kvcast simulate`` uses when the user gives none. Bandwidths are at KV-cache
scale (0.1 to 10 Gbps), as in CacheGen's and Cake's evaluations.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from kvcast.traces import synthetic
from kvcast.traces.trace import Trace, TraceError

__all__ = [
    "DEFAULT_SPECS",
    "DefaultTraceSpec",
    "default_trace_dir",
    "default_traces",
    "generate_default_traces",
    "write_default_traces",
]


@dataclass(frozen=True)
class DefaultTraceSpec:
    """One default trace: a generator of ``kvcast.traces.synthetic`` with its keyword arguments and seed."""

    name: str
    generator: str
    seed: int
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def build(self) -> Trace:
        make: Callable[..., Trace] = getattr(synthetic, self.generator)
        return make(seed=self.seed, name=self.name, **dict(self.kwargs))


def _spec(name: str, generator: str, seed: int, description: str, **kwargs: Any) -> DefaultTraceSpec:
    return DefaultTraceSpec(name, generator, seed, MappingProxyType(kwargs), description)


DEFAULT_SPECS: tuple[DefaultTraceSpec, ...] = (
    _spec("cachegen-uniform-1", "uniform_chunks", 1, "CacheGen bw_generator: i.i.d. U[0.1, 10] Gbps per 50 ms",
          num_chunks=200),
    _spec("cachegen-uniform-2", "uniform_chunks", 2, "CacheGen bw_generator: i.i.d. U[0.1, 10] Gbps per 50 ms",
          num_chunks=200),
    _spec("cachegen-uniform-3", "uniform_chunks", 3, "CacheGen bw_generator: i.i.d. U[0.1, 10] Gbps per 50 ms",
          num_chunks=200),
    _spec("markov-5g-500m", "markov_on_off", 11, "on/off Markov: 5 Gbps (mean 2 s) / 0.5 Gbps (mean 0.5 s)",
          duration_s=120.0, on_bps=5e9, off_bps=0.5e9, mean_on_s=2.0, mean_off_s=0.5),
    _spec("markov-8g-outage", "markov_on_off", 12, "on/off Markov: 8 Gbps (mean 5 s) / outage (mean 0.2 s)",
          duration_s=120.0, on_bps=8e9, off_bps=0.0, mean_on_s=5.0, mean_off_s=0.2),
    _spec("walk-log-1-10g", "random_walk", 21, "log-space random walk in [1, 10] Gbps, 100 ms steps",
          duration_s=120.0, step_s=0.1, low_bps=1e9, high_bps=10e9, volatility=0.1, space="log"),
    _spec("walk-linear-0.5-5g", "random_walk", 22, "linear random walk in [0.5, 5] Gbps, 100 ms steps",
          duration_s=120.0, step_s=0.1, low_bps=0.5e9, high_bps=5e9, volatility=0.05, space="linear"),
)
"""The default traces, in order."""


def default_trace_dir() -> Path:
    """The folder of the shipped default traces (``traces/default``)."""
    return Path(str(resources.files("kvcast.traces") / "default"))


def generate_default_traces() -> list[Trace]:
    """Build the default traces from ``DEFAULT_SPECS`` (deterministic)."""
    return [spec.build() for spec in DEFAULT_SPECS]


def write_default_traces(directory: str | os.PathLike[str] | None = None) -> list[Path]:
    """Write the default traces as ``<directory>/<name>.json`` (default: the package's ``traces/default``)."""
    out_dir = Path(directory) if directory is not None else default_trace_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for spec, trace in zip(DEFAULT_SPECS, generate_default_traces()):
        obj = trace.to_jsonable()
        obj["description"] = spec.description
        path = out_dir / f"{spec.name}.json"
        path.write_text(json.dumps(obj, separators=(",", ":")) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def default_traces() -> list[Trace]:
    """The shipped default traces, read from ``traces/default/*.json`` in ``DEFAULT_SPECS`` order."""
    from kvcast.traces.readers import load_trace

    folder = default_trace_dir()
    traces = []
    for spec in DEFAULT_SPECS:
        path = folder / f"{spec.name}.json"
        if not path.is_file():
            raise TraceError("default trace missing; regenerate with `python -m traces.defaults`",
                             path=str(path))
        traces.append(load_trace(path, format="kvcast_json"))
    return traces


def main() -> None:
    """Write the default traces into the package folder and print their paths."""
    for path in write_default_traces():
        print(path)


if __name__ == "__main__":
    main()
