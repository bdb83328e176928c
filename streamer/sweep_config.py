"""The operating points of a sweep (`kvcast sweep`): the axes, their parsing, and the points to run.

A sweep varies five settings of `SimulationConfig` around a *base point*:

=================  =====================  ===================================================================
axis               option                 what it sets
=================  =====================  ===================================================================
``slo_s``          ``--slo``              the TTFT target (s)
``gpu_share``      ``--gpu-share``        the recompute's share of the GPU: recompute times divided by it
``bandwidth_scale`` ``--bandwidth-scale`` every trace bandwidth times this factor (after ``--scaling``)
``rtt_ms``         ``--rtt-ms``           the round-trip time per chunk request (ms)
``context_tokens`` ``--context-tokens``   the context length, or a range ``low-high`` drawn per context
=================  =====================  ===================================================================

*One at a time* (the default) runs the base point and, for each axis given, every listed value with the other
axes at the base; *grid* runs every combination of the listed values (axes not given stay at the base). This
module is light (the standard library only), so the CLI reads its defaults at import time.

>>> axes = {"slo_s": parse_axis("slo_s", "0.3,0.6,1"), "rtt_ms": parse_axis("rtt_ms", "1,50")}
>>> points = plan_points(axes, BASE_POINT)
>>> [(p.point.slo_s, p.point.rtt_ms, p.on_axes) for p in points]
[(0.6, 10.0, ('slo_s',)), (0.3, 10.0, ('slo_s',)), (1.0, 10.0, ('slo_s',)), (0.6, 1.0, ('rtt_ms',)), \
(0.6, 50.0, ('rtt_ms',))]
>>> len(plan_points(axes, BASE_POINT, grid=True))
6
>>> parse_axis("slo_s", "0.3,fast")
Traceback (most recent call last):
kvcast.streamer.sweep_config.SweepError: --slo: 'fast' is not a number (give a comma-separated list, e.g. 0.3,0.6,1,2)
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from kvcast.streamer.config import SimulationConfig

__all__ = ["AXES", "BASE_POINT", "AxisSpec", "OperatingPoint", "PlannedPoint", "RegimeSettings", "SweepError",
           "REGIME_GBPS", "check_value", "format_tokens", "parse_axis", "parse_base", "parse_list", "plan_points"]


class SweepError(ValueError):
    """Bad sweep input: an axis list, a base point, an executor or a combination of options."""


@dataclass(frozen=True)
class AxisSpec:
    """One sweep axis."""

    name: str
    """The `OperatingPoint` field."""
    option: str
    """The command-line option that lists its values."""
    label: str
    """Axis label of plots and tables."""
    short: str
    """Column header of tables."""
    example: str
    """An example list, for error messages and help."""
    minimum: float
    """Values must be > minimum (or >= when `inclusive`)."""
    inclusive: bool = False


AXES: Mapping[str, AxisSpec] = MappingProxyType({a.name: a for a in (
    AxisSpec("slo_s", "--slo", "SLO (s)", "SLO s", "0.3,0.6,1,2", 0.0),
    AxisSpec("gpu_share", "--gpu-share", "GPU share (recompute time / share)", "GPU share", "0.25,0.5,1", 0.0),
    AxisSpec("bandwidth_scale", "--bandwidth-scale", "bandwidth scale (x trace)", "bw scale", "0.25,0.5,1,2,4",
             0.0),
    AxisSpec("rtt_ms", "--rtt-ms", "RTT (ms)", "RTT ms", "1,10,50", 0.0, inclusive=True),
    AxisSpec("context_tokens", "--context-tokens", "context tokens", "context", "4096,8192,16384,12288-20480",
             0.0),
)})
"""The sweep axes, in the order of plots and tables."""


@dataclass(frozen=True)
class OperatingPoint:
    """The values of every axis at one point of a sweep."""

    slo_s: float = SimulationConfig.slo_s
    gpu_share: float = SimulationConfig.gpu_share
    bandwidth_scale: float = SimulationConfig.bandwidth_scale
    rtt_ms: float = SimulationConfig.rtt_s * 1e3
    context_tokens: tuple[int, int] = SimulationConfig.context_tokens
    """Context length range (low, high), drawn per context; low == high for a fixed length."""

    def config(self, base: SimulationConfig) -> SimulationConfig:
        """`base` with this point's values."""
        return replace(base, slo_s=self.slo_s, gpu_share=self.gpu_share, bandwidth_scale=self.bandwidth_scale,
                       rtt_s=self.rtt_ms / 1e3, context_tokens=self.context_tokens)

    def value(self, axis: str) -> Any:
        return getattr(self, axis)

    def numeric(self, axis: str) -> float:
        """The axis value as a number (a context range: its midpoint), for plots."""
        value = self.value(axis)
        return (value[0] + value[1]) / 2 if axis == "context_tokens" else float(value)

    def labels(self) -> dict[str, Any]:
        """JSON-ready values: numbers, the context length as an int or ``"low-high"``."""
        return {name: format_tokens(self.context_tokens) if name == "context_tokens" else getattr(self, name)
                for name in AXES}


BASE_POINT = OperatingPoint()
"""The default base point: `SimulationConfig`'s defaults (SLO 0.6 s, dedicated GPU, traces as scaled, RTT 10 ms,
12-20K-token contexts)."""


@dataclass(frozen=True)
class PlannedPoint:
    """A point to run, and the axes whose plot (and table) it lies on."""

    point: OperatingPoint
    on_axes: tuple[str, ...] = field(default=())


def format_tokens(tokens: tuple[int, int]) -> int | str:
    """``(n, n)`` -> ``n``; ``(lo, hi)`` -> ``"lo-hi"``."""
    return tokens[0] if tokens[0] == tokens[1] else f"{tokens[0]}-{tokens[1]}"


def _number(axis: AxisSpec, item: str) -> float:
    try:
        value = float(item)
    except ValueError:
        raise SweepError(f"{axis.option}: {item!r} is not a number (give a comma-separated list, "
                         f"e.g. {axis.example})") from None
    return _in_range(axis, value, repr(item))


def _in_range(axis: AxisSpec, value: float, shown: str) -> float:
    low_ok = value >= axis.minimum if axis.inclusive else value > axis.minimum
    if not (math.isfinite(value) and low_ok):
        bound = ">=" if axis.inclusive else ">"
        raise SweepError(f"{axis.option}: {shown} must be finite and {bound} {axis.minimum:g}")
    return value


def check_value(name: str, value: float) -> float:
    """`value` if it is a valid single value of numeric axis `name` (e.g. ``kvcast simulate --gpu-share``), checked
    as a listed value is; SweepError naming the option otherwise.

    >>> check_value("gpu_share", 0.5)
    0.5
    >>> check_value("bandwidth_scale", float("inf"))
    Traceback (most recent call last):
    kvcast.streamer.sweep_config.SweepError: --bandwidth-scale: inf must be finite and > 0
    """
    if name not in AXES or name == "context_tokens":
        raise SweepError(f"not a numeric sweep axis: {name!r}")
    return _in_range(AXES[name], float(value), format(value, "g"))


def _tokens(axis: AxisSpec, item: str) -> tuple[int, int]:
    parts = re.split(r"-", item)
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise SweepError(f"{axis.option}: {item!r} is not a token count or a range low-high of whole numbers "
                         f"(e.g. {axis.example})") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not 0 < values[0] <= values[1]:
        raise SweepError(f"{axis.option}: {item!r} must be a count > 0 or a range low-high with 0 < low <= high")
    return values[0], values[1]


def parse_value(name: str, item: str) -> Any:
    """One value of axis `name` from text."""
    axis = AXES[name]
    return _tokens(axis, item.strip()) if name == "context_tokens" else _number(axis, item.strip())


def parse_axis(name: str, text: str) -> tuple[Any, ...]:
    """The values of axis `name` (an `AXES` key) from a comma-separated list; SweepError names the option and
    the bad item (not a number, out of range, empty item, repeated value)."""
    if name not in AXES:
        raise SweepError(f"unknown sweep axis {name!r}; axes: {', '.join(AXES)}")
    return parse_list(AXES[name], text)


def parse_list(axis: AxisSpec, text: str) -> tuple[Any, ...]:
    """`parse_axis` for any `AxisSpec` (e.g. `REGIME_GBPS`)."""
    items = [x.strip() for x in text.split(",")]
    if not text.strip() or any(not x for x in items):
        raise SweepError(f"{axis.option}: empty value in {text!r} (give a comma-separated list, e.g. {axis.example})")
    values = tuple(_tokens(axis, x) if axis.name == "context_tokens" else _number(axis, x) for x in items)
    seen: set[Any] = set()
    for item, value in zip(items, values):
        if value in seen:
            raise SweepError(f"{axis.option}: {item!r} is listed twice in {text!r}")
        seen.add(value)
    return values


REGIME_GBPS = AxisSpec("bandwidth_gbps", "--regime-gbps", "link bandwidth (Gbps)", "Gbps", "0.5,1,3,10,100", 0.0)
"""The bandwidth list of the regime map, parsed as an axis."""


def parse_base(text: str | None, base: OperatingPoint = BASE_POINT) -> OperatingPoint:
    """`base` with the values of ``"axis=value,..."`` (axis names as options without the dashes, e.g.
    ``slo=1,rtt-ms=20,context-tokens=16384``, or as fields, ``slo_s=1``)."""
    if not text or not text.strip():
        return base
    by_key = {a.option.lstrip("-"): a.name for a in AXES.values()} | {a.name: a.name for a in AXES.values()}
    changes: dict[str, Any] = {}
    for item in (x.strip() for x in text.split(",")):
        key, sep, value = item.partition("=")
        name = by_key.get(key.strip())
        if not sep or name is None:
            raise SweepError(f"--base: {item!r} is not axis=value with an axis of "
                             f"{', '.join(a.option.lstrip('-') for a in AXES.values())}")
        if name in changes:
            raise SweepError(f"--base: {key.strip()!r} is given twice")
        changes[name] = parse_value(name, value)
    return replace(base, **changes)


def plan_points(axes: Mapping[str, Sequence[Any]], base: OperatingPoint = BASE_POINT, *,
                grid: bool = False) -> list[PlannedPoint]:
    """The points to run, each once, in a stable order.

    One at a time: the base point first, then each axis's values (in `AXES` order, values as listed) with the
    other axes at the base; a value equal to the base's is the base point itself (which then lies on that
    axis; the base always runs, as the reference). Each axis's plot thus has exactly its listed values.
    Grid: every combination of the listed values (axes not listed at the base); an axis's plot then runs
    through the *anchor*, the base value of every other axis where it is listed, else its first listed value.
    """
    given = [name for name in AXES if name in axes]
    for name in given:
        if not axes[name]:
            raise SweepError(f"{AXES[name].option}: no values")
    if not grid:
        order: list[OperatingPoint] = [base]
        on: dict[OperatingPoint, list[str]] = {base: []}
        for name in given:
            for value in axes[name]:
                point = replace(base, **{name: value})
                if point not in on:
                    order.append(point)
                    on[point] = []
                if name not in on[point]:
                    on[point].append(name)
        return [PlannedPoint(p, tuple(on[p])) for p in order]
    anchor = {name: getattr(base, name) if getattr(base, name) in axes[name] else axes[name][0] for name in given}
    planned = []
    for combo in itertools.product(*(axes[name] for name in given)):
        values = dict(zip(given, combo))
        point = replace(base, **values)
        on_axes = tuple(name for name in given
                        if all(values[other] == anchor[other] for other in given if other != name))
        planned.append(PlannedPoint(point, on_axes))
    return planned


@dataclass(frozen=True)
class RegimeSettings:
    """Inputs of the regime map (``kvcast sweep --regime-map``, `kvcast.streamer.regime`)."""

    bandwidths_gbps: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0)
    """Constant link bandwidths (Gbps)."""
    gpus: tuple[str, ...] = ("h100", "a100")
    """GPUs of the recompute cost table (``gpu/model`` must be in ``recompute_costs.json``)."""
    context_tokens: int = 16384
    """Tokens of the context."""

    def __post_init__(self) -> None:
        if not self.bandwidths_gbps or not all(b > 0 and math.isfinite(b) for b in self.bandwidths_gbps):
            raise SweepError(f"--regime-gbps: bandwidths must be finite and > 0, got {self.bandwidths_gbps}")
        if not self.gpus:
            raise SweepError("--regime-gpus: no GPU given")
        if self.context_tokens <= 0:
            raise SweepError(f"--regime-context-tokens must be > 0, got {self.context_tokens}")
