"""Seeded synthetic trace generators (reproducible: same arguments and seed give the same trace).

``seed`` is an ``int`` or a ``numpy.random.Generator``; with an int, ``numpy.random.default_rng(seed)`` is
used, so a generator never touches global random state.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from kvcast.traces.trace import ChunkTrace, Trace

__all__ = ["constant", "markov_on_off", "random_walk", "uniform_chunks"]

SeedLike = int | np.random.Generator


def _seed_note(seed: SeedLike) -> str:
    return f", seed={int(seed)}" if not isinstance(seed, np.random.Generator) else ""


def _rng(seed: SeedLike) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return np.random.default_rng(int(seed))
    raise TypeError(f"seed must be an int or a numpy Generator, got {type(seed).__name__}")


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (0.0 < value < math.inf):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def _non_negative(name: str, value: float) -> float:
    value = float(value)
    if not (0.0 <= value < math.inf):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def constant(bandwidth_bps: float, *, duration_s: float = 1e6, name: str = "") -> Trace:
    """One bandwidth for `duration_s` (long enough for any session by default): a link with no variability, as
    the regime map and the demo's headline tables use.

    >>> constant(3e9).name, constant(3e9).mean_bps
    ('constant 3 Gbps', 3000000000.0)
    """
    bandwidth_bps = _non_negative("bandwidth_bps", bandwidth_bps)
    duration_s = _positive("duration_s", duration_s)
    return Trace([0.0, duration_s], [bandwidth_bps], name=name or f"constant {bandwidth_bps / 1e9:g} Gbps",
                 source=f"synthetic:constant(bandwidth_bps={bandwidth_bps:g})")


def uniform_chunks(num_chunks: int, *, seed: SeedLike, low_bps: float = 0.1e9, high_bps: float = 10e9,
                   chunk_duration_s: float = 0.05, name: str = "", wrap: bool = True) -> ChunkTrace:
    """CacheGen's ``bw_generator``: each chunk's bandwidth i.i.d. uniform on [low_bps, high_bps]
    (default [0.1, 10] Gbps), one value per ``chunk_duration_s``."""
    num_chunks = int(num_chunks)
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    low_bps = _non_negative("low_bps", low_bps)
    high_bps = _non_negative("high_bps", high_bps)
    if high_bps < low_bps:
        raise ValueError(f"need low_bps <= high_bps, got {low_bps} > {high_bps}")
    values = _rng(seed).uniform(low_bps, high_bps, size=num_chunks)
    source = f"synthetic:uniform_chunks(low_bps={low_bps:g}, high_bps={high_bps:g}{_seed_note(seed)})"
    return ChunkTrace(values, chunk_duration_s, name=name or "uniform_chunks", source=source, wrap=wrap)


def markov_on_off(duration_s: float, *, seed: SeedLike, on_bps: float = 5e9, off_bps: float = 0.5e9,
                  mean_on_s: float = 2.0, mean_off_s: float = 0.5, start: Literal["on", "off", "random"] = "random",
                  name: str = "", wrap: bool = True) -> Trace:
    """Two-state (Gilbert-style) on/off Markov trace in continuous time.

    The state alternates between "on" (``on_bps``) and "off" (``off_bps``, 0 for outages); sojourn times are
    exponential with means ``mean_on_s`` and ``mean_off_s``. The long-run fraction of time on is
    ``mean_on_s / (mean_on_s + mean_off_s)``. ``start="random"`` draws the first state from that fraction.
    The last sojourn is cut at ``duration_s``.
    """
    duration_s = _positive("duration_s", duration_s)
    on_bps = _non_negative("on_bps", on_bps)
    off_bps = _non_negative("off_bps", off_bps)
    mean_on_s = _positive("mean_on_s", mean_on_s)
    mean_off_s = _positive("mean_off_s", mean_off_s)
    if start not in ("on", "off", "random"):
        raise ValueError(f"start must be 'on', 'off' or 'random', got {start!r}")
    rng = _rng(seed)
    p_on = mean_on_s / (mean_on_s + mean_off_s)
    state_on = bool(rng.random() < p_on) if start == "random" else start == "on"
    # Draw sojourns in blocks until they cover the duration (vectorised; the expected count is known).
    mean_cycle = mean_on_s + mean_off_s
    chunks: list[np.ndarray] = []
    covered = 0.0
    while covered < duration_s:
        pairs = max(int(1.2 * (duration_s - covered) / mean_cycle) + 8, 8)
        sojourn = rng.exponential(1.0, size=(pairs, 2))
        means = np.array([mean_on_s, mean_off_s] if state_on else [mean_off_s, mean_on_s])
        block = (sojourn * means).ravel()
        chunks.append(block)
        covered += float(block.sum())
    durations = np.concatenate(chunks)
    ends = np.cumsum(durations)
    n = int(np.searchsorted(ends, duration_s, side="left")) + 1
    ends = ends[:n]
    ends[-1] = duration_s
    bnd = np.concatenate([[0.0], ends])
    keep = np.diff(bnd) > 0
    first, second = (on_bps, off_bps) if state_on else (off_bps, on_bps)
    bw = np.where(np.arange(n) % 2 == 0, first, second)[keep]
    bnd = np.concatenate([[0.0], bnd[1:][keep]])
    source = (f"synthetic:markov_on_off(on_bps={on_bps:g}, off_bps={off_bps:g}, mean_on_s={mean_on_s:g}, "
              f"mean_off_s={mean_off_s:g}{_seed_note(seed)})")
    return Trace(bnd, bw, name=name or "markov_on_off", source=source, wrap=wrap)


def random_walk(duration_s: float, *, seed: SeedLike, step_s: float = 0.1, start_bps: float | None = None,
                low_bps: float = 0.5e9, high_bps: float = 10e9, volatility: float = 0.1,
                space: Literal["log", "linear"] = "log", name: str = "", wrap: bool = True) -> Trace:
    """Bounded Gaussian random walk with one value per ``step_s``, clipped to [low_bps, high_bps].

    In ``"log"`` space each step multiplies the bandwidth by ``exp(N(0, volatility^2))`` (relative moves,
    like real links); in ``"linear"`` space it adds ``N(0, (volatility * (high_bps - low_bps))^2)``.
    ``start_bps`` defaults to the geometric (log) or arithmetic (linear) middle of the range.
    """
    duration_s = _positive("duration_s", duration_s)
    step_s = _positive("step_s", step_s)
    low_bps = _non_negative("low_bps", low_bps)
    high_bps = _positive("high_bps", high_bps)
    volatility = _non_negative("volatility", volatility)
    if high_bps < low_bps:
        raise ValueError(f"need low_bps <= high_bps, got {low_bps} > {high_bps}")
    if space not in ("log", "linear"):
        raise ValueError(f"space must be 'log' or 'linear', got {space!r}")
    if space == "log" and low_bps <= 0:
        raise ValueError("a log-space random walk needs low_bps > 0")
    if start_bps is None:
        start_bps = math.sqrt(low_bps * high_bps) if space == "log" else (low_bps + high_bps) / 2
    start_bps = min(max(_non_negative("start_bps", start_bps), low_bps), high_bps)
    n = max(math.ceil(duration_s / step_s - 1e-9), 1)
    steps = _rng(seed).standard_normal(n - 1)
    values = np.empty(n)
    values[0] = start_bps
    if space == "log":
        lo, hi = math.log(low_bps), math.log(high_bps)
        x = math.log(start_bps)
        moves = steps * volatility
        for i in range(1, n):  # clipping makes the walk path-dependent: a short loop, n ~ duration/step
            x = min(max(x + moves[i - 1], lo), hi)
            values[i] = x
        values[1:] = np.exp(values[1:])
        values = np.clip(values, low_bps, high_bps)
    else:
        x = start_bps
        moves = steps * volatility * (high_bps - low_bps)
        for i in range(1, n):
            x = min(max(x + moves[i - 1], low_bps), high_bps)
            values[i] = x
    bnd = np.minimum(np.arange(n + 1, dtype=np.float64) * step_s, duration_s)
    bnd[-1] = duration_s
    source = (f"synthetic:random_walk(space={space}, low_bps={low_bps:g}, high_bps={high_bps:g}, "
              f"volatility={volatility:g}, step_s={step_s:g}{_seed_note(seed)})")
    return Trace(bnd, values, name=name or "random_walk", source=source, wrap=wrap)
