"""Sweeps over operating points (`kvcast sweep`): the same simulation as `kvcast simulate` at every point of
`kvcast.streamer.sweep_config`, then per point a summary with CIs and the policy that wins there.

Pairing: at one operating point every policy plays the very same sessions (trace, start offset, context
length, trace scale), as in `kvcast simulate`; sessions are drawn from the seed alone, so points that differ
only in SLO, GPU share or RTT play the same sessions too (the bandwidth scale changes the trace's bandwidth,
not the offsets; fixed context lengths share their offsets, a length range draws its own).

The work unit is one (operating point, trace) pair, a `kvcast.streamer.simulate.TraceTask`, run by an executor
of `kvcast.streamer.executors` (this process, a process pool, or Ray); every executor gives the same outcomes
in the same order, so the outputs depend only on the inputs and the seed.

Where each policy wins: at each point the policies that could be deployed (not those that need the link's
future, such as ``oracle``, a bound) are ranked lexicographically by `RANKINGS` (by default SLO-violation
rate, then mean quality loss, then mean TTFT); the best one's lead over the runner-up on the first of those
measures where their means differ is tested on the paired sessions (`kvcast.streamer.report.paired_difference`:
95% bootstrap CI over traces, significant when it excludes 0).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from kvcast.streamer.config import SimulationConfig
from kvcast.streamer.executors import run_tasks
from kvcast.streamer.report import BOOTSTRAP_RESAMPLES, paired_difference, summarize
from kvcast.streamer.simulate import TraceTask, trace_keys
from kvcast.streamer.sweep_config import AXES, OperatingPoint, PlannedPoint, format_tokens
from kvcast.traces.trace import Trace

__all__ = ["MEASURES", "RANKINGS", "contenders", "point_id", "point_winner", "run_points", "summarize_sweep",
           "sweep_tasks"]

MEASURES: Mapping[str, tuple[str, str]] = {
    "violations": ("slo_violation_rate", "violated"),
    "quality": ("quality_loss_mean", "quality_loss"),
    "ttft": ("ttft_mean_s", "ttft_s"),
}
"""Ranking measure -> (key of `summarize`'s output, field of `paired_difference`); lower is better."""

RANKINGS: Mapping[str, tuple[str, ...]] = {
    "violations": ("violations", "quality", "ttft"),
    "quality": ("quality", "violations", "ttft"),
    "ttft": ("ttft", "violations", "quality"),
}
"""``--rank-by`` -> the measures compared in turn (the controllers' own objective is the first: the SLO, then
quality)."""

_TIE = 1e-12


def point_id(index: int) -> str:
    return f"p{index:03d}"


def contenders(policies: Sequence[str]) -> tuple[str, ...]:
    """The policies a deployment could run: those that do not need the link's future (``oracle`` does)."""
    from kvcast.policies.registry import default_registry

    registry = default_registry()
    return tuple(p for p in policies if not getattr(registry.create(p), "needs_future", False))


def sweep_tasks(traces: Sequence[Trace], config: SimulationConfig,
                planned: Sequence[PlannedPoint]) -> list[TraceTask]:
    """One task per (point, trace), point-major (no chunk log: a sweep keeps sessions only)."""
    keys = trace_keys(traces)
    return [TraceTask(trace, i, key, p.point.config(config), chunk_log=False)
            for p in planned for i, (trace, key) in enumerate(zip(traces, keys))]


def run_points(traces: Sequence[Trace], config: SimulationConfig, planned: Sequence[PlannedPoint], *,
               executor: str = "process", workers: int | None = None,
               ray_address: str | None = None) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Run every point on every trace; yields ``(point index, session rows)`` per task, in task order. Each row
    is a `kvcast simulate` session row preceded by ``point`` and the point's ``axis_<name>`` values."""
    tasks = sweep_tasks(traces, config, planned)
    per_point = len(traces)
    for k, outcome in enumerate(run_tasks(tasks, executor=executor, workers=workers, ray_address=ray_address)):
        index = k // per_point
        head = {"point": point_id(index),
                **{f"axis_{name}": value for name, value in planned[index].point.labels().items()}}
        yield index, [{**head, **row} for row in outcome.sessions]


def point_winner(sessions: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]],
                 candidates: Sequence[str], *, rank_by: str = "violations", seed: int = 0,
                 resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """The best of `candidates` at one point (`summary` from `summarize` of its `sessions`), the runner-up, and
    the paired test of the lead (see the module docstring)."""
    if rank_by not in RANKINGS:
        raise ValueError(f"unknown ranking {rank_by!r}; rankings: {', '.join(RANKINGS)}")
    measures = RANKINGS[rank_by]
    by_policy = {s["policy"]: s for s in summary}
    ranked = sorted((p for p in candidates if p in by_policy),
                    key=lambda p: tuple(by_policy[p][MEASURES[m][0]] for m in measures))
    if not ranked:
        raise ValueError("no candidate policy to rank")
    out: dict[str, Any] = {"rank_by": rank_by, "best": ranked[0], "runner_up": None, "decided_by": None,
                           "lead": None, "lead_ci95": None, "significant": False}
    if len(ranked) == 1:
        return out
    best, second = by_policy[ranked[0]], by_policy[ranked[1]]
    out["runner_up"] = ranked[1]
    for measure in measures:
        key, field = MEASURES[measure]
        if abs(second[key] - best[key]) > _TIE:
            test = paired_difference(sessions, ranked[1], ranked[0], field, seed=seed, resamples=resamples)
            out.update(decided_by=measure, lead=test["mean"], lead_ci95=test["ci95"],
                       significant=test["ci95"][0] > 0, pairs=test["pairs"], bootstrap=test["bootstrap"])
            break
    return out


def summarize_sweep(rows_by_point: Sequence[Sequence[dict[str, Any]]], planned: Sequence[PlannedPoint], *,
                    config: SimulationConfig, axes: Mapping[str, Sequence[Any]], base: OperatingPoint,
                    grid: bool, candidates: Sequence[str], rank_by: str = "violations",
                    resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """The sweep's summary.json: per point the values, the axes it lies on, `summarize`'s per-policy objects and
    the winner; and how often each policy wins (and wins significantly)."""
    points = []
    wins = {p: {"wins": 0, "significant": 0} for p in candidates}
    for index, (plan, rows) in enumerate(zip(planned, rows_by_point, strict=True)):
        summary = summarize(rows, seed=config.seed, resamples=resamples)
        winner = point_winner(rows, summary, candidates, rank_by=rank_by, seed=config.seed, resamples=resamples)
        wins[winner["best"]]["wins"] += 1
        wins[winner["best"]]["significant"] += int(winner["significant"])
        points.append({"point": point_id(index), "values": plan.point.labels(), "on_axes": list(plan.on_axes),
                       "summary": summary, "winner": winner})
    return {"format": "kvcast-sweep/1", "mode": "grid" if grid else "one-at-a-time",
            "axes": {name: [format_tokens(v) if name == "context_tokens" else v for v in axes[name]]
                     for name in AXES if name in axes},
            "base": base.labels(), "policies": list(config.policies), "contenders": list(candidates),
            "rank_by": rank_by, "ranking": list(RANKINGS[rank_by]), "config": config.to_json_dict(),
            "points": points, "wins": wins}

