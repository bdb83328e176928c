#!/usr/bin/env python
"""Held-out evaluation of the `learned` policy against every built-in policy, paired on the same sessions.

The shipped weights are trained on FCC and Norway HSDPA traces (``docs/learned-policy.md``); this runs
``kvcast simulate`` on the *other* real trace sets of ``../shared/traces`` (Lumos 4G/5G, Belgium 4G, Puffer by
default), scaled as ``kvcast simulate`` scales them (means log-uniform in 1-10 Gbps), with ``learned`` and the
baselines, per menu (``--levels``), and reports every policy (violations, quality loss, 95% bootstrap CIs over
traces) and the paired difference ``learned - policy`` per policy (`paired` of ``scripts/policy_eval.py``: 95%
bootstrap CI over traces, sessions saved/lost).

The baselines (`POLICIES`): the fixed rules ``text``, ``raw`` (only on a menu that has it) and
``fixed:<level>``; CacheGen's controllers ``cachegen`` and ``cachegen-code``; Cake (``cake``, its least-loss
level) and ``cake-cachegen``; the throughput rules ``rate`` and ``slack``; the planners ``mpc`` and ``hybrid``;
and the ``oracle`` (knows the link's future: a bound, not a contender). Per trace source it also reports every
policy's violation rate and the paired violation difference ``learned - policy``.

Writes ``OUT/<menu>/`` (simulate's outputs), ``OUT/evaluation.json`` and ``OUT/evaluation.md``. Usage::

    python scripts/learned_eval.py [--out results/learned-eval] [--menus all,kvcast] [--contexts 20]
        [--learned learned] [--sources lumos5g,belgium_4g,puffer] [--workers 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
POLICIES = ("text", "raw", "fixed:{fixed}", "cachegen", "cachegen-code", "cake", "cake-cachegen", "rate", "slack",
            "mpc", "hybrid", "oracle")
FIXED_LEVEL = {"all": "kvcast-2", "kvcast": "kvcast-2", "cachegen": "cachegen-2"}
NEEDS_LEVEL = {"raw": "raw"}
"""Baselines that need a level on the menu (skipped on a menu without it)."""


def policy_eval():
    """scripts/policy_eval.py as a module (its `paired`, `fmt_ci` and `source_of`)."""
    spec = importlib.util.spec_from_file_location("policy_eval", HERE / "policy_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/learned-eval"))
    parser.add_argument("--menus", default="all,kvcast")
    parser.add_argument("--contexts", type=int, default=20)
    parser.add_argument("--learned", default="learned", help="spec of the learned policy (learned:PATH)")
    parser.add_argument("--sources", default="lumos5g,belgium_4g,puffer")
    parser.add_argument("--traces-root", type=Path, default=HERE.parent.parent / "shared" / "traces")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    pe = policy_eval()
    report: dict = {"sources": args.sources.split(","), "learned": args.learned, "menus": {}}
    md = [f"Held-out traces: {args.sources}; {args.contexts} contexts per trace; learned = `{args.learned}`.", ""]
    from kvcast.streamer.menus import resolve_levels
    from kvcast.streamer.profile import default_profile

    for menu in args.menus.split(","):
        on_menu = set(resolve_levels(default_profile(), menu))
        policies = [p.format(fixed=FIXED_LEVEL.get(menu, "kvcast-2")) for p in POLICIES
                    if p not in NEEDS_LEVEL or NEEDS_LEVEL[p] in on_menu] + [args.learned]
        out = args.out / menu
        cmd = [sys.executable, "-m", "kvcast.cli", "simulate", "--policies", ",".join(policies), "--out", str(out),
               "--contexts", str(args.contexts), "--seed", "0", "--no-chunk-log", "--workers", str(args.workers),
               "--on-bad-trace", "skip"]
        if menu != "all":
            cmd += ["--levels", menu]
        for source in args.sources.split(","):
            cmd += ["--traces", str(args.traces_root / source)]
        started = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall_s = time.perf_counter() - started
        sessions = [json.loads(line) for line in (out / "sessions.jsonl").read_text().splitlines()]
        summary = json.loads((out / "summary.json").read_text())
        pairs = [pe.paired(sessions, args.learned, p) for p in policies if p != args.learned]
        by_source = per_source(pe, sessions, policies, args.learned)
        report["menus"][menu] = {"policies": policies, "wall_s": wall_s, "summary": summary, "paired": pairs,
                                 "by_source": by_source}
        n = summary[0]["sessions"]
        md += [f"### Menu `{menu}` ({n} sessions per policy, {summary[0]['traces']} traces; simulate ran "
               f"{wall_s:.0f} s wall with {args.workers or 'one per CPU'} workers)", "",
               "| policy | SLO violations [95% CI] | quality loss (KL/token) [95% CI] | TTFT mean (s) |",
               "|---|---:|---:|---:|"]
        for s in summary:
            md.append(f"| `{s['policy']}` | {pe.fmt_ci(s['slo_violation_rate'], s['slo_violation_rate_ci95'], 3)} | "
                      f"{pe.fmt_ci(s['quality_loss_mean'], s['quality_loss_mean_ci95'], 4)} | "
                      f"{s['ttft_mean_s']:.3f} |")
        md += ["", f"Paired, `{args.learned}` minus each policy (same sessions; 95% bootstrap CI over traces):", "",
               "| vs | violations (points) | sessions saved / lost | quality loss diff "
               "| quality diff where both meet |",
               "|---|---:|---:|---:|---:|"]
        for p in pairs:
            both = ("-" if p["quality_diff_both_met"] is None else
                    pe.fmt_ci(p["quality_diff_both_met"], p["quality_diff_both_met_ci95"], 4))
            md.append(f"| `{p['reference']}` | "
                      f"{pe.fmt_ci(100 * p['violation_diff'], [100 * x for x in p['violation_diff_ci95']], 1)} | "
                      f"{p['sessions_fewer_violations']} / {p['sessions_more_violations']} | "
                      f"{pe.fmt_ci(p['quality_diff'], p['quality_diff_ci95'], 4)} | {both} |")
        others = [p for p in policies if p != args.learned]
        md += ["", f"Per trace source: violation rates, and `{args.learned}` minus each policy in points "
               "(paired; 95% bootstrap CI over the source's traces):", "",
               "| source | sessions | " + " | ".join(f"`{p}`" for p in policies) + " |",
               "|---|---:|" + "---:|" * len(policies)]
        for source, row in by_source.items():
            md.append(f"| {source} | {row['sessions']} | "
                      + " | ".join(f"{row['violations'][p]:.3f}" for p in policies) + " |")
        md += ["", "| source | " + " | ".join(f"vs `{p}`" for p in others) + " |", "|---|" + "---:|" * len(others)]
        for source, row in by_source.items():
            md.append(f"| {source} | " + " | ".join(
                pe.fmt_ci(100 * row["paired"][p]["violation_diff"],
                          [100 * x for x in row["paired"][p]["violation_diff_ci95"]], 1) for p in others) + " |")
        md.append("")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "evaluation.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def per_source(pe, sessions: list[dict], policies: list[str], learned: str) -> dict:
    """Per trace source (`source_of` of ``scripts/policy_eval.py``): sessions, each policy's violation rate and
    the paired ``learned - policy`` difference."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for s in sessions:
        groups[pe.source_of(s)].append(s)
    out = {}
    for source in sorted(groups, key=lambda k: -len(groups[k])):
        rows = groups[source]
        count = {p: 0 for p in policies}
        missed = {p: 0 for p in policies}
        for s in rows:
            count[s["policy"]] += 1
            missed[s["policy"]] += not s["slo_met"]
        out[source] = {"sessions": count[learned],
                       "violations": {p: missed[p] / count[p] for p in policies if count[p]},
                       "paired": {p: pe.paired(rows, learned, p) for p in policies if p != learned}}
    return out


if __name__ == "__main__":
    main()
