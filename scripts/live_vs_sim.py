"""Live vs simulated TTFT: the same context, trace and policy, once over a paced loopback server and once in
the simulator with the host's measured profile.

    python scripts/live_vs_sim.py --out out/live-vs-sim            # 10 traces x 3 policies, SmolLM2-135M

Steps: store one context of SmolLM2-135M (``--tokens`` of WikiText-2 test when ``../shared`` is there, else the
project's own text) in a folder store at every level of ``--levels``; measure this host's profile
(``kvcast calibrate host``'s measurement); for each of ``--traces`` synthetic traces (kvcast's default set, then
Markov on/off traces; each scaled to a mean drawn log-uniformly from ``--mean-mbps``) start ``kvcast serve
--trace`` on loopback, and for each policy fetch the context live (``fetch_context``, server pacing restarted
at the session's start) and simulate it (`simulate_session` over the same trace with
`live_menus(manifest, host)`, the menus the live session used). Writes ``rows.jsonl`` (one row per trace and
policy), ``table.md`` and ``live_vs_sim.png`` (live against simulated TTFT).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("out/live-vs-sim"))
    ap.add_argument("--traces", type=int, default=10)
    ap.add_argument("--policies", default="hybrid,cachegen,fixed:kvcast-2")
    ap.add_argument("--levels", default="raw,int8,cachegen-2,kvcast-3,kvcast-2")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--slo", type=float, default=3.0)
    ap.add_argument("--rtt-ms", type=float, default=10.0)
    ap.add_argument("--mean-mbps", default="40-400")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--host-profile", type=Path, default=None, help="Reuse a measured host profile.")
    ap.add_argument("--threads", type=int, default=0,
                    help="Torch threads of the model (0: torch's default); with 1 the model leaves a core to the "
                         "link and the decoder, as a GPU would")
    args = ap.parse_args(argv)

    import torch

    from kvcast.codec.evaluate import EvalSettings, corpus_path, passages_from_text, read_text
    from kvcast.codec.model import load_smollm2
    from kvcast.streamer.host import load_host_profile, measure_host_profile, save_host_profile
    from kvcast.streamer.ingest import put_context
    from kvcast.streamer.store import open_store

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    levels = [x for x in args.levels.split(",") if x]
    lm = load_smollm2(progress=True)
    source = corpus_path(EvalSettings(split="test"))
    ids = passages_from_text(read_text(source), lm.tokenizer, 1, args.tokens, source=str(source))[0].token_ids
    ids = [int(t) for t in (ids.tolist()[0] if hasattr(ids, "tolist") else ids)][: args.tokens]
    store = open_store(out / "store")
    put = put_context(store, "ctx", ids, model=lm, levels=levels, chunk_tokens=args.chunk_tokens, progress=True)
    manifest = put.manifest
    print(f"stored {len(manifest.chunks)} chunks x {len(manifest.levels)} levels, {manifest.nbytes / 1e6:.1f} MB",
          file=sys.stderr)
    if args.host_profile is not None:
        host = load_host_profile(args.host_profile)
    else:
        host, record = measure_host_profile(lm.model, fingerprint=lm.fingerprint(), levels=manifest.levels,
                                            chunk_tokens=args.chunk_tokens,
                                            positions=tuple(range(0, args.tokens - args.chunk_tokens + 1,
                                                                  max(args.chunk_tokens, args.tokens // 4))),
                                            repeats=5, progress=lambda m: print(m, file=sys.stderr))
        save_host_profile(record, out / "host.json")
    traces = make_traces(args.traces, args.mean_mbps, args.seed)
    token = "live-vs-sim-token-" + os.urandom(8).hex()
    (out / "token").write_text(token)
    (out / "token").chmod(0o600)
    rows = []
    for i, trace in enumerate(traces):
        path = out / "traces" / f"{i:02d}-{trace.name}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(trace.to_jsonable()))
        with server(out / "store", out / "token", path, args.rtt_ms) as url:
            for spec in args.policies.split(","):
                row = run_pair(url, token, manifest, lm, host, trace, spec, args)
                row.update(trace=trace.name, trace_index=i, mean_mbps=trace.mean_bps / 1e6)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    del torch
    write_report(rows, out, args)


def make_traces(n: int, mean_mbps: str, seed: int) -> list:
    from kvcast.traces.defaults import default_traces
    from kvcast.traces.synthetic import markov_on_off

    low, high = (float(x) for x in mean_mbps.split("-"))
    rng = random.Random(seed)
    base = list(default_traces())
    k = 0
    while len(base) < n:
        base.append(markov_on_off(60.0, seed=100 + k, on_bps=1e9, off_bps=2e8, mean_on_s=1.0, mean_off_s=0.5,
                                  name=f"markov-{k}"))
        k += 1
    traces = []
    for trace in base[:n]:
        target = math.exp(rng.uniform(math.log(low), math.log(high))) * 1e6
        traces.append(trace.scaled(target / trace.mean_bps))
    return traces


class server:
    """``kvcast serve --trace`` in a subprocess on a free loopback port (the context manager yields its URL)."""

    def __init__(self, store: Path, token_file: Path, trace: Path, rtt_ms: float) -> None:
        self.cmd = [sys.executable, "-m", "kvcast.cli", "serve", "--store", str(store), "--port", "0",
                    "--token-file", str(token_file), "--trace", str(trace), "--rtt-ms", str(rtt_ms),
                    "--access-log", os.devnull, "--rate", "0"]

    def __enter__(self) -> str:
        self.proc = subprocess.Popen(self.cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        deadline = time.monotonic() + 60
        lines = []
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            if match:
                return f"http://127.0.0.1:{match.group(1)}"
        self.proc.kill()
        raise RuntimeError("kvcast serve did not start:\n" + "".join(lines))

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_pair(url, token, manifest, lm, host, trace, spec, args) -> dict:
    from kvcast.policies.registry import default_registry
    from kvcast.streamer.fetch import fetch_context
    from kvcast.streamer.live import live_menus
    from kvcast.streamer.simulate import simulate_session

    prior = trace.mean_bps
    live = asyncio.run(fetch_context(url, "ctx", model=lm, policy=default_registry().create(spec), slo_s=args.slo,
                                     host=host, token=token, question="", max_new_tokens=1,
                                     reset_server_pacing=True, prior_throughput_bps=prior))
    sim = simulate_session(default_registry().create(spec), live_menus(manifest, host), trace, slo_s=args.slo,
                           rtt_s=args.rtt_ms / 1e3, efficiency=1.0, overhead_bytes=0, prior_throughput_bps=prior)
    live_actions = [r.action for r in live.session.chunks]
    sim_actions = [r.action for r in sim.chunks]
    return {"policy": spec, "live_ttft_s": live.session.ttft_s, "sim_ttft_s": sim.ttft_s,
            "rel_error": live.session.ttft_s / sim.ttft_s - 1, "same_actions": live_actions == sim_actions,
            "live_actions": live_actions, "sim_actions": sim_actions,
            "live_fetch_s": live.to_json()["fetch_s"], "live_decode_s": live.to_json()["decode_s"],
            "live_recompute_s": live.to_json()["recompute_s"]}


def write_report(rows: list[dict], out: Path, args) -> None:
    (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = ["| policy | sessions | median abs error | worst error | same actions |", "|---|---|---|---|---|"]
    for spec in [*args.policies.split(","), "all"]:
        sel = [r for r in rows if spec == "all" or r["policy"] == spec]
        errs = [abs(r["rel_error"]) for r in sel]
        worst = max(sel, key=lambda r: abs(r["rel_error"]))
        lines.append(f"| {spec} | {len(sel)} | {statistics.median(errs):.1%} | {worst['rel_error']:+.1%} "
                     f"({worst['trace']}) | {sum(r['same_actions'] for r in sel)}/{len(sel)} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), constrained_layout=True)
    for spec in args.policies.split(","):
        sel = [r for r in rows if r["policy"] == spec]
        ax.scatter([r["sim_ttft_s"] for r in sel], [r["live_ttft_s"] for r in sel], label=spec, s=18)
    top = max(max(r["sim_ttft_s"], r["live_ttft_s"]) for r in rows) * 1.05
    ax.plot([0, top], [0, top], color="grey", lw=0.8)
    ax.plot([0, top], [0, top * 1.1], color="grey", lw=0.5, ls=":")
    ax.plot([0, top], [0, top * 0.9], color="grey", lw=0.5, ls=":")
    ax.set_xlabel("simulated TTFT (s)")
    ax.set_ylabel("live TTFT over paced loopback (s)")
    ax.legend()
    fig.savefig(out / "live_vs_sim.png", dpi=120)


if __name__ == "__main__":
    main()
