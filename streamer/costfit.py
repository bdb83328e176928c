"""Fitting a recompute (prefill) cost model to measured timings: ``c + a * len + b * len * (pos + len / 2)``.

Pure numpy. Used by `kvcast calibrate host` (this machine's prefill cost, `kvcast.streamer.host`) and by
``scripts/calibrate_recompute.py`` (the GPU tables of `kvcast.streamer.menus.recompute_costs`).

>>> fit = fit_recompute_cost([(p, n, 1e-3 + 2e-5 * n + 1e-9 * n * (p + n / 2))
...                           for p in (0, 512, 1024) for n in (64, 128)])
>>> [round(x, 12) for x in fit.coef]
[2e-05, 1e-09, 0.001]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["CostFit", "design_row", "fit_recompute_cost", "fit_with_prefix_term", "nnls", "predict_s"]


def design_row(pos: int, length: int) -> tuple[float, float, float]:
    """The model's regressors for one point, in the order (a, b, c)."""
    return float(length), float(length) * (pos + length / 2), 1.0


def predict_s(coef: Sequence[float], pos: int, length: int) -> float:
    """``prefill_s(pos, len)`` for coefficients ``(a, b, c)``."""
    return float(np.dot(coef, design_row(pos, length)))


def nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact non-negative least squares ``argmin_{x >= 0} |a x - y|`` for a few columns.

    The optimum is the unconstrained least-squares solution on its own support, so trying every support
    (2^n of them; n = 3 here) and keeping the best feasible one is exact. Columns are normalised first; a
    support whose coefficients overflow once unscaled (a column of subnormal values) is not a solution."""
    a = np.asarray(a, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if a.ndim != 2 or y.shape != (a.shape[0],):
        raise ValueError(f"nnls: shapes {a.shape} and {y.shape} do not match")
    if a.shape[1] > 12:
        raise ValueError("nnls: support enumeration is for a few columns only")
    if not (np.isfinite(a).all() and np.isfinite(y).all()):
        raise ValueError("nnls: non-finite input")
    n = a.shape[1]
    peak = np.abs(a).max(axis=0)
    peak[peak == 0] = 1.0
    norms = np.linalg.norm(a / peak, axis=0) * peak  # scaled first: tiny columns must not underflow to 0
    norms[norms == 0] = 1.0
    an = a / norms
    best_x, best_r = np.zeros(n), float(np.dot(y, y))
    for k in range(1, n + 1):
        for support in itertools.combinations(range(n), k):
            cols = list(support)
            sol, *_ = np.linalg.lstsq(an[:, cols], y, rcond=None)
            if (sol < 0).any():
                continue
            x = np.zeros(n)
            x[cols] = sol
            with np.errstate(over="ignore"):
                unscaled = x / norms
            if not np.isfinite(unscaled).all():
                continue  # a near-zero column would need a coefficient beyond float range: not a solution
            r = float(np.sum((an @ x - y) ** 2))
            if r < best_r * (1 - 1e-12):
                best_x, best_r = unscaled, r
    return best_x


@dataclass(frozen=True)
class CostFit:
    """Fitted coefficients and the relative residuals ``predicted / measured - 1`` of each point."""

    a_s_per_token: float
    b_s_per_token_pair: float
    c_s: float
    points: tuple[tuple[int, int, float], ...]
    residuals: tuple[float, ...]

    @property
    def coef(self) -> tuple[float, float, float]:
        return self.a_s_per_token, self.b_s_per_token_pair, self.c_s

    @property
    def rms_rel(self) -> float:
        return math.sqrt(sum(r * r for r in self.residuals) / len(self.residuals))

    @property
    def max_abs_rel(self) -> float:
        return max(abs(r) for r in self.residuals)

    def relative_errors(self, points: Iterable[tuple[int, int, float]]) -> list[float]:
        return [predict_s(self.coef, p, n) / t - 1 for p, n, t in points]


def fit_recompute_cost(points: Sequence[tuple[int, int, float]]) -> CostFit:
    """Fit ``(a, b, c) >= 0`` to ``(pos, len, seconds)`` points, minimising the sum of squared relative errors
    (each row weighted by 1 / seconds, so short chunks count as much as long ones)."""
    pts = [(int(p), int(n), float(t)) for p, n, t in points]
    if len(pts) < 3:
        raise ValueError(f"need at least 3 points to fit 3 coefficients, got {len(pts)}")
    for p, n, t in pts:
        if p < 0 or n <= 0 or not (math.isfinite(t) and t > 0):
            raise ValueError(f"bad point pos={p} len={n} seconds={t}: need pos >= 0, len > 0, seconds > 0")
    a = np.array([design_row(p, n) for p, n, _ in pts])
    y = np.array([t for *_, t in pts])
    coef = nnls(a / y[:, None], np.ones_like(y))
    resid = tuple(float(v) for v in (a @ coef) / y - 1)
    return CostFit(float(coef[0]), float(coef[1]), float(coef[2]), tuple(pts), resid)


def fit_with_prefix_term(points: Sequence[tuple[int, int, float]]) -> tuple[tuple[float, ...], list[float]]:
    """Diagnostic: the same relative-error NNLS with a fourth term ``d_s_per_prefix_token * pos`` (work that
    scales with the cached prefix alone, such as copying the KV cache). Returns ``(a, b, c, d)`` and the
    relative residuals. The streamer's model has no such term; this shows how much of the misfit it explains."""
    a = np.array([design_row(p, n) + (float(p),) for p, n, _ in points])
    y = np.array([float(t) for *_, t in points])
    coef = nnls(a / y[:, None], np.ones_like(y))
    return tuple(float(v) for v in coef), [float(v) for v in (a @ coef) / y - 1]
