#!/usr/bin/env python
"""Held-out evaluation of the `learned` policy against every built-in policy, paired on the same sessions.

The shipped weights are trained on FCC and Norway HSDPA traces (``docs/learned-policy.md``); this runs
``kvcast simulate`` on the *other* real trace sets of ``../shared/traces`` (Lumos 4G/5G, Belgium 4G, Puffer by
default), scaled as ``kvcast simulate`` scales them (means log-uniform in 1-10 Gbps), with ``learned`` and the
baselines, per menu (``--levels``), and reports every policy (violations, quality loss, 95% bootstrap CIs over
traces) and the paired difference ``learned - policy`` per policy (`paired` of ``scripts/policy_eval.py``: 95%
bootstrap CI over traces, sessions saved/lost).

Writes ``OUT/<menu>/`` (simulate's outputs), ``OUT/evaluation.json`` and ``OUT/evaluation.md``. Usage::

    python scripts/learned_eval.py [--out results/learned-eval] [--menus all,kvcast] [--contexts 20]
        [--learned learned] [--sources lumos5g,belgium_4g,puffer]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
POLICIES = ("text", "raw", "fixed:{fixed}", "cachegen", "cachegen-code", "mpc", "hybrid", "oracle")
FIXED_LEVEL = {"all": "kvcast-2", "kvcast": "kvcast-2", "cachegen": "cachegen-2"}


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
    for menu in args.menus.split(","):
        policies = [p.format(fixed=FIXED_LEVEL.get(menu, "kvcast-2")) for p in POLICIES] + [args.learned]
        out = args.out / menu
        cmd = [sys.executable, "-m", "kvcast.cli", "simulate", "--policies", ",".join(policies), "--out", str(out),
               "--contexts", str(args.contexts), "--seed", "0", "--no-chunk-log", "--workers", str(args.workers),
               "--on-bad-trace", "skip"]
        if menu != "all":
            cmd += ["--levels", menu]
        for source in args.sources.split(","):
            cmd += ["--traces", str(args.traces_root / source)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        sessions = [json.loads(line) for line in (out / "sessions.jsonl").read_text().splitlines()]
        summary = json.loads((out / "summary.json").read_text())
        pairs = [pe.paired(sessions, args.learned, p) for p in policies if p != args.learned]
        report["menus"][menu] = {"summary": summary, "paired": pairs}
        n = summary[0]["sessions"]
        md += [f"### Menu `{menu}` ({n} sessions per policy, {summary[0]['traces']} traces)", "",
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
        md.append("")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "evaluation.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
