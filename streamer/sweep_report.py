"""Tables and plots of a sweep (`kvcast.streamer.sweep`) and of the regime map (`kvcast.streamer.regime`).

* `sweep_markdown`: where each policy wins (per point: the best deployable policy, the runner-up, the lead
  with its paired 95% CI, significant or not), wins per policy, and per axis every policy's SLO-violation
  rate, mean quality loss and mean TTFT with 95% CIs.
* `plot_axis`: one PNG per axis, SLO-violation rate and mean quality loss per policy against the axis
  value (the other axes at the base, or at the grid's anchor), with 95% CI bars.
* `regime_markdown`, `plot_regime`: the regime map as a table and as TTFT against bandwidth per GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvcast.streamer.sweep_config import AXES

__all__ = ["plot_axis", "plot_regime", "regime_markdown", "sweep_markdown", "wins_rich_table"]

_MEASURE_FMT = {"violations": ".3f", "quality": ".4f", "ttft": ".3f"}
_MEASURE_NAME = {"violations": "SLO-violation rate", "quality": "quality loss", "ttft": "TTFT (s)"}


def _value_cells(values: dict[str, Any]) -> list[str]:
    return [f"{values[name]:g}" if isinstance(values[name], float) else str(values[name]) for name in AXES]


def _lead(winner: dict[str, Any]) -> str:
    if winner["runner_up"] is None:
        return "(only contender)"
    if winner["decided_by"] is None:
        return "tie"
    fmt = _MEASURE_FMT[winner["decided_by"]]
    lo, hi = winner["lead_ci95"]
    return f"{_MEASURE_NAME[winner['decided_by']]} {winner['lead']:+{fmt}} [{lo:+{fmt}}, {hi:+{fmt}}]"


def wins_lines(summary: dict[str, Any]) -> list[str]:
    """The "where each policy wins" table (markdown lines)."""
    head = ["point", *(a.short for a in AXES.values()), "best", "runner-up", "lead over runner-up [95% CI]",
            "significant"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in summary["points"]:
        w = p["winner"]
        lines.append("| " + " | ".join([p["point"], *_value_cells(p["values"]), f"`{w['best']}`",
                                        f"`{w['runner_up']}`" if w["runner_up"] else "-", _lead(w),
                                        "yes" if w["significant"] else "no"]) + " |")
    return lines


def _policy_rows(point: dict[str, Any], axis: str | None) -> list[str]:
    rows = []
    for s in point["summary"]:
        v, (vl, vh) = s["slo_violation_rate"], s["slo_violation_rate_ci95"]
        q, (ql, qh) = s["quality_loss_mean"], s["quality_loss_mean_ci95"]
        first = [str(point["values"][axis])] if axis else [point["point"]]
        rows.append("| " + " | ".join([*first, f"`{s['policy']}`", str(s["sessions"]), f"{v:.3f} [{vl:.3f}, {vh:.3f}]",
                                       f"{q:.4f} [{ql:.4f}, {qh:.4f}]", f"{s['ttft_mean_s']:.3f}",
                                       f"{s['text_chunk_share']:.2f}"]) + " |")
    return rows


def sweep_markdown(summary: dict[str, Any], title: str) -> str:
    """summary.md of a sweep."""
    base = ", ".join(f"{AXES[k].label} {v}" for k, v in summary["base"].items())
    wins = summary["wins"]
    lines = [f"# kvcast sweep: {title}", "",
             f"Mode: {summary['mode']}; base point: {base}. Every policy plays the same sessions at a point "
             "(paired). 95% bootstrap CIs in brackets (over traces when there are at least 5).", "",
             "## Where each policy wins", "",
             f"Ranked by {' > '.join(_MEASURE_NAME[m] for m in summary['ranking'])} (lower is better) among the "
             f"policies a deployment can run ({', '.join(f'`{p}`' for p in summary['contenders'])}; policies that "
             "need the link's future are bounds, not contenders). The lead is the runner-up minus the best on the "
             "first measure where their means differ, paired on the same sessions; significant when its 95% CI "
             "excludes 0.", "", *wins_lines(summary), "",
             "| policy | points won | of them significantly |", "|---|---:|---:|",
             *(f"| `{p}` | {w['wins']} | {w['significant']} |" for p, w in wins.items()), ""]
    head = "| policy | sessions | SLO violations [95% CI] | quality loss [95% CI] | TTFT mean (s) | text share |"
    for name, axis in AXES.items():
        on = [p for p in summary["points"] if name in p["on_axes"]]
        if name not in summary["axes"] or len(on) < 1:
            continue
        on.sort(key=lambda p: _numeric(name, p["values"][name]))
        lines += [f"## {axis.label}", "", f"| {axis.label} " + head, "|---" + "|---" * 6 + "|"]
        for p in on:
            lines += _policy_rows(p, name)
        lines.append("")
    lines += ["## Every operating point", "", "| point " + head, "|---" + "|---" * 6 + "|"]
    for p in summary["points"]:
        lines += _policy_rows(p, None)
    lines += ["", "Points: " + "; ".join(f"{p['point']} = " + ", ".join(f"{k} {v}" for k, v in p["values"].items())
                                        for p in summary["points"]), ""]
    return "\n".join(lines)


def wins_rich_table(summary: dict[str, Any]) -> Any:
    """The wins table for the console."""
    from rich.table import Table

    table = Table(title="where each policy wins", caption="lead: runner-up minus best, paired 95% CI")
    for name in ["point", *(a.short for a in AXES.values()), "best", "runner-up", "lead", "sig."]:
        table.add_column(name)
    for p in summary["points"]:
        w = p["winner"]
        table.add_row(p["point"], *_value_cells(p["values"]), w["best"], w["runner_up"] or "-", _lead(w),
                      "yes" if w["significant"] else "no")
    return table


def _numeric(axis: str, value: Any) -> float:
    if axis == "context_tokens" and isinstance(value, str):
        lo, hi = (int(x) for x in value.split("-"))
        return (lo + hi) / 2
    return float(value)


def plot_axis(summary: dict[str, Any], axis: str, path: str | Path) -> bool:
    """SLO-violation rate and mean quality loss per policy against `axis` (95% CI bars); False (no file) when
    fewer than two points lie on the axis."""
    on = sorted((p for p in summary["points"] if axis in p["on_axes"]),
                key=lambda p: _numeric(axis, p["values"][axis]))
    if len(on) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [_numeric(axis, p["values"][axis]) for p in on]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    policies = [s["policy"] for s in on[0]["summary"]]
    for k, policy in enumerate(policies):
        rows = [next(s for s in p["summary"] if s["policy"] == policy) for p in on]
        shift = 1 + 0.012 * (k - (len(policies) - 1) / 2)  # small horizontal offsets keep the bars apart
        for ax, key in zip(axes, ("slo_violation_rate", "quality_loss_mean")):
            y = [r[key] for r in rows]
            err = [[max(r[key] - r[f"{key}_ci95"][0], 0) for r in rows],
                   [max(r[f"{key}_ci95"][1] - r[key], 0) for r in rows]]
            ax.errorbar([v * shift for v in x], y, yerr=err, marker="o", capsize=3, label=policy)
    label = AXES[axis].label
    for ax, name in zip(axes, ("SLO-violation rate", "mean quality loss (KL/token)")):
        ax.set_xlabel(label + " (others at the base point)")
        ax.set_ylabel(name + " (lower is better)")
        if min(x) > 0 and max(x) / min(x) >= 8:
            ax.set_xscale("log")
        ax.set_xticks(x, [str(p["values"][axis]) for p in on])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
    axes[0].set_ylim(-0.03, 1.03)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{label}: violations and quality loss per policy (95% CIs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------- regime map


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def regime_markdown(rows: Sequence[dict[str, Any]], lossless: Sequence[str], model: str) -> str:
    """The regime map as a markdown table."""
    lines = [f"# Regime map: TTFT by link bandwidth and GPU ({model}, {rows[0]['context_tokens']} tokens)", "",
             "Constant-bandwidth link. `lossless`: the fastest plan over text and the near-lossless levels "
             f"({', '.join(lossless)}: quality loss at most int8's), with its chunks; `exact`: the same over text and "
             "raw only (bit-exact); `hybrid` at the SLO on every level (its quality loss in KL/token). Speed-ups "
             "are over text recompute.", "",
             "| GPU | Gbps | text (s) | int8 fetch (s) | exact (s) | lossless (s) | lossless speed-up | lossless plan "
             "| hybrid (s) | hybrid loss | hybrid speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        gpu = r["gpu"] + (" (provisional cost)" if r["provisional_cost"] else "")
        lines.append(f"| {gpu} | {r['bandwidth_gbps']:g} | {_s(r['text_ttft_s'])} | {_s(r['int8_ttft_s'])} | "
                     f"{_s(r['exact_ttft_s'])} | {_s(r['lossless_ttft_s'])} | {r['lossless_speedup']:.2f}x | "
                     f"{r['lossless_plan']} | "
                     f"{_s(r['hybrid_ttft_s'])} | {r['hybrid_quality_loss']:.4f} | {r['hybrid_speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot_regime(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """TTFT against bandwidth (log-log), one panel per GPU: text, int8 fetch, the best lossless plan, hybrid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpus = list(dict.fromkeys(r["gpu"] for r in rows))
    fig, axes = plt.subplots(1, len(gpus), figsize=(5.5 * len(gpus), 4.2), squeeze=False, sharey=True)
    for ax, gpu in zip(axes[0], gpus):
        mine = [r for r in rows if r["gpu"] == gpu]
        x = [r["bandwidth_gbps"] for r in mine]
        for key, label, style in (("text_ttft_s", "text recompute", "k-"), ("int8_ttft_s", "int8 fetch", "C0--"),
                                  ("exact_ttft_s", "best exact plan (text + raw)", "C1-s"),
                                  ("lossless_ttft_s", "best lossless plan", "C2-o"),
                                  ("hybrid_ttft_s", "hybrid at the SLO (may be lossy)", "C3:^")):
            y = [r[key] for r in mine]
            if all(v is not None for v in y):
                ax.plot(x, y, style, label=label)
        ax.axhline(mine[0]["hybrid_slo_s"], color="grey", linewidth=0.8, linestyle="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link bandwidth (Gbps)")
        ax.set_title(f"{gpu}" + (" (provisional cost)" if mine[0]["provisional_cost"] else ""))
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("time to first token (s)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"Regime map: {rows[0]['context_tokens']}-token context (dashed: the SLO)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
