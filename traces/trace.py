"""`Trace`: an immutable piecewise-constant bandwidth-over-time function with exact integration.

Segment ``i`` has bandwidth ``bandwidth_bps[i]`` (bits per second) on ``[boundaries_s[i], boundaries_s[i+1])``;
time starts at ``boundaries_s[0] == 0``. Past the end the trace either wraps around (``wrap=True``: period
``duration_s``, as Pensieve, sabre and mm-link replay) or keeps the last segment's bandwidth forever.

``delivered_bits(t0, t1)`` is the integral of the bandwidth over ``[t0, t1]`` and ``transfer_end_s(start_s, bits)``
its inverse: the earliest time at which ``bits`` bits started at ``start_s`` have been delivered. Both use
precomputed cumulative sums, cost O(log n), take scalars (a pure-Python ``bisect`` fast path of a few
microseconds, for simulators) or numpy arrays (vectorised ``np.searchsorted``).

Two seconds at 8 Mbps, then 2 Mbps; 3 Mbit sent at t = 1 s take 1 s at 8 Mbps and 0.5 s at 2 Mbps:

>>> from kvcast.traces import Trace
>>> trace = Trace([0.0, 2.0, 4.0], [8e6, 2e6], wrap=False)
>>> trace.delivered_bits(0.0, 3.0)
18000000.0
>>> trace.transfer_end_s(1.0, 9e6)
2.5
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["JSON_FORMAT_ID", "JSON_FORMAT_VERSION", "ChunkTrace", "Trace", "TraceError"]

JSON_FORMAT_ID = "kvcast-trace"
JSON_FORMAT_VERSION = 1

_PY_SCALARS = frozenset({float, int, np.float64, np.int64})  # fast scalar check; np.ndim costs ~1 us
_REL_TOL = 1e-12  # relative bit tolerance of transfer_end_s (absorbs rounding at zero-bandwidth stretches)


class TraceError(ValueError):
    """A trace is invalid, or a trace file cannot be read.

    For files, ``path`` and ``line`` (1-based, ``None`` when the problem is the whole file) are set and the
    message starts with ``"<path>, line <n>: "``.
    """

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        self.path = path
        self.line = line
        self.reason = message
        if path is not None:
            message = f"{path}, line {line}: {message}" if line is not None else f"{path}: {message}"
        super().__init__(message)

    def __reduce__(self):  # keep path/line across pickling (multiprocessing)
        return (_rebuild_trace_error, (type(self), self.reason, self.path, self.line))


def _rebuild_trace_error(cls: type, reason: str, path: str | None, line: int | None) -> TraceError:
    return cls(reason, path=path, line=line)


def _as_readonly_f64(values: Any, what: str) -> np.ndarray:
    try:
        arr = np.array(values, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise TraceError(f"{what} must be numbers: {exc}") from None
    if arr.ndim != 1:
        raise TraceError(f"{what} must be one-dimensional, got shape {arr.shape}")
    arr.flags.writeable = False
    return arr


class Trace:
    """Immutable piecewise-constant bandwidth over time (bits per second), numpy-backed.

    Args:
        boundaries_s: ``n + 1`` strictly increasing finite times, the first one 0.
        bandwidth_bps: ``n`` finite non-negative bandwidths; segment ``i`` spans
            ``[boundaries_s[i], boundaries_s[i+1])``.
        name: short human-readable name (for tables and plots).
        source: where the trace came from (a file path, ``"synthetic:..."``).
        wrap: past ``duration_s`` the trace repeats from time 0 (``True``) or keeps the last segment's
            bandwidth forever (``False``).

    Raises:
        TraceError: the arrays are invalid.
    """

    __slots__ = ("_b", "_bw", "_cum", "_duration", "_lists", "_total", "name", "source", "wrap")

    def __init__(self, boundaries_s: Any, bandwidth_bps: Any, name: str = "", source: str = "",
                 wrap: bool = True) -> None:
        b = _as_readonly_f64(boundaries_s, "boundaries_s")
        bw = _as_readonly_f64(bandwidth_bps, "bandwidth_bps")
        label = f" (trace {name!r})" if name else ""
        if bw.size < 1:
            raise TraceError(f"a trace needs at least one segment{label}")
        if b.size != bw.size + 1:
            raise TraceError(f"boundaries_s needs len(bandwidth_bps) + 1 = {bw.size + 1} entries, "
                             f"got {b.size}{label}")
        if not np.all(np.isfinite(b)):
            i = int(np.flatnonzero(~np.isfinite(b))[0])
            raise TraceError(f"boundaries_s[{i}] is not finite ({b[i]}){label}")
        if b[0] != 0.0:
            raise TraceError(f"boundaries_s[0] must be 0, got {b[0]}{label}")
        steps = np.diff(b)
        if not np.all(steps > 0):
            i = int(np.flatnonzero(~(steps > 0))[0])
            raise TraceError(f"boundaries_s must be strictly increasing: boundaries_s[{i}] = {b[i]} "
                             f">= boundaries_s[{i + 1}] = {b[i + 1]}{label}")
        if not np.all(np.isfinite(bw)):
            i = int(np.flatnonzero(~np.isfinite(bw))[0])
            raise TraceError(f"bandwidth_bps[{i}] is not finite ({bw[i]}){label}")
        if np.any(bw < 0):
            i = int(np.flatnonzero(bw < 0)[0])
            raise TraceError(f"bandwidth_bps[{i}] is negative ({bw[i]}){label}")
        cum = np.empty(b.size, dtype=np.float64)
        cum[0] = 0.0
        np.cumsum(bw * steps, out=cum[1:])
        cum.flags.writeable = False
        self._b = b
        self._bw = bw
        self._cum = cum
        self._lists: tuple[list[float], list[float], list[float]] | None = None
        self._duration = float(b[-1])
        self._total = float(cum[-1])
        self.name = str(name)
        self.source = str(source)
        self.wrap = bool(wrap)

    # ------------------------------------------------------------------ basic properties
    @property
    def boundaries_s(self) -> np.ndarray:
        """Segment boundaries (read-only array of ``n + 1`` seconds)."""
        return self._b

    @property
    def bandwidth_bps(self) -> np.ndarray:
        """Segment bandwidths (read-only array of ``n`` bits per second)."""
        return self._bw

    @property
    def cumulative_bits(self) -> np.ndarray:
        """Bits delivered from time 0 to each boundary (read-only array of ``n + 1``)."""
        return self._cum

    @property
    def num_segments(self) -> int:
        return int(self._bw.size)

    @property
    def duration_s(self) -> float:
        """Length of one pass of the trace (the wrap period)."""
        return self._duration

    @property
    def total_bits(self) -> float:
        """Bits delivered over one pass, ``delivered_bits(0, duration_s)``."""
        return self._total

    @property
    def mean_bps(self) -> float:
        """Time-weighted mean bandwidth over one pass."""
        return self._total / self._duration

    def percentile_bps(self, q: float) -> float:
        """Time-weighted percentile, ``q`` in [0, 100]: the smallest segment bandwidth ``v`` such that the
        bandwidth is ``<= v`` for at least ``q`` percent of the trace's duration."""
        q = float(q)
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {q}")
        order = np.argsort(self._bw, kind="stable")
        weights = np.cumsum(np.diff(self._b)[order])
        idx = int(np.searchsorted(weights, q / 100.0 * weights[-1] * (1 - 1e-12), side="left"))
        return float(self._bw[order[min(idx, order.size - 1)]])

    def __len__(self) -> int:
        return self.num_segments

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, segments={self.num_segments}, "
                f"duration_s={self._duration:.6g}, mean_mbps={self.mean_bps / 1e6:.6g}, wrap={self.wrap})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Trace):
            return NotImplemented
        return (type(self) is type(other) and self.wrap == other.wrap and self.name == other.name
                and self.source == other.source and np.array_equal(self._b, other._b)
                and np.array_equal(self._bw, other._bw) and self._extra_eq(other))

    def _extra_eq(self, other: Trace) -> bool:
        return True

    __hash__ = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ scalar fast path
    # Positions are split into (period index k, offset r within the period) and bits are counted from the
    # start of the starting period, so large times lose no precision to big cumulative sums. Inverting
    # snaps within a relative tolerance of _REL_TOL bits, so that a rounding excess of an ulp never jumps
    # over a zero-bandwidth stretch.
    def _py(self) -> tuple[list[float], list[float], list[float]]:
        lists = self._lists
        if lists is None:
            lists = (self._b.tolist(), self._bw.tolist(), self._cum.tolist())
            self._lists = lists
        return lists

    def _split(self, t: float) -> tuple[int, float]:
        d = self._duration
        if t < d:
            return 0, t
        k = math.floor(t / d)
        r = t - k * d
        if r < 0.0:
            k -= 1
            r += d
        elif r >= d:
            k += 1
            r -= d
        return k, r

    def _within(self, r: float) -> float:
        """Bits delivered on [0, r] within one pass, 0 <= r <= duration."""
        b, bw, cum = self._py()
        i = bisect_right(b, r) - 1
        if i >= len(bw):
            i = len(bw) - 1
        return cum[i] + bw[i] * (r - b[i])

    def _solve(self, rem: float, tol: float) -> float:
        """Earliest r in [0, duration] with _within(r) >= rem - tol (0 <= rem <= total)."""
        b, bw, cum = self._py()
        j = bisect_left(cum, rem - tol)
        if j == 0:
            return 0.0
        if j >= len(cum):
            j = len(cum) - 1
        i = j - 1
        rate = bw[i]
        if rate <= 0.0:
            return b[j]
        t = b[i] + (rem - cum[i]) / rate
        return t if t < b[j] else b[j]

    def _transfer_scalar(self, start: float, bits: float) -> float:
        total = self._total
        d = self._duration
        if not self.wrap:
            last = self._py()[1][-1]
            if start >= d:
                return start + bits / last if last > 0.0 else math.inf
            target = self._within(start) + bits
            tol = _REL_TOL * target
            if target <= total + tol:
                end = self._solve(target if target < total else total, tol)
            elif last > 0.0:
                end = d + (target - total) / last
            else:
                return math.inf
            return end if end > start else start
        k0, r0 = self._split(start)
        target = self._within(r0) + bits
        tol = _REL_TOL * target
        if target <= total + tol:
            k = 0
            rem = target if target < total else total
        elif total <= 0.0:
            return math.inf
        else:
            k = math.floor(target / total)
            rem = target - k * total
            if rem <= tol:  # reached at (or within rounding of) a period's end
                k -= 1
                rem += total
                if rem > total:
                    rem = total
            elif rem > total:
                k += 1
                rem -= total
        end = (k0 + k) * d + self._solve(rem, tol)
        return end if end > start else start

    # ------------------------------------------------------------------ vectorised path
    def _split_array(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = self._duration
        k = np.floor(t / d)
        r = t - k * d
        low = r < 0
        k[low] -= 1
        r[low] += d
        high = r >= d
        k[high] += 1
        r[high] -= d
        return k, r

    def _within_array(self, r: np.ndarray) -> np.ndarray:
        i = np.clip(np.searchsorted(self._b, r, side="right") - 1, 0, self._bw.size - 1)
        return self._cum[i] + self._bw[i] * (r - self._b[i])

    def _solve_array(self, rem: np.ndarray, tol: np.ndarray) -> np.ndarray:
        j = np.searchsorted(self._cum, rem - tol, side="left")
        at_zero = j == 0
        j = np.clip(j, 1, self._cum.size - 1)
        i = j - 1
        rate = self._bw[i]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(rate > 0, self._b[i] + (rem - self._cum[i]) / rate, self._b[j])
        t = np.minimum(t, self._b[j])
        t[at_zero] = 0.0
        return t

    def _fill_array(self, t: np.ndarray) -> np.ndarray:
        """Non-wrapping cumulative bits F(t) from time 0."""
        d = self._duration
        return self._within_array(np.minimum(t, d)) + float(self._bw[-1]) * np.maximum(t - d, 0.0)

    def _transfer_array(self, s: np.ndarray, x: np.ndarray) -> np.ndarray:
        total = self._total
        d = self._duration
        if not self.wrap:
            last = float(self._bw[-1])
            target = self._within_array(np.minimum(s, d)) + x
            tol = _REL_TOL * target
            inside = (target <= total + tol) & (s < d)
            with np.errstate(divide="ignore", invalid="ignore"):
                beyond = np.where(s >= d, s + x / last, d + (target - total) / last) if last > 0 \
                    else np.full(s.shape, math.inf)
            end = np.where(inside, self._solve_array(np.minimum(target, total), tol), beyond)
            return np.maximum(end, s)
        if total <= 0.0:
            return np.full(s.shape, math.inf)
        k0, r0 = self._split_array(s)
        target = self._within_array(r0) + x
        tol = _REL_TOL * target
        k = np.zeros_like(target)
        rem = target.copy()
        over = target > total + tol
        if np.any(over):
            kk = np.floor(target[over] / total)
            rr = target[over] - kk * total
            low = rr <= tol[over]
            kk[low] -= 1
            rr[low] += total
            high = rr > total
            kk[high] += 1
            rr[high] -= total
            k[over] = kk
            rem[over] = rr
        rem = np.minimum(rem, total)
        end = (k0 + k) * d + self._solve_array(rem, tol)
        return np.maximum(end, s)

    # ------------------------------------------------------------------ public integration API
    def bandwidth_at(self, t: Any) -> Any:
        """Bandwidth (bps) at time ``t`` (scalar or array; segments are closed on the left)."""
        if type(t) in _PY_SCALARS or np.ndim(t) == 0:
            t = float(t)
            if not 0.0 <= t < math.inf:
                raise ValueError(f"time must be finite and >= 0, got {t}")
            b, bw, _ = self._py()
            if t >= self._duration:
                if not self.wrap:
                    return bw[-1]
                t = self._split(t)[1]
            return bw[bisect_right(b, t) - 1]
        arr = np.asarray(t, dtype=np.float64)
        if np.any(~((arr >= 0) & np.isfinite(arr))):
            raise ValueError("times must be finite and >= 0")
        arr = self._split_array(arr.copy())[1] if self.wrap else np.minimum(arr, self._duration)
        i = np.clip(np.searchsorted(self._b, arr, side="right") - 1, 0, self._bw.size - 1)
        return self._bw[i]

    def delivered_bits(self, t0: Any, t1: Any) -> Any:
        """Exact integral of the bandwidth over ``[t0, t1]`` (bits); ``0 <= t0 <= t1``; scalars or arrays."""
        if (type(t0) in _PY_SCALARS and type(t1) in _PY_SCALARS) or (np.ndim(t0) == 0 and np.ndim(t1) == 0):
            t0 = float(t0)
            t1 = float(t1)
            if not 0.0 <= t0 <= t1 < math.inf:
                raise ValueError(f"need 0 <= t0 <= t1 < inf, got t0={t0}, t1={t1}")
            if t0 == t1:
                return 0.0
            if self.wrap:
                k0, r0 = self._split(t0)
                k1, r1 = self._split(t1)
                bits = (k1 - k0) * self._total + self._within(r1) - self._within(r0)
            else:
                d = self._duration
                last = self._py()[1][-1]
                bits = (self._within(min(t1, d)) + last * max(t1 - d, 0.0)
                        - self._within(min(t0, d)) - last * max(t0 - d, 0.0))
            return bits if bits > 0.0 else 0.0
        a0, a1 = np.broadcast_arrays(np.asarray(t0, dtype=np.float64), np.asarray(t1, dtype=np.float64))
        if np.any(~((a0 >= 0) & (a0 <= a1) & np.isfinite(a1))):
            raise ValueError("need 0 <= t0 <= t1 < inf elementwise")
        a0 = np.array(a0, dtype=np.float64)
        a1 = np.array(a1, dtype=np.float64)
        if self.wrap:
            k0, r0 = self._split_array(a0)
            k1, r1 = self._split_array(a1)
            out = (k1 - k0) * self._total + self._within_array(r1) - self._within_array(r0)
        else:
            out = self._fill_array(a1) - self._fill_array(a0)
        out = np.maximum(out, 0.0)
        out[a0 == a1] = 0.0
        return out

    def transfer_end_s(self, start_s: Any, bits: Any) -> Any:
        """Earliest time at which ``bits`` bits started at ``start_s`` have been delivered.

        Inverse of :meth:`delivered_bits` (``delivered_bits(s, transfer_end_s(s, x)) == x`` up to a relative
        1e-12); zero-bandwidth stretches are skipped; ``math.inf`` if never (e.g. an all-zero trace).
        Scalars take a pure-Python path (a few microseconds); arrays broadcast.
        """
        if (type(start_s) in _PY_SCALARS and type(bits) in _PY_SCALARS) or (
                np.ndim(start_s) == 0 and np.ndim(bits) == 0):
            start_s = float(start_s)
            bits = float(bits)
            if not (0.0 <= start_s < math.inf) or not bits >= 0.0:
                raise ValueError(f"need finite start_s >= 0 and bits >= 0, got start_s={start_s}, bits={bits}")
            if bits == 0.0:
                return start_s
            if bits == math.inf:
                return math.inf
            return self._transfer_scalar(start_s, bits)
        s, x = np.broadcast_arrays(np.asarray(start_s, dtype=np.float64), np.asarray(bits, dtype=np.float64))
        if np.any(~((s >= 0) & np.isfinite(s) & (x >= 0))):
            raise ValueError("need finite start_s >= 0 and bits >= 0 elementwise")
        s = np.array(s, dtype=np.float64)
        x = np.array(x, dtype=np.float64)
        finite = np.isfinite(x)
        out = np.full(s.shape, math.inf)
        out[finite] = self._transfer_array(s[finite], x[finite])
        zero = x == 0
        out[zero] = s[zero]
        return out

    # ------------------------------------------------------------------ derived traces
    def _with(self, boundaries_s: Any, bandwidth_bps: Any, *, name: str | None = None,
              wrap: bool | None = None) -> Trace:
        return Trace(boundaries_s, bandwidth_bps, name=self.name if name is None else name,
                     source=self.source, wrap=self.wrap if wrap is None else wrap)

    def scaled(self, factor: float) -> Trace:
        """Every bandwidth multiplied by ``factor >= 0`` (timestamps unchanged, as sabre's multiplier)."""
        factor = float(factor)
        if not (0.0 <= factor < math.inf):
            raise ValueError(f"scale factor must be finite and >= 0, got {factor}")
        return self._with(self._b, self._bw * factor)

    def scaled_to_mean(self, bps: float) -> Trace:
        """Scaled so that ``mean_bps == bps``; keeps the relative variability (CoV, p90/p10)."""
        bps = float(bps)
        if not (0.0 <= bps < math.inf):
            raise ValueError(f"target mean must be finite and >= 0, got {bps}")
        if self._total <= 0.0:
            raise TraceError(f"cannot scale an all-zero trace to a mean of {bps} bps"
                             + (f" (trace {self.name!r})" if self.name else ""))
        return self.scaled(bps / self.mean_bps)

    def _unrolled(self, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
        """Boundaries (starting at 0) and bandwidths of this trace's timeline on [t0, t1], wrap-aware."""
        d = self._duration
        if not self.wrap:
            if t0 >= d:
                return np.array([0.0, t1 - t0]), self._bw[-1:].copy()
            inner_end = min(t1, d)
            lo = bisect_right(self._py()[0], t0) - 1
            hi = int(np.searchsorted(self._b, inner_end, side="left"))
            bnd = np.concatenate([[t0], self._b[lo + 1:hi], [inner_end]])
            bw = self._bw[lo:hi].copy()
            if t1 > d:
                bnd = np.append(bnd, t1)
                bw = np.append(bw, self._bw[-1])
            return bnd - t0, bw
        k0 = math.floor(t0 / d)
        k1 = math.ceil(t1 / d)
        reps = max(k1 - k0, 1)
        inner = self._b[1:-1]
        starts = (np.arange(k0, k0 + reps) * d)[:, None]
        bnd = np.concatenate([(starts + np.concatenate([[0.0], inner])[None, :]).ravel(), [(k0 + reps) * d]])
        bw = np.tile(self._bw, reps)
        lo = max(int(np.searchsorted(bnd, t0, side="right")) - 1, 0)
        hi = min(int(np.searchsorted(bnd, t1, side="left")), bw.size)
        bnd = np.concatenate([[t0], bnd[lo + 1:hi], [t1]])
        bw = bw[lo:hi]
        return _drop_empty(bnd - t0, bw)

    def sliced(self, t0: float, t1: float) -> Trace:
        """The part of this trace's timeline on ``[t0, t1]`` as a new trace starting at 0 (unrolling wraps)."""
        t0 = float(t0)
        t1 = float(t1)
        if not (0.0 <= t0 < t1 < math.inf):
            raise ValueError(f"need 0 <= t0 < t1 < inf, got t0={t0}, t1={t1}")
        bnd, bw = self._unrolled(t0, t1)
        return self._with(bnd, bw)

    def offset(self, start_s: float) -> Trace:
        """The trace as seen from ``start_s`` on: for a wrapping trace a rotation by ``start_s`` (same period
        and mean); otherwise the tail from ``start_s`` (keeping the last bandwidth past the end)."""
        start_s = float(start_s)
        if not (0.0 <= start_s < math.inf):
            raise ValueError(f"offset must be finite and >= 0, got {start_s}")
        if self.wrap:
            start_s = math.fmod(start_s, self._duration)
            if start_s == 0.0:
                return self._with(self._b, self._bw)
            return self._with(*self._unrolled(start_s, start_s + self._duration))
        if start_s >= self._duration:
            return self._with([0.0, 1.0], self._bw[-1:])
        return self._with(*self._unrolled(start_s, self._duration))

    def repeated(self, times: int) -> Trace:
        """This trace played ``times`` times back to back (``times >= 1``)."""
        times = int(times)
        if times < 1:
            raise ValueError(f"times must be >= 1, got {times}")
        d = self._duration
        starts = (np.arange(times) * d)[:, None]
        bnd = np.concatenate([(starts + self._b[None, :-1]).ravel(), [times * d]])
        return self._with(bnd, np.tile(self._bw, times))

    def with_name(self, name: str) -> Trace:
        return self._with(self._b, self._bw, name=name)

    def with_wrap(self, wrap: bool) -> Trace:
        return self._with(self._b, self._bw, wrap=wrap)

    # ------------------------------------------------------------------ JSON
    def to_jsonable(self) -> dict[str, Any]:
        """A JSON-ready dict in kvcast's trace format (see ``traces/README.md``)::

            {"format": "kvcast-trace", "version": 1, "name": str, "source": str, "wrap": bool,
             "durations_s": [float, ...], "bandwidth_bps": [float, ...]}

        ``durations_s[i]`` is the length of segment ``i``.
        """
        return {
            "format": JSON_FORMAT_ID,
            "version": JSON_FORMAT_VERSION,
            "name": self.name,
            "source": self.source,
            "wrap": self.wrap,
            "durations_s": np.diff(self._b).tolist(),
            "bandwidth_bps": self._bw.tolist(),
        }

    @classmethod
    def from_jsonable(cls, obj: Mapping[str, Any]) -> Trace:
        """Inverse of :meth:`to_jsonable`; raises :class:`TraceError` on any malformed field."""
        if not isinstance(obj, Mapping):
            raise TraceError(f"a kvcast trace must be a JSON object, got {type(obj).__name__}")
        if obj.get("format") != JSON_FORMAT_ID:
            raise TraceError(f"not a kvcast trace: 'format' is {obj.get('format')!r}, "
                             f"expected {JSON_FORMAT_ID!r}")
        version = obj.get("version")
        if version != JSON_FORMAT_VERSION:
            raise TraceError(f"unsupported kvcast trace version {version!r} (this kvcast reads "
                             f"{JSON_FORMAT_VERSION})")
        for key in ("durations_s", "bandwidth_bps"):
            if not isinstance(obj.get(key), list):
                raise TraceError(f"kvcast trace field {key!r} must be a list")
        for key in ("name", "source"):
            if not isinstance(obj.get(key, ""), str):
                raise TraceError(f"kvcast trace field {key!r} must be a string")
        if not isinstance(obj.get("wrap", True), bool):
            raise TraceError("kvcast trace field 'wrap' must be true or false")
        durations = _as_readonly_f64(obj["durations_s"], "durations_s")
        if durations.size and not np.all(np.isfinite(durations) & (durations > 0)):
            i = int(np.flatnonzero(~(np.isfinite(durations) & (durations > 0)))[0])
            raise TraceError(f"durations_s[{i}] must be finite and > 0, got {durations[i]}")
        bnd = np.concatenate([[0.0], np.cumsum(durations)])
        kwargs = {"name": obj.get("name", ""), "source": obj.get("source", ""), "wrap": obj.get("wrap", True)}
        chunk = obj.get("chunk")
        if chunk is None:
            return Trace(bnd, obj["bandwidth_bps"], **kwargs)
        if not isinstance(chunk, Mapping) or not isinstance(chunk.get("duration_s"), (int, float)):
            raise TraceError("kvcast trace field 'chunk' must be {\"duration_s\": number}")
        bw = _as_readonly_f64(obj["bandwidth_bps"], "bandwidth_bps")
        chunk_s = float(chunk["duration_s"])
        if durations.size != bw.size or not np.allclose(durations, chunk_s, rtol=1e-9, atol=0.0):
            raise TraceError("a chunked kvcast trace needs one duration per bandwidth, all equal to "
                             "chunk.duration_s")
        return ChunkTrace(bw, chunk_s, **kwargs)


def _drop_empty(bnd: np.ndarray, bw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove zero-length segments (and force the first boundary to exactly 0)."""
    keep = np.diff(bnd) > 0
    if not np.all(keep):
        bw = bw[keep]
        bnd = np.concatenate([[bnd[0]], bnd[1:][keep]])
    bnd = bnd.copy()
    bnd[0] = 0.0
    return bnd, bw


class ChunkTrace(Trace):
    """A trace of one bandwidth per fixed-length chunk (CacheGen's per-KV-chunk traces).

    ``chunk_bps[i]`` holds on ``[i * chunk_duration_s, (i + 1) * chunk_duration_s)``; artifact-faithful
    policies read these values directly (``bandwidth_of_chunk``), simulators integrate them as any trace.
    """

    __slots__ = ("chunk_duration_s",)

    def __init__(self, chunk_bps: Any, chunk_duration_s: float, name: str = "", source: str = "",
                 wrap: bool = True) -> None:
        chunk_duration_s = float(chunk_duration_s)
        if not (0.0 < chunk_duration_s < math.inf):
            raise TraceError(f"chunk_duration_s must be finite and > 0, got {chunk_duration_s}")
        n = int(np.size(chunk_bps))
        super().__init__(np.arange(n + 1, dtype=np.float64) * chunk_duration_s, chunk_bps, name=name,
                         source=source, wrap=wrap)
        self.chunk_duration_s = chunk_duration_s

    @property
    def chunk_bps(self) -> np.ndarray:
        """Per-chunk bandwidths (bits per second, read-only)."""
        return self.bandwidth_bps

    @property
    def num_chunks(self) -> int:
        return self.num_segments

    def bandwidth_of_chunk(self, index: int) -> float:
        """Bandwidth of chunk ``index`` (wrapping past the last chunk when ``wrap``; else the last one)."""
        index = int(index)
        if index < 0:
            raise IndexError(f"chunk index must be >= 0, got {index}")
        n = self.num_chunks
        if index >= n:
            index = index % n if self.wrap else n - 1
        return float(self.bandwidth_bps[index])

    def _extra_eq(self, other: Trace) -> bool:
        return self.chunk_duration_s == getattr(other, "chunk_duration_s", None)

    def _with_chunks(self, chunk_bps: Any, **kw: Any) -> ChunkTrace:
        return ChunkTrace(chunk_bps, self.chunk_duration_s, name=kw.get("name", self.name),
                          source=self.source, wrap=kw.get("wrap", self.wrap))

    def scaled(self, factor: float) -> ChunkTrace:
        factor = float(factor)
        if not (0.0 <= factor < math.inf):
            raise ValueError(f"scale factor must be finite and >= 0, got {factor}")
        return self._with_chunks(self.chunk_bps * factor)

    def scaled_to_mean(self, bps: float) -> ChunkTrace:
        return super().scaled_to_mean(bps)  # type: ignore[return-value]

    def repeated(self, times: int) -> ChunkTrace:
        times = int(times)
        if times < 1:
            raise ValueError(f"times must be >= 1, got {times}")
        return self._with_chunks(np.tile(self.chunk_bps, times))

    def with_name(self, name: str) -> ChunkTrace:
        return self._with_chunks(self.chunk_bps, name=name)

    def with_wrap(self, wrap: bool) -> ChunkTrace:
        return self._with_chunks(self.chunk_bps, wrap=wrap)

    def to_jsonable(self) -> dict[str, Any]:
        obj = super().to_jsonable()
        obj["chunk"] = {"duration_s": self.chunk_duration_s}
        return obj
