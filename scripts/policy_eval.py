#!/usr/bin/env python
"""Policy evaluation over operating points: ``kvcast sweep`` on real traces, three menus, every comparison
paired on the same sessions, each gain attributed to its cause.

Runs ``kvcast sweep`` once per *menu* (``--levels``), on the same sessions (same seed, traces, contexts):

* ``cachegen``: CacheGen's levels only (cachegen-3, -2, -1);
* ``kvcast``: kvcast's levels only (kvcast-4, -3, -2, -1);
* ``baselines``: raw and int8 only, for Cake as published (16-bit KV), the 8-bit fetch and text recompute.

On each codec menu every controller chooses among exactly the same levels, so a comparison within a menu
isolates the controller, and the same controller across menus isolates the codec. The sweep moves one axis at
a time around the base point (SLO 0.6 s, GPU share 1, bandwidth scale 1, RTT 10 ms, 12-20K-token contexts).

Attribution, per operating point, as paired differences (95% bootstrap CI over traces):

* **Cake's split**: ``cake-cachegen`` minus ``cachegen`` on CacheGen's menu (the same greedy level rule, plus
  recomputing the front while loading the back);
* **planning**: ``hybrid`` and ``mpc`` minus ``cake-cachegen``, on each menu (a cost-model planner instead of
  Cake's split with the greedy rule);
* **kvcast's levels**: the same controller on kvcast's menu minus CacheGen's;
* **in all**: ``hybrid`` on kvcast's menu minus CacheGen as published (``cachegen`` on its menu) and minus
  Cake as published (``cake`` at 16-bit), and the best of the ``cake`` variants;
* **the second objective** (least TTFT within a quality budget): TTFT against ``text``, ``cake`` and
  ``cake-cachegen``.

Writes ``OUT/<menu>/`` (each sweep's outputs), ``OUT/evaluation.json``, ``OUT/evaluation.md`` and
``OUT/attribution.png``, and prints the markdown. Usage::

    python scripts/policy_eval.py [--out results/policy-eval] [--contexts 10] [--skip-sweep]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

SOURCES = ("fcc", "norway_hsdpa", "belgium_4g", "lumos5g")
BUDGETS = (0.0002, 0.002)
"""Quality budgets (mean KL per token) of the second objective: about Cake's at kvcast-4 (near-lossless), and
ten times that."""
CODEC_POLICIES = (
    "text", "cachegen", "cachegen-code", "cake", "cake:inflight=1", "cake-cachegen", "rate", "slack", "mpc",
    "hybrid", "oracle",
    *(f"{p}:objective=ttft+quality_budget={b:g}" for b in BUDGETS for p in ("mpc", "hybrid", "oracle")),
)
MENUS = {
    "cachegen": CODEC_POLICIES,
    "kvcast": CODEC_POLICIES,
    "baselines": ("text", "raw", "fixed:int8", "cake", "cake:inflight=1", "cake:int8", "cake:level=int8+inflight=1"),
}
AXES = {"--slo": "0.3,0.6,1,2", "--gpu-share": "0.25,0.5,1", "--bandwidth-scale": "0.25,0.5,1,2,4",
        "--rtt-ms": "1,10,50", "--context-tokens": "4096,8192,16384"}
AXIS_KEYS = {"slo_s": "SLO (s)", "gpu_share": "GPU share", "bandwidth_scale": "bandwidth scale",
             "rtt_ms": "RTT (ms)", "context_tokens": "context tokens"}
FIELDS = ("violated", "quality_loss", "ttft_s")
RESAMPLES = 2000
"""Bootstrap resamples of `paired` (scripts/learned_eval.py)."""


# Shared with scripts/learned_eval.py (which imports this file as a module).


def source_of(row: dict) -> str:
    """Trace source of a session: the shared folder, with Lumos split into its 4G and 5G traces."""
    path = Path(row["trace_source"])
    folder = path.parent.name
    if folder == "lumos5g":
        return "lumos_4g" if path.name.startswith("4g") else "lumos_5g"
    return folder


def paired(sessions: list[dict], policy: str, reference: str, seed: int = 0) -> dict:
    """Mean difference policy - reference on the same sessions, 95% bootstrap CI over traces."""
    by_key: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for s in sessions:
        by_key[(s["trace_index"], s["context"])][s["policy"]] = s
    rows = [(k[0], v[policy], v[reference]) for k, v in by_key.items() if policy in v and reference in v]
    traces = np.array([r[0] for r in rows])
    viol = np.array([(not a["slo_met"]) - (not b["slo_met"]) for _, a, b in rows], dtype=float)
    qual = np.array([a["quality_loss"] - b["quality_loss"] for _, a, b in rows], dtype=float)
    met = np.array([a["slo_met"] and b["slo_met"] for _, a, b in rows], dtype=bool)
    rng = np.random.default_rng(seed)
    unique = np.unique(traces)
    members = [np.flatnonzero(traces == t) for t in unique]
    boots_v, boots_q, boots_m = [], [], []
    for _ in range(RESAMPLES):
        pick = rng.integers(0, len(unique), len(unique))
        idx = np.concatenate([members[i] for i in pick])
        boots_v.append(viol[idx].mean())
        boots_q.append(qual[idx].mean())
        both = idx[met[idx]]
        boots_m.append(qual[both].mean() if len(both) else np.nan)
    return {"policy": policy, "reference": reference, "sessions": len(rows),
            "violation_diff": float(viol.mean()),
            "violation_diff_ci95": np.percentile(boots_v, [2.5, 97.5]).tolist(),
            "quality_diff": float(qual.mean()),
            "quality_diff_ci95": np.percentile(boots_q, [2.5, 97.5]).tolist(),
            "sessions_fewer_violations": int((viol < 0).sum()),
            "sessions_more_violations": int((viol > 0).sum()),
            "sessions_both_met": int(met.sum()),
            "quality_diff_both_met": float(qual[met].mean()) if met.any() else None,
            "quality_diff_both_met_ci95": np.nanpercentile(boots_m, [2.5, 97.5]).tolist() if met.any() else None}


def fmt_ci(value: float, ci: list[float], digits: int) -> str:
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def ttft_policy(planner: str, budget: float) -> str:
    return f"{planner}:objective=ttft+quality_budget={budget:g}"


def comparisons() -> list[tuple[str, str, str, str]]:
    """(group, label, policy, reference): every paired comparison, policies tagged ``menu/policy``."""
    rows = [("Cake's split", "cake-cachegen - cachegen (CacheGen's levels)", "cachegen/cake-cachegen",
             "cachegen/cachegen")]
    for menu in ("cachegen", "kvcast"):
        for planner in ("hybrid", "mpc"):
            rows.append(("planning", f"{planner} - cake-cachegen ({menu} levels)", f"{menu}/{planner}",
                         f"{menu}/cake-cachegen"))
    for policy in ("cake-cachegen", "hybrid", "mpc", "oracle", "cake"):
        rows.append(("kvcast's levels", f"{policy}: kvcast's - CacheGen's levels", f"kvcast/{policy}",
                     f"cachegen/{policy}"))
    rows += [("in all", "kvcast hybrid - CacheGen (cachegen on its levels)", "kvcast/hybrid", "cachegen/cachegen"),
             ("in all", "kvcast hybrid - Cake as published (cake, 16-bit)", "kvcast/hybrid", "baselines/cake"),
             ("in all", "kvcast hybrid - cake:inflight=1 at 16-bit", "kvcast/hybrid",
              "baselines/cake:inflight=1"),
             ("in all", "kvcast hybrid - kvcast cake-cachegen", "kvcast/hybrid", "kvcast/cake-cachegen"),
             ("gap to the oracle", "kvcast hybrid - kvcast oracle", "kvcast/hybrid", "kvcast/oracle")]
    for budget in BUDGETS:
        for planner in ("hybrid", "mpc"):
            p = f"kvcast/{ttft_policy(planner, budget)}"
            for ref in ("kvcast/text", "kvcast/cake", "kvcast/cake:inflight=1", "kvcast/cake-cachegen",
                        f"cachegen/{ttft_policy(planner, budget)}"):
                rows.append((f"least TTFT, budget {budget:g}", f"{planner} ({budget:g}) - {ref}", p, ref))
    return rows


def run_sweeps(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    walls = {}
    for menu, policies in MENUS.items():
        command = [sys.executable, "-c", "from kvcast.cli import app; app()", "sweep", "--levels", menu,
                   "--policies", ",".join(policies), "--contexts", str(args.contexts), "--seed", str(args.seed),
                   "--resamples", str(args.resamples), "--out", str(out / menu)]
        for flag, values in AXES.items():
            command += [flag, values]
        for source in SOURCES:
            command += ["--traces", os.path.join(args.shared, "traces", source)]
        if args.workers:
            command += ["--workers", str(args.workers)]
        if not args.skip_sweep:
            start = time.perf_counter()
            subprocess.run(command, check=True)
            walls[menu] = time.perf_counter() - start
        walls.setdefault(menu, None)
    return walls


def load_sessions(out: Path) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Sessions by point, policies tagged ``menu/policy``; and each point's axis values. Checks that every menu
    played the very same sessions at every point."""
    by_point: dict[str, list[dict]] = defaultdict(list)
    values: dict[str, dict] = {}
    keys: dict[tuple, tuple] = {}
    for menu in MENUS:
        summary = json.loads((out / menu / "summary.json").read_text())
        for point in summary["points"]:
            first = values.setdefault(point["point"], point["values"] | {"on_axes": point["on_axes"]})
            assert first == point["values"] | {"on_axes": first["on_axes"]}, f"{menu}: point {point['point']} differs"
        with open(out / menu / "sessions.jsonl") as f:
            for line in f:
                s = json.loads(line)
                k = (s["point"], s["trace_index"], s["context"])
                ref = keys.setdefault(k, (s["offset_s"], s["scale_factor"], s["trace"], s["context_tokens"]))
                assert ref == (s["offset_s"], s["scale_factor"], s["trace"], s["context_tokens"]), \
                    f"sessions differ across menus at {k}"
                s["policy"] = f"{menu}/{s['policy']}"
                by_point[s["point"]].append(s)
    return by_point, values


def point_summaries(by_point: dict[str, list[dict]], seed: int, resamples: int) -> dict[str, list[dict]]:
    from kvcast.streamer.report import summarize

    return {p: summarize(rows, seed=seed, resamples=resamples) for p, rows in by_point.items()}


def attribute(by_point: dict[str, list[dict]], seed: int, resamples: int) -> list[dict]:
    from kvcast.streamer.report import paired_difference

    results = []
    for point, rows in sorted(by_point.items()):
        for group, label, policy, reference in comparisons():
            entry = {"point": point, "group": group, "label": label, "policy": policy, "reference": reference}
            for field in FIELDS:
                entry[field] = paired_difference(rows, policy, reference, field, seed=seed, resamples=resamples)
            results.append(entry)
    return results


def fmt(d: dict, digits: int, scale: float = 1.0) -> str:
    lo, hi = d["ci95"]
    star = "" if lo <= 0 <= hi else "*"
    return f"{d['mean'] * scale:+.{digits}f} [{lo * scale:+.{digits}f}, {hi * scale:+.{digits}f}]{star}"


def point_label(values: dict) -> str:
    return (f"SLO {values['slo_s']:g} s, GPU {values['gpu_share']:g}, bw x{values['bandwidth_scale']:g}, "
            f"RTT {values['rtt_ms']:g} ms, {values['context_tokens']} tok")


def axis_of(values: dict) -> str:
    on = values["on_axes"]
    return AXIS_KEYS.get(on[0], on[0]) if len(on) == 1 else "base"


def policy_table(summary: list[dict], menus: tuple[str, ...]) -> list[str]:
    lines = ["| menu/policy | SLO violations [95% CI] | quality loss (KL/token) [95% CI] | TTFT mean (s) "
             "| TTFT p50 (s) | text share |", "|---|---:|---:|---:|---:|---:|"]
    for s in summary:
        if s["policy"].split("/")[0] not in menus:
            continue
        v, vl, vh = s["slo_violation_rate"], *s["slo_violation_rate_ci95"]
        q, ql, qh = s["quality_loss_mean"], *s["quality_loss_mean_ci95"]
        lines.append(f"| `{s['policy']}` | {v:.3f} [{vl:.3f}, {vh:.3f}] | {q:.4f} [{ql:.4f}, {qh:.4f}] "
                     f"| {s['ttft_mean_s']:.3f} | {s['ttft_p50_s']:.3f} | {s['text_chunk_share']:.2f} |")
    return lines


def attribution_table(entries: list[dict], values: dict[str, dict], group_filter) -> list[str]:
    lines = ["| point | comparison | violations (points) | quality loss (KL/token) | TTFT mean (ms) |",
             "|---|---|---:|---:|---:|"]
    for e in entries:
        if not group_filter(e):
            continue
        lines.append(f"| {e['point']} ({axis_of(values[e['point']])}: {point_label(values[e['point']])}) "
                     f"| {e['label']} | {fmt(e['violated'], 1, 100)} | {fmt(e['quality_loss'], 4)} "
                     f"| {fmt(e['ttft_s'], 0, 1000)} |")
    return lines


COMPACT_POLICIES = ("baselines/text", "baselines/cake:level=int8+inflight=1", "cachegen/cachegen",
                    "cachegen/cake-cachegen", "kvcast/cake-cachegen", "cachegen/hybrid", "kvcast/hybrid",
                    "kvcast/mpc", "kvcast/oracle")
"""The policies of the compact per-point table (Cake: its best near-lossless variant, int8 with one request
in flight)."""
COMPACT_COMPARISONS = (("Cake's split", "cachegen/cake-cachegen", "cachegen/cachegen"),
                       ("planning, CacheGen levels", "cachegen/hybrid", "cachegen/cake-cachegen"),
                       ("planning, kvcast levels", "kvcast/hybrid", "kvcast/cake-cachegen"),
                       ("kvcast's levels", "kvcast/hybrid", "cachegen/hybrid"),
                       ("in all", "kvcast/hybrid", "cachegen/cachegen"))


def compact_tables(summaries: dict[str, list[dict]], entries: list[dict], values: dict[str, dict]) -> list[str]:
    """Two tables, one row per point: violations / loss of the main policies; the five attributions."""
    short = {"baselines/text": "text", "baselines/cake:level=int8+inflight=1": "Cake, int8, 1 in flight",
             "cachegen/cachegen": "CacheGen", "cachegen/cake-cachegen": "cake-cachegen (CG)",
             "kvcast/cake-cachegen": "cake-cachegen (kv)", "cachegen/hybrid": "hybrid (CG)",
             "kvcast/hybrid": "hybrid (kv)", "kvcast/mpc": "mpc (kv)", "kvcast/oracle": "oracle (kv)"}
    order = sorted(values, key=lambda p: (axis_of(values[p]) != "base", p))
    lines = ["| point | " + " | ".join(short[p] for p in COMPACT_POLICIES) + " |",
             "|---|" + "---:|" * len(COMPACT_POLICIES)]
    for point in order:
        by = {s["policy"]: s for s in summaries[point]}
        cells = [f"{by[p]['slo_violation_rate']:.3f} / {by[p]['quality_loss_mean']:.4f}" for p in COMPACT_POLICIES]
        lines.append(f"| {_short_point(values[point])} | " + " | ".join(cells) + " |")
    index = {(e["policy"], e["reference"], e["point"]): e for e in entries}
    lines += ["", "| point | " + " | ".join(c[0] for c in COMPACT_COMPARISONS) + " |",
              "|---|" + "---:|" * len(COMPACT_COMPARISONS)]
    for point in order:
        cells = []
        for _, policy, reference in COMPACT_COMPARISONS:
            e = index[(policy, reference, point)]
            cells.append(f"{fmt(e['violated'], 1, 100)}<br>{fmt(e['quality_loss'], 4)}")
        lines.append(f"| {_short_point(values[point])} | " + " | ".join(cells) + " |")
    return lines


def _short_point(values: dict) -> str:
    axis = axis_of(values)
    if axis == "base":
        return "base"
    key = next(k for k, v in AXIS_KEYS.items() if v == axis)
    return f"{axis} {values[key]}"


def plot(entries: list[dict], values: dict[str, dict], path: Path) -> None:
    """Per axis (columns), the violation (top) and quality-loss (bottom) differences of the four causes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = {"Cake's split (cake-cachegen - cachegen, CacheGen levels)":
             ("cachegen/cake-cachegen", "cachegen/cachegen"),
             "planning (hybrid - cake-cachegen, kvcast levels)": ("kvcast/hybrid", "kvcast/cake-cachegen"),
             "kvcast's levels (hybrid, kvcast - CacheGen levels)": ("kvcast/hybrid", "cachegen/hybrid"),
             "in all (kvcast hybrid - cachegen)": ("kvcast/hybrid", "cachegen/cachegen")}
    colors = ["tab:orange", "tab:blue", "tab:green", "black"]
    axes_present = [a for a in AXIS_KEYS if any(a in v["on_axes"] for v in values.values())]
    fig, grid = plt.subplots(2, len(axes_present), figsize=(3.2 * len(axes_present), 6.2), squeeze=False)
    index = {(e["policy"], e["reference"], e["point"]): e for e in entries}
    for col, axis in enumerate(axes_present):
        points = sorted((p for p, v in values.items() if axis in v["on_axes"]),
                        key=lambda p: _axis_value(values[p][axis]))
        xs = [_axis_value(values[p][axis]) for p in points]
        for (label, pair), color in zip(lines.items(), colors):
            for row, (field, scale) in enumerate((("violated", 100), ("quality_loss", 1))):
                ds = [index[(*pair, p)][field] for p in points]
                means = [d["mean"] * scale for d in ds]
                lo = [(d["mean"] - d["ci95"][0]) * scale for d in ds]
                hi = [(d["ci95"][1] - d["mean"]) * scale for d in ds]
                grid[row][col].errorbar(xs, means, yerr=[lo, hi], color=color, marker="o", capsize=3,
                                        label=label if col == 0 and row == 0 else None, markersize=4)
        for row, ylabel in enumerate(("SLO violations, difference (points)", "quality loss, difference (KL/token)")):
            ax = grid[row][col]
            ax.axhline(0, color="grey", lw=0.8)
            ax.grid(alpha=0.3)
            if axis in ("bandwidth_scale", "gpu_share"):
                ax.set_xscale("log", base=2)
            if col == 0:
                ax.set_ylabel(ylabel, fontsize=8)
            if row == 1:
                ax.set_xlabel(AXIS_KEYS[axis])
    fig.legend(loc="upper center", ncol=2, fontsize=8)
    fig.suptitle("Paired differences per operating point (below 0: better; 95% bootstrap CI over traces)",
                 fontsize=9, y=0.9)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _axis_value(value: Any) -> float:
    if isinstance(value, str) and "-" in value:
        lo, hi = value.split("-")
        return (float(lo) + float(hi)) / 2
    return float(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/policy-eval")
    ap.add_argument("--contexts", type=int, default=10)
    ap.add_argument("--shared", default=os.path.join("..", "shared"), help="the shared data folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--skip-sweep", action="store_true", help="summarise existing OUT/<menu>/ outputs")
    args = ap.parse_args()
    out = Path(args.out)
    walls = run_sweeps(args, out)
    by_point, values = load_sessions(out)
    summaries = point_summaries(by_point, args.seed, args.resamples)
    entries = attribute(by_point, args.seed, args.resamples)
    runs = {m: json.loads((out / m / "run.json").read_text()) for m in MENUS}
    result = {"command": " ".join(["python", "scripts/policy_eval.py"] + sys.argv[1:]),
              "date": datetime.date.today().isoformat(),
              "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python "
                         f"{platform.python_version()}",
              "menus": {m: {"policies": list(p), "wall_s": walls[m], "run": runs[m]} for m, p in MENUS.items()},
              "points": values, "summaries": summaries, "attribution": entries}
    (out / "evaluation.json").write_text(json.dumps(result, indent=1))
    plot(entries, values, out / "attribution.png")

    md = [f"Command: `{result['command']}`", f"Machine: {result['machine']}; date {result['date']}.", ""]
    for menu, block in result["menus"].items():
        run = block["run"]
        md.append(f"* menu `{menu}`: {run.get('sessions')} sessions, {run.get('chunks')} chunks, "
                  f"{run.get('wall_s', 0):.0f} s")
    md.append("")
    md += ["## Per point: SLO violations / mean quality loss (KL/token)", ""]
    md += compact_tables(summaries, entries, values)
    md += ["", "## Attribution at every point (paired; * = 95% CI excludes 0)", ""]
    md += attribution_table(entries, values, lambda e: not e["group"].startswith("least TTFT"))
    md += ["", "## The second objective (least TTFT within a quality budget)", ""]
    md += attribution_table(entries, values, lambda e: e["group"].startswith("least TTFT"))
    for point in sorted(summaries):
        md += ["", f"## {point}: {axis_of(values[point])} ({point_label(values[point])})", ""]
        md += policy_table(summaries[point], tuple(MENUS))
    text = "\n".join(md) + "\n"
    (out / "evaluation.md").write_text(text)
    print(text[:4000])


if __name__ == "__main__":
    main()
