#!/usr/bin/env python
"""Policy-quality evaluation on real throughput traces: SLO violations and quality loss per policy and menu.

Runs ``kvcast simulate`` over the real traces of ``../shared/traces`` (FCC, Norway HSDPA, Belgium 4G, Lumos
4G and 5G), each trace scaled to a mean drawn log-uniformly in 1-10 Gbps, Mistral-7B-sized chunks of
12-20K-token contexts, H100 recompute costs, the shipped (measured) codec profile and the default 0.6 s SLO
(text-only misses it in ~90% of sessions), once per *menu* (``--levels`` of ``kvcast simulate``):

* ``cachegen``: CacheGen's levels cachegen-3, -2, -1 (CacheGen's menu);
* ``kvcast``: kvcast's levels kvcast-4, -3, -2, -1.

Each menu is one codec's levels only, so every controller on it chooses among the same levels; the ``raw``
baseline runs only on a menu that has ``raw``.

Every menu runs on the same (trace, context) sessions (same seed), so comparisons across menus are paired
too. The CacheGen controllers (``cachegen``, ``cachegen-code``) use CacheGen's levels; on the kvcast menu,
which has none, they run their rule on kvcast's levels (CacheGen's controller with kvcast's codec). Then it
summarises:

* per menu, every policy over all sessions and per trace source (violation rate, mean quality loss, 95%
  bootstrap CIs over traces), and paired differences against ``cachegen`` and against the ``oracle``;
* across menus, paired on the same sessions: each policy on the kvcast menu minus the same policy on the
  CacheGen menu, and the planning controllers on the kvcast menu minus CacheGen (``cachegen`` on its menu).

Writes ``OUT/<menu>/`` (simulate's outputs), ``OUT/evaluation.json``, ``OUT/evaluation.md`` and
``OUT/pareto.png``, and prints the markdown. Usage::

    python scripts/policy_eval.py [--out results/policy-eval] [--menus cachegen,kvcast] [--contexts 20]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

SOURCES = ("fcc", "norway_hsdpa", "belgium_4g", "lumos5g")
BASE_POLICIES = ("text", "raw", "fixed:{fixed}", "cachegen", "cachegen-code", "mpc", "hybrid", "oracle")
FIXED_LEVEL = {"cachegen": "cachegen-2", "kvcast": "kvcast-2"}
"""The fixed-level baseline of each menu (kvcast-2 has cachegen-2's top-1 agreement, 86%)."""
PLANNERS = ("mpc", "hybrid", "oracle")
RESAMPLES = 2000


def source_of(row: dict) -> str:
    """Trace source of a session: the shared folder, with Lumos split into its 4G and 5G traces."""
    path = Path(row["trace_source"])
    folder = path.parent.name
    if folder == "lumos5g":
        return "lumos_4g" if path.name.startswith("4g") else "lumos_5g"
    return folder


def menu_policies(menu: str, same_mu_weight: float | None) -> tuple[str, ...]:
    from kvcast.streamer.menus import resolve_levels
    from kvcast.streamer.profile import default_profile

    on_menu = set(resolve_levels(default_profile(), menu))
    policies = tuple(p.format(fixed=FIXED_LEVEL.get(menu, "raw")) for p in BASE_POLICIES
                     if p != "raw" or "raw" in on_menu)
    if same_mu_weight is not None:
        policies += (f"mpc:weight={same_mu_weight:.4g}",)
    return policies


def same_mu_weight(menu: str, reference: str = "cachegen") -> float | None:
    """mpc's overrun weight on `menu` that gives it the overrun price ``mu`` it has on the `reference` menu
    (``mu = weight * q_span / SLO``, ``q_span`` the largest loss on the menu), or None if they are equal."""
    from kvcast.streamer.menus import resolve_levels
    from kvcast.streamer.profile import default_profile

    profile = default_profile()

    def span(spec: str) -> float:
        return max(profile.level(n).quality_loss for n in resolve_levels(profile, spec))

    ratio = span(reference) / span(menu)
    return None if abs(ratio - 1.0) < 1e-9 else 20.0 * ratio


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


def table(summary: list[dict], levels: dict[str, dict[str, float]] | None = None) -> list[str]:
    head = ("| policy | sessions | SLO violations [95% CI] | quality loss (KL/token) [95% CI] "
            "| TTFT mean (s) | text share |")
    sep = "|---|---:|---:|---:|---:|---:|"
    if levels is not None:
        head += " loaded chunks by level |"
        sep += "---|"
    lines = [head, sep]
    for s in summary:
        viol = fmt_ci(s["slo_violation_rate"], s["slo_violation_rate_ci95"], 3)
        qual = fmt_ci(s["quality_loss_mean"], s["quality_loss_mean_ci95"], 4)
        line = (f"| `{s['policy']}` | {s['sessions']} | {viol} | {qual} | {s['ttft_mean_s']:.3f} "
                f"| {s['text_chunk_share']:.2f} |")
        if levels is not None:
            shares = levels.get(s["policy"], {})
            line += " " + (", ".join(f"{k} {v:.0%}" for k, v in shares.items() if v >= 0.005) or "-") + " |"
        lines.append(line)
    return lines


def paired_lines(pairs: list[dict]) -> list[str]:
    lines = ["| policy | vs | violation-rate difference | quality-loss difference | sessions better / worse "
             "| quality-loss difference where both meet the SLO (sessions) |", "|---|---|---:|---:|---:|---:|"]
    for p in pairs:
        viol = fmt_ci(p["violation_diff"], p["violation_diff_ci95"], 3)
        qual = fmt_ci(p["quality_diff"], p["quality_diff_ci95"], 4)
        both = ("-" if p["quality_diff_both_met"] is None else
                f"{fmt_ci(p['quality_diff_both_met'], p['quality_diff_both_met_ci95'], 4)} "
                f"({p['sessions_both_met']})")
        lines.append(f"| `{p['policy']}` | `{p['reference']}` | {viol} | {qual} "
                     f"| {p['sessions_fewer_violations']} / {p['sessions_more_violations']} | {both} |")
    return lines


def level_shares(run_dir: Path) -> dict[str, dict[str, float]]:
    """Per policy, the share of *loaded* chunks at each level (from simulate's chunks.jsonl)."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    path = run_dir / "chunks.jsonl"
    if not path.exists():
        return {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if row["action"] != "text":
                counts[row["policy"]][row["action"]] += 1
    out = {}
    for policy, c in counts.items():
        total = sum(c.values())
        out[policy] = {k: v / total for k, v in sorted(c.items(), key=lambda kv: -kv[1])}
    return out


def plot(results: dict[str, dict], path: Path) -> None:
    """Violations vs quality loss per policy, one marker per menu, an arrow from the first menu to the others
    (text, raw, fixed levels and option variants are left out: the tables have them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = ["o", "s", "^", "D"]
    colors = {"cachegen": "tab:red", "cachegen-code": "tab:orange", "mpc": "tab:blue", "hybrid": "tab:green",
              "oracle": "black"}
    fig, ax = plt.subplots(figsize=(8, 5))
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for m, (menu, block) in enumerate(results.items()):
        for s in block["overall"]:
            name = s["policy"]
            if name not in colors:
                continue
            x, y = s["quality_loss_mean"], s["slo_violation_rate"]
            (xl, xh), (yl, yh) = s["quality_loss_mean_ci95"], s["slo_violation_rate_ci95"]
            ax.errorbar([x], [y], xerr=[[max(x - xl, 0)], [max(xh - x, 0)]],
                        yerr=[[max(y - yl, 0)], [max(yh - y, 0)]], fmt=markers[m % len(markers)],
                        color=colors[name], capsize=3, markersize=7,
                        markerfacecolor="white" if m == 0 else colors[name],
                        label=f"{name}, {menu} menu")
            points[name].append((x, y))
    for name, pts in points.items():
        for a, b in zip(pts, pts[1:]):
            ax.annotate("", xy=b, xytext=a, arrowprops={"arrowstyle": "->", "color": colors[name], "alpha": 0.5})
    ax.set_xscale("log")
    ax.set_xlabel("mean quality loss, KL per token (log scale; lower is better)")
    ax.set_ylabel("SLO-violation rate (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="center right")
    ax.set_title("SLO violations vs quality loss, 4,220 sessions per point (95% bootstrap CIs over traces)\n"
                 "arrows: from CacheGen's levels to kvcast's levels on the menu, same policy and sessions",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def simulate(menu: str, policies: tuple[str, ...], out: Path, args) -> list[str]:
    command = [sys.executable, "-m", "kvcast.cli", "simulate", "--policies", ",".join(policies),
               "--levels", menu, "--out", str(out), "--contexts", str(args.contexts), "--seed", str(args.seed)]
    for source in SOURCES:
        command += ["--traces", os.path.join(args.shared, "traces", source)]
    if args.workers:
        command += ["--workers", str(args.workers)]
    if not args.skip_simulate:
        subprocess.run(command, check=True)
    return command


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/policy-eval")
    ap.add_argument("--menus", default="cachegen,kvcast", help="--levels of each run (the first is the reference)")
    ap.add_argument("--contexts", type=int, default=20)
    ap.add_argument("--shared", default=os.path.join("..", "shared"), help="the shared data folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--skip-simulate", action="store_true", help="summarise existing OUT/<menu>/sessions.jsonl")
    args = ap.parse_args()
    from kvcast.streamer.report import summarize

    out = Path(args.out)
    menus = [m.strip() for m in args.menus.split(",") if m.strip()]
    reference_menu = menus[0]
    results: dict[str, dict] = {}
    tagged: list[dict] = []  # every session, policy tagged "<menu>/<policy>", for cross-menu pairs
    keys: dict[str, dict] = {}
    for menu in menus:
        policies = menu_policies(menu, same_mu_weight(menu, reference_menu) if menu != reference_menu else None)
        menu_out = out / menu
        command = simulate(menu, policies, menu_out, args)
        sessions = [json.loads(line) for line in (menu_out / "sessions.jsonl").read_text().splitlines() if line]
        for s in sessions:  # the menus must run the very same sessions
            k = (s["trace_index"], s["context"])
            ref = keys.setdefault(k, {"offset_s": s["offset_s"], "scale_factor": s["scale_factor"],
                                      "trace": s["trace"]})
            assert (ref["offset_s"], ref["scale_factor"], ref["trace"]) == \
                (s["offset_s"], s["scale_factor"], s["trace"]), f"sessions differ across menus at {k}"
            tagged.append({**s, "policy": f"{menu}/{s['policy']}"})
        overall = summarize(sessions, seed=args.seed)
        by_source = {}
        for source in sorted({source_of(s) for s in sessions}):
            rows = [s for s in sessions if source_of(s) == source]
            by_source[source] = {"traces": len({s["trace_index"] for s in rows}),
                                 "summary": summarize(rows, seed=args.seed),
                                 "paired": [paired(rows, p, "cachegen", args.seed) for p in PLANNERS]}
        pairs = [paired(sessions, p, ref, args.seed) for ref in ("cachegen", "oracle") for p in policies
                 if p != ref]
        run = json.loads((menu_out / "run.json").read_text()) if (menu_out / "run.json").exists() else {}
        results[menu] = {"policies": list(policies), "menu_levels": run.get("menu_levels"),
                         "simulate_command": " ".join(command[2:]), "simulate_wall_s": run.get("wall_s"),
                         "sessions": len(sessions), "chunks": run.get("chunks"), "overall": overall,
                         "by_source": by_source, "paired": pairs, "level_shares": level_shares(menu_out)}
    cross = []
    for menu in menus[1:]:
        common = [p for p in results[menu]["policies"] if p in results[reference_menu]["policies"]]
        cross += [paired(tagged, f"{menu}/{p}", f"{reference_menu}/{p}", args.seed) for p in common]
        cross += [paired(tagged, f"{menu}/{p}", f"{reference_menu}/cachegen", args.seed) for p in PLANNERS]
    result = {"command": " ".join(["python", "scripts/policy_eval.py"] + sys.argv[1:]),
              "date": datetime.date.today().isoformat(),
              "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python "
                         f"{platform.python_version()}",
              "menus": results, "cross_menu": cross}
    (out / "evaluation.json").write_text(json.dumps(result, indent=1))
    plot(results, out / "pareto.png")

    md = [f"Command: `{result['command']}`", f"Machine: {result['machine']}; date {result['date']}.", ""]
    for menu, block in results.items():
        md += [f"## Menu `{menu}`: {', '.join(block['menu_levels'] or [])}", "",
               f"Runs `kvcast {block['simulate_command'].split(' ', 1)[1]}` ({block['sessions']} sessions, "
               f"{block['chunks']} chunks, {block['simulate_wall_s'] or 0:.0f} s).", "", "### All sessions", ""]
        md += table(block["overall"], block["level_shares"])
        md += ["", "### Paired differences (same trace and context; 95% bootstrap CI over traces)", ""]
        md += paired_lines(block["paired"])
        for source, sb in block["by_source"].items():
            md += ["", f"### {menu} menu, {source} ({sb['traces']} traces)", ""] + table(sb["summary"])
            md.append("")
            for p in sb["paired"]:
                viol = fmt_ci(p["violation_diff"], p["violation_diff_ci95"], 3)
                qual = fmt_ci(p["quality_diff"], p["quality_diff_ci95"], 4)
                md.append(f"Paired vs `cachegen`: `{p['policy']}` violations {viol}, quality loss {qual}.  ")
        md.append("")
    if cross:
        md += ["## Across menus (same sessions; 95% bootstrap CI over traces)", ""] + paired_lines(cross)
    text = "\n".join(md) + "\n"
    (out / "evaluation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
