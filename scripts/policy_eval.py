#!/usr/bin/env python
"""Policy-quality evaluation on real throughput traces (issue 3): SLO violations and quality loss per policy.

Runs ``kvcast simulate`` over the real traces of ``../shared/traces`` (FCC, Norway HSDPA, Belgium 4G, Lumos
4G and 5G), each trace scaled to a mean drawn log-uniformly in 1-10 Gbps, Mistral-7B-sized chunks of
12-20K-token contexts, H100 recompute costs and the default 0.6 s SLO (text-only misses it in ~90% of
sessions), then summarises:

* every policy over all sessions and per trace source (violation rate, mean quality loss, 95% bootstrap
  CIs over traces);
* paired differences on the same (trace, context) sessions: each policy's violation rate and quality loss
  minus cachegen's and minus the oracle's, with bootstrap CIs over traces.

Writes ``OUT/evaluation.json`` and ``OUT/evaluation.md`` (besides simulate's own outputs) and prints the
markdown. Usage::

    python scripts/policy_eval.py [--out results/policy-eval] [--contexts 20] [--shared ../shared]
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
POLICIES = ("text", "raw", "fixed:cachegen-2", "cachegen", "cachegen-code", "mpc", "hybrid", "oracle")
RESAMPLES = 2000


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
    rng = np.random.default_rng(seed)
    unique = np.unique(traces)
    members = [np.flatnonzero(traces == t) for t in unique]
    boots_v, boots_q = [], []
    for _ in range(RESAMPLES):
        pick = rng.integers(0, len(unique), len(unique))
        idx = np.concatenate([members[i] for i in pick])
        boots_v.append(viol[idx].mean())
        boots_q.append(qual[idx].mean())
    return {"policy": policy, "reference": reference, "sessions": len(rows),
            "violation_diff": float(viol.mean()),
            "violation_diff_ci95": np.percentile(boots_v, [2.5, 97.5]).tolist(),
            "quality_diff": float(qual.mean()),
            "quality_diff_ci95": np.percentile(boots_q, [2.5, 97.5]).tolist(),
            "sessions_fewer_violations": int((viol < 0).sum()),
            "sessions_more_violations": int((viol > 0).sum())}


def fmt_ci(value: float, ci: list[float], digits: int) -> str:
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def table(summary: list[dict]) -> list[str]:
    lines = ["| policy | sessions | SLO violations [95% CI] | quality loss (KL/token) [95% CI] "
             "| TTFT mean (s) | text share |", "|---|---:|---:|---:|---:|---:|"]
    for s in summary:
        viol = fmt_ci(s["slo_violation_rate"], s["slo_violation_rate_ci95"], 3)
        qual = fmt_ci(s["quality_loss_mean"], s["quality_loss_mean_ci95"], 4)
        lines.append(f"| `{s['policy']}` | {s['sessions']} | {viol} | {qual} | {s['ttft_mean_s']:.3f} "
                     f"| {s['text_chunk_share']:.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/policy-eval")
    ap.add_argument("--contexts", type=int, default=20)
    ap.add_argument("--shared", default=os.path.join("..", "shared"), help="the shared data folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--skip-simulate", action="store_true", help="summarise an existing OUT/sessions.jsonl")
    args = ap.parse_args()
    out = Path(args.out)
    command = [sys.executable, "-m", "kvcast.cli", "simulate", "--policies", ",".join(POLICIES),
               "--out", str(out), "--contexts", str(args.contexts), "--seed", str(args.seed),
               "--no-chunk-log"]
    for source in SOURCES:
        command += ["--traces", os.path.join(args.shared, "traces", source)]
    if args.workers:
        command += ["--workers", str(args.workers)]
    if not args.skip_simulate:
        subprocess.run(command, check=True)

    from streamer.report import summarize

    sessions = [json.loads(line) for line in (out / "sessions.jsonl").read_text().splitlines() if line]
    overall = summarize(sessions, seed=args.seed)
    by_source = {}
    for source in sorted({source_of(s) for s in sessions}):
        rows = [s for s in sessions if source_of(s) == source]
        by_source[source] = {"traces": len({s["trace_index"] for s in rows}),
                             "summary": summarize(rows, seed=args.seed)}
    pairs = [paired(sessions, p, ref) for ref in ("cachegen", "oracle") for p in POLICIES if p != ref]
    for source in by_source:
        rows = [s for s in sessions if source_of(s) == source]
        by_source[source]["paired"] = [paired(rows, p, "cachegen") for p in ("mpc", "hybrid", "oracle")]
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    result = {"command": " ".join(["python", "scripts/policy_eval.py"] + sys.argv[1:]),
              "simulate_command": " ".join(command[2:]), "date": datetime.date.today().isoformat(),
              "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python "
                         f"{platform.python_version()}",
              "simulate_wall_s": run.get("wall_s"), "overall": overall, "by_source": by_source,
              "paired": pairs}
    (out / "evaluation.json").write_text(json.dumps(result, indent=1))

    simulate = result["simulate_command"].split(" ", 1)[1]
    md = [f"Command: `{result['command']}` (runs `kvcast {simulate}`)",
          f"Machine: {result['machine']}; date {result['date']}.", "", "### All sessions", ""]
    md += table(overall)
    md += ["", "### Paired differences (same trace and context; 95% bootstrap CI over traces)", "",
           "| policy | vs | violation-rate difference | quality-loss difference | sessions better / worse |",
           "|---|---|---:|---:|---:|"]
    for p in pairs:
        viol = fmt_ci(p["violation_diff"], p["violation_diff_ci95"], 3)
        qual = fmt_ci(p["quality_diff"], p["quality_diff_ci95"], 4)
        md.append(f"| `{p['policy']}` | `{p['reference']}` | {viol} | {qual} "
                  f"| {p['sessions_fewer_violations']} / {p['sessions_more_violations']} |")
    for source, block in by_source.items():
        md += ["", f"### {source} ({block['traces']} traces)", ""] + table(block["summary"])
        md.append("")
        for p in block["paired"]:
            viol = fmt_ci(p["violation_diff"], p["violation_diff_ci95"], 3)
            qual = fmt_ci(p["quality_diff"], p["quality_diff_ci95"], 4)
            md.append(f"Paired vs `cachegen`: `{p['policy']}` violations {viol}, quality loss {qual}.  ")
    text = "\n".join(md) + "\n"
    (out / "evaluation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
