"""The one layout of every `kvcast bench` result (standard library only, so every part may import it).

Each part's ``bench.py`` measures and returns `result(...)`, a JSON-ready dict::

    {"benchmark": "codec" | "sim" | "mpc" | "traces",
     "version": 1,                      # of this layout
     "machine": {...},                  # `machine()`: platform, CPUs, Python, 1-minute load average
     "settings": {...},                 # every input of the run (the bench's settings dataclass, as a dict)
     "rows": [{...}, ...],              # one flat dict per measured item (level, repeat, trace size, search)
     "summary": {...}}                  # the headline figures

Non-finite floats become None, so the JSON is strict. The CLI prints the JSON alone on stdout and a table on
stderr (`kvcast.clitools.emit_benchmark`).
"""

from __future__ import annotations

import math
import os
import platform
from typing import Any

__all__ = ["LAYOUT_KEYS", "VERSION", "finite", "machine", "result"]

VERSION = 1
LAYOUT_KEYS = ("benchmark", "version", "machine", "settings", "rows", "summary")


def machine() -> dict[str, Any]:
    """Where the benchmark ran; the load average says how busy the shared CPUs were."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    return {"platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or None, "cpus": os.cpu_count(),
            "python": platform.python_version(), "load_average_1min": load}


def result(benchmark: str, settings: dict[str, Any], rows: list[dict[str, Any]],
           summary: dict[str, Any]) -> dict[str, Any]:
    """A benchmark's result in the common layout (see the module docstring)."""
    return finite({"benchmark": benchmark, "version": VERSION, "machine": machine(), "settings": settings,
                    "rows": rows, "summary": summary})


def finite(obj: Any) -> Any:
    """A JSON-safe copy of `obj` (dicts, lists, tuples, scalars): NaN and infinities become None, so the JSON
    is strict (any part may use it for the JSON it writes).

    >>> finite({"a": [1.0, float("nan")], "b": (float("inf"), "x")})
    {'a': [1.0, None], 'b': [None, 'x']}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj
