"""Benchmark of `mpc`'s exact search against full enumeration: ``kvcast bench mpc``.

The inputs are the planning problems `mpc` meets in real sessions: Mistral-7B-sized chunks of 12-20K-token
contexts (the shipped codec profile's ``kvcast`` level set by default: raw, int8, kvcast-4..1, six levels plus
text, so 7**5 = 16,807 plans per decision; ``--levels`` picks another set), the measured
H100 recompute costs, a 0.6 s SLO and kvcast's shipped default traces (synthetic, 0.5-10 Gbps), played on the
streaming engine. Every decision's problem is recorded once; then full enumeration (RobustMPC's search,
`kvcast.policies.mpc.enumerate_plan`) and the branch-and-bound (`kvcast.policies.mpc.search_plan`) solve the *same*
problems, and the plans are compared. A third figure times whole `decide` calls (state estimate, problem
set-up and search) in the sessions themselves. Prints JSON (decisions per second, medians of repeats, plan
agreement) on stdout and a table on stderr; ``python -m policies.bench_mpc`` does the same.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from typing import Any

import typer

from kvcast.policies.mpc import MpcPolicy, MpcProblem, enumerate_plan, search_plan

__all__ = ["bench", "main", "print_result", "recorded_problems"]


DEFAULT_LEVELS = "kvcast"


def _sessions(sessions: int, seed: int, levels: str = DEFAULT_LEVELS):
    from kvcast.streamer.menus import ModelShape, build_menus, recompute_cost
    from kvcast.streamer.profile import default_profile
    from kvcast.streamer.simulate import history_mean_bps
    from kvcast.traces.defaults import default_traces

    rng = random.Random(seed)
    traces = default_traces()
    profile, shape = default_profile(), ModelShape.named("mistral-7b")
    cost = recompute_cost("h100/mistral-7b")
    for _ in range(sessions):
        trace = rng.choice(traces)
        menus = build_menus(profile, shape, rng.randint(12288, 20480), 1536, cost, levels=levels)
        offset = rng.uniform(5.0, max(5.0, trace.duration_s - 5.0))
        yield menus, trace, offset, history_mean_bps(trace, offset, 5.0)


def recorded_problems(sessions: int = 40, seed: int = 0, levels: str = DEFAULT_LEVELS
                      ) -> list[tuple[MpcProblem, tuple]]:
    """Run `sessions` mpc sessions on the engine and return every decision's (problem, hints)."""
    from kvcast.streamer.simulate import simulate_session

    out: list[tuple[MpcProblem, tuple]] = []
    for menus, trace, offset, prior in _sessions(sessions, seed, levels):
        policy = MpcPolicy()
        policy.record = out
        simulate_session(policy, menus, trace, slo_s=0.6, offset_s=offset, rtt_s=0.01, efficiency=0.95,
                         overhead_bytes=400, prior_throughput_bps=prior)
    return out


def _rate(fn, problems, repeats: int) -> tuple[float, list[float]]:
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p, hints in problems:
            fn(p, hints)
        rates.append(len(problems) / (time.perf_counter() - t0))
    return statistics.median(rates), rates


class _TimedMpc(MpcPolicy):
    """`MpcPolicy` that adds up the wall time and the thread CPU time of its ``decide`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.wall_s = 0.0
        self.cpu_s = 0.0
        self.calls = 0

    def decide(self, obs):
        w0, c0 = time.perf_counter(), time.thread_time()
        decision = super().decide(obs)
        self.cpu_s += time.thread_time() - c0
        self.wall_s += time.perf_counter() - w0
        self.calls += 1
        return decision


def _decide_rates(sessions: int, seed: int, repeats: int, levels: str = DEFAULT_LEVELS
                  ) -> tuple[int, list[float], list[float]]:
    """Whole ``decide`` calls in `sessions` engine sessions: the number of calls, and per repeat the calls per
    wall-clock second and per second of CPU time (the latter does not drop when other jobs share the CPUs)."""
    from kvcast.streamer.simulate import simulate_session

    wall_rates, cpu_rates, calls = [], [], 0
    for _ in range(repeats):
        wall = cpu = calls = 0
        for menus, trace, offset, prior in _sessions(sessions, seed, levels):
            policy = _TimedMpc()
            simulate_session(policy, menus, trace, slo_s=0.6, offset_s=offset, rtt_s=0.01, efficiency=0.95,
                             overhead_bytes=400, prior_throughput_bps=prior)
            wall += policy.wall_s
            cpu += policy.cpu_s
            calls += policy.calls
        wall_rates.append(calls / wall if wall else 0.0)
        cpu_rates.append(calls / cpu if cpu else 0.0)
    return calls, wall_rates, cpu_rates


def bench(sessions: int = 40, enumerate_count: int = 60, repeats: int = 5, seed: int = 0,
          levels: str = DEFAULT_LEVELS) -> dict[str, Any]:
    """Run the benchmark and return its JSON-ready result (rates are medians of `repeats`)."""
    problems = recorded_problems(sessions, seed, levels)
    full = [(p, h) for p, h in problems if p.horizon == 5]
    subset = random.Random(seed).sample(full, min(enumerate_count, len(full)))
    search_rate, search_runs = _rate(lambda p, h: search_plan(p, h), problems, repeats)
    search_sub_rate, _ = _rate(lambda p, h: search_plan(p, h), subset, repeats)
    search_cold_rate, _ = _rate(lambda p, h: search_plan(p), subset, repeats)
    enum_rate, enum_runs = _rate(lambda p, h: enumerate_plan(p), subset, max(1, min(repeats, 2)))
    agree = sum(search_plan(p, h) == enumerate_plan(p) for p, h in subset)
    decide_calls, decide_runs, decide_cpu_runs = _decide_rates(sessions, seed, repeats, levels)
    plans = problems[0][0].n_actions ** 5 if problems else 0
    return {
        "benchmark": "mpc_search",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "python": platform.python_version(),
        "sessions": sessions,
        "levels": levels,
        "problems": len(problems),
        "plans_per_full_horizon": plans,
        "enumeration_problems": len(subset),
        "enumeration_decisions_per_s": enum_rate if subset else None,
        "search_decisions_per_s_same_problems": search_sub_rate if subset else None,
        "search_decisions_per_s_same_problems_no_hints": search_cold_rate if subset else None,
        "search_decisions_per_s_all_problems": search_rate,
        "speedup_same_problems": search_sub_rate / enum_rate if subset and enum_rate else None,
        "same_plan_as_enumeration": f"{agree}/{len(subset)}",
        "plans_agree": agree == len(subset),
        "decide_calls": decide_calls,
        "decide_calls_per_s_in_sessions": statistics.median(decide_runs),
        "decide_calls_per_cpu_s_in_sessions": statistics.median(decide_cpu_runs),
        "repeats": repeats,
        "decide_runs_calls_per_s": decide_runs,
        "search_runs_decisions_per_s": search_runs,
        "enumeration_runs_decisions_per_s": enum_runs,
    }


def print_result(result: dict[str, Any]) -> None:
    """The JSON on stdout, a table on stderr."""
    from rich.console import Console
    from rich.table import Table

    def rate(key: str) -> str:
        return "-" if result[key] is None else f"{result[key]:,.0f}"

    print(json.dumps(result, indent=2))
    plans = result["plans_per_full_horizon"]
    table = Table(title=f"kvcast bench mpc: exact search vs enumeration ({plans:,} plans/decision)")
    table.add_column("measure")
    table.add_column("decisions/s (median)", justify="right")
    table.add_row(f"whole decide() calls in {result['sessions']} sessions",
                  rate("decide_calls_per_s_in_sessions"))
    table.add_row("  per second of CPU time", rate("decide_calls_per_cpu_s_in_sessions"))
    table.add_row(f"full enumeration ({result['enumeration_problems']} problems)",
                  rate("enumeration_decisions_per_s"))
    table.add_row("branch-and-bound, same problems", rate("search_decisions_per_s_same_problems"))
    table.add_row("  without hints", rate("search_decisions_per_s_same_problems_no_hints"))
    table.add_row(f"branch-and-bound, all {result['problems']} recorded problems",
                  rate("search_decisions_per_s_all_problems"))
    console = Console(stderr=True)
    console.print(table)
    speedup = result["speedup_same_problems"]
    console.print(f"same plan as enumeration: {result['same_plan_as_enumeration']}"
                  + (f"; speedup {speedup:,.0f}x" if speedup else "")
                  + f"; load average {result['load_average_1min']:.1f} on {result['cpus']} CPUs",
                  highlight=False)


def main(sessions: int = typer.Option(40, help="Sessions whose decisions are recorded."),
         enumerate_count: int = typer.Option(60, "--enumerate",
                                             help="Full-horizon problems also enumerated."),
         repeats: int = typer.Option(5, help="Timing repeats (the median is reported)."),
         seed: int = typer.Option(0),
         levels: str = typer.Option(DEFAULT_LEVELS, help="Menu levels (set or level names).")) -> None:
    """Decisions per second of mpc's exact search vs full enumeration, on the same recorded problems."""
    print_result(bench(sessions, enumerate_count, repeats, seed, levels))


if __name__ == "__main__":
    typer.run(main)
