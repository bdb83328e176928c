"""Summaries of simulated sessions: per-policy metrics with bootstrap confidence intervals, tables, plots.

Confidence intervals are 95% percentile bootstrap intervals. Sessions on the same trace are correlated, so
when there are at least `MIN_CLUSTERS` traces the bootstrap resamples whole traces (a cluster bootstrap);
with fewer traces it resamples sessions.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MIN_CLUSTERS", "PAIRED_FIELDS", "markdown_table", "paired_difference", "plot_pareto", "plot_ttft_cdf",
           "rich_table", "summarize"]

MIN_CLUSTERS = 5
BOOTSTRAP_RESAMPLES = 1000

_METRICS = (
    # summary key, session field, statistic
    ("slo_violation_rate", "violated", "mean"),
    ("ttft_mean_s", "ttft_s", "mean"),
    ("ttft_p50_s", "ttft_s", "p50"),
    ("ttft_p95_s", "ttft_s", "p95"),
    ("quality_loss_mean", "quality_loss", "mean"),
    ("bytes_mean", "bytes_loaded", "mean"),
    ("overrun_mean_s", "overrun_s", "mean"),
)


def _stat(values: np.ndarray, how: str, axis: int = -1) -> Any:
    if how == "mean":
        return values.mean(axis=axis)
    return np.percentile(values, 50 if how == "p50" else 95, axis=axis)


def summarize(sessions: Sequence[dict[str, Any]], *, seed: int = 0,
              resamples: int = BOOTSTRAP_RESAMPLES) -> list[dict[str, Any]]:
    """One summary object per policy (in order of first appearance), with ``<metric>_ci95`` intervals.

    Each session needs ``policy``, ``trace_index``, ``ttft_s``, ``slo_met``, ``overrun_s``, ``quality_loss``,
    ``bytes_loaded``, ``text_chunks`` and ``chunks``.
    """
    by_policy: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in sessions:
        by_policy[s["policy"]].append(s)
    out = []
    for k, (policy, rows) in enumerate(by_policy.items()):
        rng = np.random.default_rng([seed, k, 7])
        data = {
            "violated": np.array([0.0 if r["slo_met"] else 1.0 for r in rows]),
            "ttft_s": np.array([r["ttft_s"] for r in rows], dtype=np.float64),
            "quality_loss": np.array([r["quality_loss"] for r in rows], dtype=np.float64),
            "bytes_loaded": np.array([r["bytes_loaded"] for r in rows], dtype=np.float64),
            "overrun_s": np.array([r["overrun_s"] for r in rows], dtype=np.float64),
        }
        clusters = np.array([r.get("trace_index", 0) for r in rows])
        index = _bootstrap_index(clusters, rng, resamples)
        summary: dict[str, Any] = {"policy": policy, "sessions": len(rows)}
        for key, field, how in _METRICS:
            values = data[field]
            summary[key] = float(_stat(values, how))
            boot = _stat(values[index], how, axis=1)
            lo, hi = np.percentile(boot, [2.5, 97.5])
            summary[f"{key}_ci95"] = [float(lo), float(hi)]
        summary["overrun_p95_s"] = float(np.percentile(data["overrun_s"], 95))
        chunks = sum(r["chunks"] for r in rows)
        summary["text_chunk_share"] = sum(r["text_chunks"] for r in rows) / chunks if chunks else 0.0
        summary["traces"] = int(np.unique(clusters).size)
        summary["bootstrap"] = "traces" if np.unique(clusters).size >= MIN_CLUSTERS else "sessions"
        out.append(summary)
    return out


def _bootstrap_index(clusters: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """``(resamples, n)`` session indices: whole clusters resampled when there are enough of them (a
    resample of unequal cluster sizes is trimmed or padded to ``n`` from its own draw)."""
    n = clusters.size
    labels, inverse = np.unique(clusters, return_inverse=True)
    if labels.size < MIN_CLUSTERS:
        return rng.integers(0, n, size=(resamples, n))
    members = [np.flatnonzero(inverse == c) for c in range(labels.size)]
    sizes = {m.size for m in members}
    picks = rng.integers(0, labels.size, size=(resamples, labels.size))
    if len(sizes) == 1:
        table = np.stack(members)  # (clusters, size)
        return table[picks].reshape(resamples, -1)
    rows = []
    for draw in picks:
        row = np.concatenate([members[c] for c in draw])
        row = np.resize(row, n)
        rows.append(row)
    return np.stack(rows)


PAIRED_FIELDS = {
    "violated": lambda r: 0.0 if r["slo_met"] else 1.0,
    "quality_loss": lambda r: float(r["quality_loss"]),
    "ttft_s": lambda r: float(r["ttft_s"]),
    "overrun_s": lambda r: float(r["overrun_s"]),
    "bytes_loaded": lambda r: float(r["bytes_loaded"]),
}
"""Per-session values `paired_difference` compares: ``violated`` is 1 for a missed SLO, 0 otherwise."""


def paired_difference(sessions: Sequence[dict[str, Any]], policy: str, reference: str, field: str, *,
                      seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """Mean of ``policy - reference`` over the sessions both played, with a 95% percentile bootstrap CI.

    Sessions pair on ``(trace_index, context)``; the bootstrap resamples whole traces when the pairs span at
    least `MIN_CLUSTERS` of them, else pairs (as `summarize`). `field` is a key of `PAIRED_FIELDS`. The
    difference is significant at 5% when the interval excludes 0.

    >>> rows = [{"policy": p, "trace_index": t, "context": 0, "slo_met": True, "quality_loss": q}
    ...         for t in range(6) for p, q in (("a", 0.01 + t / 1000), ("b", 0.02 + t / 1000))]
    >>> d = paired_difference(rows, "b", "a", "quality_loss")
    >>> round(d["mean"], 6), d["pairs"], d["ci95"][0] > 0
    (0.01, 6, True)
    """
    if field not in PAIRED_FIELDS:
        raise ValueError(f"unknown field {field!r}; fields: {', '.join(PAIRED_FIELDS)}")
    value = PAIRED_FIELDS[field]
    by_key: dict[tuple[Any, Any], dict[str, dict[str, Any]]] = defaultdict(dict)
    for s in sessions:
        if s["policy"] in (policy, reference):
            by_key[(s.get("trace_index", 0), s["context"])][s["policy"]] = s
    keys = [k for k, v in by_key.items() if policy in v and reference in v]
    if not keys:
        raise ValueError(f"no session played by both {policy!r} and {reference!r}")
    diff = np.array([value(by_key[k][policy]) - value(by_key[k][reference]) for k in keys])
    clusters = np.array([k[0] for k in keys])
    rng = np.random.default_rng([seed, 11])
    boot = diff[_bootstrap_index(clusters, rng, resamples)].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"policy": policy, "reference": reference, "field": field, "pairs": len(keys),
            "mean": float(diff.mean()), "ci95": [float(lo), float(hi)],
            "bootstrap": "traces" if np.unique(clusters).size >= MIN_CLUSTERS else "sessions",
            "better": int((diff < 0).sum()), "worse": int((diff > 0).sum())}


def _fmt_ci(value: float, ci: Sequence[float], fmt: str) -> str:
    return f"{value:{fmt}} [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


_COLUMNS = (
    ("SLO violations", "slo_violation_rate", ".3f"),
    ("TTFT mean (s)", "ttft_mean_s", ".3f"),
    ("TTFT p50 (s)", "ttft_p50_s", ".3f"),
    ("TTFT p95 (s)", "ttft_p95_s", ".3f"),
    ("quality loss", "quality_loss_mean", ".4f"),
    ("GB loaded", "bytes_mean", ".3f"),
)


def _cells(s: dict[str, Any], compact: bool = False) -> list[str]:
    cells = [s["policy"], str(s["sessions"])]
    for _, key, fmt in _COLUMNS:
        value, ci = s[key], s[f"{key}_ci95"]
        if key == "bytes_mean":
            value, ci = value / 1e9, [c / 1e9 for c in ci]
        if compact:  # value and the CI's half-width
            cells.append(f"{value:{fmt}} ±{(ci[1] - ci[0]) / 2:{fmt}}")
        else:
            cells.append(_fmt_ci(value, ci, fmt))
    cells.append(f"{s['text_chunk_share']:.2f}")
    return cells


def _headers() -> list[str]:
    return ["policy", "sessions", *[name for name, _, _ in _COLUMNS], "text share"]


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    """The summary as a markdown table (values with 95% CIs in brackets)."""
    lines = ["| " + " | ".join(_headers()) + " |", "|" + "---|" * len(_headers())]
    for s in summary:
        lines.append("| " + " | ".join(_cells(s)) + " |")
    return "\n".join(lines) + "\n"


def rich_table(summary: Sequence[dict[str, Any]], title: str = "") -> Any:
    """The summary as a `rich.table.Table` (values ± half the 95% CI)."""
    from rich.table import Table

    table = Table(title=title or None, caption="± half-width of the 95% bootstrap CI")
    for i, name in enumerate(_headers()):
        table.add_column(name, justify="left" if i == 0 else "right")
    for s in summary:
        table.add_row(*_cells(s, compact=True))
    return table


def plot_ttft_cdf(sessions: Sequence[dict[str, Any]], path: str | Path, *,
                  slo_s: float | None = None) -> None:
    """CDF of TTFT per policy (PNG), with the SLO as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_policy: dict[str, list[float]] = defaultdict(list)
    for s in sessions:
        by_policy[s["policy"]].append(s["ttft_s"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, values in by_policy.items():
        x = np.sort(np.asarray(values))
        y = np.arange(1, x.size + 1) / x.size
        ax.step(x, y, where="post", label=policy)
    if slo_s is not None:
        ax.axvline(slo_s, color="black", linestyle="--", linewidth=1, label=f"SLO {slo_s:g} s")
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (s, log scale)")
    ax.set_ylabel("fraction of sessions")
    ax.set_ylim(0, 1.0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("TTFT per policy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pareto(summary: Sequence[dict[str, Any]], path: str | Path) -> None:
    """SLO-violation rate vs mean quality loss per policy, with 95% CIs (PNG): lower-left is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summary:
        x, y = s["quality_loss_mean"], s["slo_violation_rate"]
        xl, xh = s["quality_loss_mean_ci95"]
        yl, yh = s["slo_violation_rate_ci95"]
        ax.errorbar([x], [y], xerr=[[max(x - xl, 0)], [max(xh - x, 0)]],
                    yerr=[[max(y - yl, 0)], [max(yh - y, 0)]], fmt="o", capsize=3, label=s["policy"])
        ax.annotate(s["policy"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("mean quality loss (lower is better)")
    ax.set_ylabel("SLO-violation rate (lower is better)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(True, alpha=0.3)
    ax.set_title("SLO violations vs quality loss (95% bootstrap CIs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_timeline(chunks: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> None:
    """One session's chunks over time: a lane each for the link, the decoder and the compute unit; bars
    coloured by level (text in grey), labelled with the chunk index (rows as `FetchResult.chunk_rows`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({c["action"] for c in chunks if c["action"] not in (None, "text")})
    cmap = plt.get_cmap("tab10")
    colour = {lv: cmap(i % 10) for i, lv in enumerate(levels)}
    colour["text"] = (0.55, 0.55, 0.55, 1.0)
    lanes = (("link", "transfer"), ("decode", "decode"), ("compute", "recompute"))
    fig, ax = plt.subplots(figsize=(9, 2.6), constrained_layout=True)
    for y, (_, key) in enumerate(lanes):
        for c in chunks:
            start, end = c.get(f"{key}_start_s"), c.get(f"{key}_end_s")
            if start is None or end is None:
                continue
            ax.barh(y, max(end - start, 1e-4), left=start, color=colour.get(c["action"], "black"),
                    edgecolor="white", linewidth=0.5)
            ax.text(start + (end - start) / 2, y, str(c["index"]), ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(lanes)), [name for name, _ in lanes])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the session's start")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[k]) for k in [*levels, "text"]]
    ax.legend(handles, [*levels, "text"], loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=8, fontsize=8,
              frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
