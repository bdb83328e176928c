"""``kvcast demo``'s simulation: every policy over the run's traces on the scaled deployment (`kvcast simulate`'s
sweep, `kvcast.streamer.simulate.run_sweep`, with the profile of this run's measured sizes), summarised with 95%
bootstrap CIs, and kvcast's controllers compared with CacheGen's and Cake's on the same sessions (paired).

Writes ``sessions.jsonl``, ``summary.json`` and ``summary.md`` to its folder, as ``kvcast simulate`` does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcast.streamer.config import SimulationConfig
from kvcast.streamer.demo_config import NEAR_LOSSLESS, DemoConfig
from kvcast.streamer.demo_headline import resolve_spec
from kvcast.streamer.profile import Profile
from kvcast.streamer.report import markdown_table, paired_difference, summarize
from kvcast.streamer.simulate import run_sweep
from kvcast.traces.trace import Trace

__all__ = ["BASELINE_CONTROLLERS", "KVCAST_CONTROLLERS", "TraceSimulation", "simulate_traces"]

KVCAST_CONTROLLERS = ("mpc", "hybrid", NEAR_LOSSLESS)
BASELINE_CONTROLLERS = ("cachegen", "cake")


@dataclass
class TraceSimulation:
    """The sweep's sessions, per-policy summary and the paired comparisons of kvcast's controllers with the
    baselines (`paired_difference` of SLO violations and of quality loss)."""

    config: SimulationConfig
    sessions: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    paired: list[dict[str, Any]]
    traces: int
    wall_s: float

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config.to_json_dict(), "summary": self.summary, "paired": self.paired,
                "traces": self.traces, "sessions": len(self.sessions), "wall_s": self.wall_s}


def simulate_traces(traces: Sequence[Trace], profile: Profile, profile_path: Path, config: DemoConfig, out: Path,
                    on_trace: Callable[[int, int], None] | None = None) -> TraceSimulation:
    """Simulate `config.policies` over `traces` with the profile at `profile_path` (`profile`, already loaded;
    a ``fixed:<level>`` whose level the run did not measure is left out); `on_trace(done, total)` after each
    trace."""
    import time

    named = [(name, resolve_spec(name, profile)) for name in config.policies
             if not name.startswith("fixed:") or name.split(":", 1)[1] in profile.level_names]  # levels measured
    named = [(name, spec) for name, spec in named if spec is not None]
    label = {spec: name for name, spec in named}
    sim = SimulationConfig(policies=tuple(spec for _, spec in named), profile=str(profile_path),
                           contexts=config.contexts_per_trace, slo_s=config.slo_s, seed=config.seed,
                           model=config.scaled_model)
    out.mkdir(parents=True, exist_ok=True)
    sessions: list[dict[str, Any]] = []
    started = time.perf_counter()
    for done, outcome in enumerate(run_sweep(list(traces), sim, workers=config.workers or None, chunk_log=False), 1):
        for row in outcome.sessions:
            row["policy"] = label[row["policy"]]
            sessions.append(row)
        if on_trace is not None:
            on_trace(done, len(traces))
    wall = time.perf_counter() - started
    summary = summarize(sessions, seed=config.seed)
    present = {s["policy"] for s in summary}
    paired = []
    for reference in BASELINE_CONTROLLERS:
        for policy in KVCAST_CONTROLLERS:
            if policy in present and reference in present:
                paired.append({"policy": policy, "reference": reference,
                               "violations": paired_difference(sessions, policy, reference, "violated",
                                                               seed=config.seed),
                               "quality_loss": paired_difference(sessions, policy, reference, "quality_loss",
                                                                 seed=config.seed)})
    with open(out / "sessions.jsonl", "w", encoding="utf-8") as handle:
        for row in sessions:
            handle.write(json.dumps(row, separators=(",", ":")) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(markdown_table(summary), encoding="utf-8")
    return TraceSimulation(sim, sessions, summary, paired, len(traces), wall)
