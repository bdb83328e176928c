"""`kvcast bench sim`, `kvcast bench mpc` and `kvcast bench gym`: measurements that return a
`kvcast.benchmark.result` dict.

* `bench_sim`: simulation speed, simulated chunks per second on one core (engine + SimPy link + policy) over
  kvcast's default traces, and optionally a whole `simulate` sweep (process pool, chunk log) extrapolated to
  350 traces x 20 contexts x 6 policies.
* `bench_mpc`: `mpc`'s exact search against full enumeration. The inputs are the planning problems `mpc`
  meets in real sessions of `SimulationConfig`'s defaults (Mistral-7B chunks of 12-20K-token contexts, the
  measured H100 recompute costs, a 0.6 s SLO) on the shipped default traces, with the profile's ``kvcast``
  and ``baselines`` level sets by default (raw, int8, kvcast-4..1: six levels plus text, 7**5 = 16,807 plans per
  decision).
  Every decision's problem is recorded once; full enumeration (RobustMPC's search,
  `kvcast.policies.mpc.enumerate_plan`) and the branch-and-bound (`kvcast.policies.mpc.search_plan`) solve
  the *same* problems and their plans are compared. Whole `decide` calls (state estimate, problem set-up,
  search) are also timed in the sessions themselves, per wall-clock second and per CPU second.
* `bench_gym`: steps per second of the Gymnasium environment (`kvcast.streamer.gym`), one environment and a
  `SyncVectorEnv`, with an agent that takes random valid actions.

Rates are medians over `repeats`. The module imports nothing heavy at import time: its settings dataclasses
give the CLI its defaults. Printing is the CLI's job (`kvcast.streamer.cli`).
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from kvcast.benchmark import result
from kvcast.streamer.config import SimulationConfig

__all__ = ["GymBenchSettings", "MpcBenchSettings", "SimBenchSettings", "bench_gym", "bench_mpc", "bench_sim",
           "recorded_problems"]

SWEEP_TARGET = (350, 20, 6)
"""The sweep `bench_sim` extrapolates to: traces x contexts x policies."""


@dataclass(frozen=True)
class SimBenchSettings:
    """Inputs of `bench_sim`; the simulator's other settings are `SimulationConfig`'s defaults."""

    policy: str = "cachegen"
    """Policy spec timed (`cachegen`, the greedy controller, by default)."""
    sessions: int = 1000
    """Sessions per timed repeat (over the default traces in turn)."""
    repeats: int = 5
    """Timed repeats; the median is reported."""
    context_tokens: int = 16384
    """Tokens per context."""
    chunk_tokens: int = SimulationConfig.chunk_tokens
    """Tokens per chunk."""
    sweep_traces: int = 0
    """Also time a full `simulate` sweep over this many traces x `SimulationConfig.contexts` contexts and
    extrapolate it to `SWEEP_TARGET` (0: no sweep)."""
    sweep_policies: tuple[str, ...] = ("text", "raw", "fixed:cachegen-2", "cachegen", "cachegen-code",
                                       "fixed:int8")
    """Policies of the timed sweep."""
    workers: int = 0
    """Worker processes of the timed sweep (0: one per CPU)."""

    def __post_init__(self) -> None:
        if self.sessions < 1 or self.repeats < 1 or self.context_tokens < 1 or self.chunk_tokens < 1:
            raise ValueError("sessions, repeats, context_tokens and chunk_tokens must be >= 1")
        if self.sweep_traces < 0 or self.workers < 0:
            raise ValueError("sweep_traces and workers must be >= 0")
        if self.sweep_traces and not self.sweep_policies:
            raise ValueError("the timed sweep needs at least one policy")


@dataclass(frozen=True)
class MpcBenchSettings:
    """Inputs of `bench_mpc`; the sessions use `SimulationConfig`'s defaults."""

    sessions: int = 40
    """Engine sessions whose `mpc` decisions are recorded and timed."""
    enumerate_count: int = 60
    """Full-horizon problems also solved by full enumeration (~0.05 s each)."""
    repeats: int = 5
    """Timed repeats; the median is reported."""
    seed: int = 0
    """Seed of the sessions and of the enumerated subset."""
    levels: str = "kvcast,baselines"
    """Menu levels: sets (all, cachegen, kvcast, baselines) or level names, comma-separated."""
    options: str = ""
    """`mpc`'s spec argument, e.g. ``objective=ttft+quality_budget=0.01`` (empty: the defaults)."""

    def __post_init__(self) -> None:
        if self.sessions < 1 or self.repeats < 1 or self.enumerate_count < 0:
            raise ValueError("sessions and repeats must be >= 1, enumerate_count (--enumerate) >= 0")


def _simulation_settings(config: SimulationConfig) -> dict[str, Any]:
    """The `SimulationConfig` fields a benchmark's sessions use."""
    keys = ("model", "gpu", "recompute", "profile", "levels", "chunk_tokens", "context_tokens", "slo_s",
            "rtt_s", "efficiency", "overhead_bytes", "prior_window_s", "query_prefill_s")
    data = config.to_json_dict()
    return {k: data[k] for k in keys}


# ------------------------------------------------------------------------------------------------- sim


def bench_sim(settings: SimBenchSettings = SimBenchSettings(), traces: list[Any] | None = None
              ) -> dict[str, Any]:
    """Time `settings.sessions` sessions of `settings.policy` per repeat in this process (default traces);
    with ``sweep_traces``, also a full sweep over `traces` (default: kvcast's default set, repeated)."""
    from kvcast.netsim.virtual_time import VirtualTimeLoop
    from kvcast.policies.registry import default_registry
    from kvcast.streamer.menus import build_menus
    from kvcast.streamer.simulate import history_mean_bps, session_in_virtual_time
    from kvcast.traces.defaults import default_traces

    config = SimulationConfig(policies=(settings.policy,), chunk_tokens=settings.chunk_tokens)
    menus = build_menus(config.load_profile(), config.shape(), settings.context_tokens, settings.chunk_tokens,
                        config.recompute_cost())
    registry = default_registry()
    pool = default_traces()
    sessions = settings.sessions

    async def one_repeat() -> int:
        chunks = 0
        for i in range(sessions):
            trace = pool[i % len(pool)]
            offset = (i * 7.919) % trace.duration_s
            prior = history_mean_bps(trace, offset, config.prior_window_s)
            outcome = await session_in_virtual_time(
                registry.create(settings.policy), menus, trace, slo_s=config.slo_s, offset_s=offset,
                rtt_s=config.rtt_s, efficiency=config.efficiency, overhead_bytes=config.overhead_bytes,
                prior_throughput_bps=prior)
            chunks += len(outcome.chunks)
        return chunks

    rows: list[dict[str, Any]] = []
    loop = VirtualTimeLoop()
    try:
        for repeat in range(settings.repeats):
            t0 = time.perf_counter()
            chunks = loop.run_until_complete(one_repeat())
            wall = time.perf_counter() - t0
            rows.append({"run": "engine", "repeat": repeat, "traces": len(pool), "sessions": sessions,
                         "chunks": chunks, "wall_s": wall, "chunks_per_s": chunks / wall,
                         "sessions_per_s": sessions / wall})
    finally:
        loop.close()
    chunks = rows[-1]["chunks"]
    summary: dict[str, Any] = {
        "policy": settings.policy, "chunks_per_repeat": chunks, "chunks_per_session": chunks / sessions,
        "chunks_per_s": statistics.median(r["chunks_per_s"] for r in rows),
        "sessions_per_s": statistics.median(r["sessions_per_s"] for r in rows),
        "sweep_wall_s": None, "sweep_extrapolated_s": None}
    if settings.sweep_traces > 0:
        sweep = _time_sweep(settings, traces)
        rows.append(sweep)
        n, contexts, policies = SWEEP_TARGET
        summary["sweep_wall_s"] = sweep["wall_s"]
        summary["sweep_extrapolated_s"] = (sweep["wall_s"] * (n / sweep["traces"])
                                           * (policies / len(settings.sweep_policies)))
        summary["sweep_extrapolated_to"] = {"traces": n, "contexts": contexts, "policies": policies,
                                            "note": "extrapolated linearly from the measured sub-sweep"}
    return result("sim", {**asdict(settings), "sweep_trace_pool": "default" if not traces else "given",
                          "simulation": _simulation_settings(config)}, rows, summary)


def _time_sweep(settings: SimBenchSettings, traces: list[Any] | None) -> dict[str, Any]:
    """Time a full sweep (pool, chunk log built) over `settings.sweep_traces` traces."""
    from kvcast.streamer.simulate import run_sweep
    from kvcast.traces.defaults import default_traces

    pool = list(traces) if traces else list(default_traces())
    n = settings.sweep_traces
    chosen = [pool[i % len(pool)].with_name(f"{pool[i % len(pool)].name}~{i}") for i in range(n)]
    config = SimulationConfig(policies=settings.sweep_policies)
    t0 = time.perf_counter()
    chunks = sessions = 0
    for outcome in run_sweep(chosen, config, workers=settings.workers or None, chunk_log=True):
        chunks += outcome.chunks
        sessions += len(outcome.sessions)
    wall = time.perf_counter() - t0
    return {"run": "sweep", "repeat": 0, "traces": n, "contexts": config.contexts,
            "policies": len(settings.sweep_policies), "sessions": sessions, "chunks": chunks, "wall_s": wall,
            "chunks_per_s": chunks / wall, "sessions_per_s": sessions / wall}


# ------------------------------------------------------------------------------------------------- mpc


def _sessions(sessions: int, seed: int, levels: str):
    """`sessions` (menus, trace, offset, prior throughput) of `SimulationConfig`'s defaults, drawn from
    `seed`."""
    from kvcast.streamer.menus import build_menus
    from kvcast.streamer.simulate import history_mean_bps
    from kvcast.traces.defaults import default_traces

    config = SimulationConfig()
    rng = random.Random(seed)
    traces = default_traces()
    profile, shape, cost = config.load_profile(), config.shape(), config.recompute_cost()
    lo, hi = config.context_tokens
    for _ in range(sessions):
        trace = rng.choice(traces)
        menus = build_menus(profile, shape, rng.randint(lo, hi), config.chunk_tokens, cost, levels=levels)
        offset = rng.uniform(5.0, max(5.0, trace.duration_s - 5.0))
        yield menus, trace, offset, history_mean_bps(trace, offset, config.prior_window_s)


def _run_session(policy: Any, menus: Any, trace: Any, offset: float, prior: float) -> None:
    from kvcast.streamer.simulate import simulate_session

    config = SimulationConfig()
    simulate_session(policy, menus, trace, slo_s=config.slo_s, offset_s=offset, rtt_s=config.rtt_s,
                     efficiency=config.efficiency, overhead_bytes=config.overhead_bytes,
                     prior_throughput_bps=prior, query_prefill_s=config.query_prefill_s)


def recorded_problems(sessions: int = MpcBenchSettings.sessions, seed: int = MpcBenchSettings.seed,
                      levels: str = MpcBenchSettings.levels, options: str = "") -> list[tuple[Any, tuple]]:
    """Run `sessions` mpc sessions (spec argument `options`) on the engine and return every decision's
    (problem, hints)."""
    from kvcast.policies.mpc import MpcPolicy

    out: list[tuple[Any, tuple]] = []
    for menus, trace, offset, prior in _sessions(sessions, seed, levels):
        policy = MpcPolicy(options or None)
        policy.record = out
        _run_session(policy, menus, trace, offset, prior)
    return out


def _rate(fn, problems, repeats: int) -> tuple[float, list[float]]:
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p, hints in problems:
            fn(p, hints)
        rates.append(len(problems) / (time.perf_counter() - t0))
    return statistics.median(rates), rates


@lru_cache(maxsize=1)
def _timed_mpc_class() -> type:
    """`MpcPolicy` that adds up the wall time and the thread CPU time of its ``decide`` calls."""
    from kvcast.policies.mpc import MpcPolicy

    class TimedMpc(MpcPolicy):
        def __init__(self, options: str | None = None) -> None:
            super().__init__(options or None)
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

    return TimedMpc


def _decide_rates(sessions: int, seed: int, repeats: int, levels: str, options: str = ""
                  ) -> tuple[int, list[float], list[float]]:
    """Whole ``decide`` calls in `sessions` engine sessions: the number of calls, and per repeat the calls per
    wall-clock second and per second of CPU time (the latter does not drop when other jobs share the CPUs)."""
    timed = _timed_mpc_class()
    wall_rates, cpu_rates, calls = [], [], 0
    for _ in range(repeats):
        wall = cpu = calls = 0
        for menus, trace, offset, prior in _sessions(sessions, seed, levels):
            policy = timed(options)
            _run_session(policy, menus, trace, offset, prior)
            wall += policy.wall_s
            cpu += policy.cpu_s
            calls += policy.calls
        wall_rates.append(calls / wall if wall else 0.0)
        cpu_rates.append(calls / cpu if cpu else 0.0)
    return calls, wall_rates, cpu_rates


def bench_mpc(settings: MpcBenchSettings = MpcBenchSettings()) -> dict[str, Any]:
    """Decisions per second of `mpc`'s exact search vs full enumeration on the same recorded problems, and of
    whole ``decide`` calls in the sessions. One row per measure (``decisions_per_s``: median of the runs)."""
    from kvcast.policies.mpc import enumerate_plan, search_plan

    s = settings
    problems = recorded_problems(s.sessions, s.seed, s.levels, s.options)
    full = [(p, h) for p, h in problems if p.horizon == 5]
    subset = random.Random(s.seed).sample(full, min(s.enumerate_count, len(full)))
    search_rate, search_runs = _rate(lambda p, h: search_plan(p, h), problems, s.repeats)
    sub_rate, sub_runs = _rate(lambda p, h: search_plan(p, h), subset, s.repeats)
    cold_rate, cold_runs = _rate(lambda p, h: search_plan(p), subset, s.repeats)
    enum_rate, enum_runs = _rate(lambda p, h: enumerate_plan(p), subset, max(1, min(s.repeats, 2)))
    agree = sum(search_plan(p, h) == enumerate_plan(p) for p, h in subset)
    calls, decide_runs, decide_cpu_runs = _decide_rates(s.sessions, s.seed, s.repeats, s.levels, s.options)

    def row(measure: str, count: int, rate: float | None, runs: list[float], what: str) -> dict[str, Any]:
        return {"measure": measure, "problems": count, "decisions_per_s": rate,
                "runs_decisions_per_s": runs if rate is not None else [], "description": what}

    on_subset = bool(subset)
    rows = [
        row("decide_in_sessions", calls, statistics.median(decide_runs), decide_runs,
            f"whole decide() calls in {s.sessions} session{'s' if s.sessions != 1 else ''}, per wall-clock "
            "second"),
        row("decide_in_sessions_cpu", calls, statistics.median(decide_cpu_runs), decide_cpu_runs,
            "whole decide() calls, per second of CPU time"),
        row("enumeration", len(subset), enum_rate if on_subset else None, enum_runs,
            f"full enumeration ({len(subset)} full-horizon problems)"),
        row("search_same_problems", len(subset), sub_rate if on_subset else None, sub_runs,
            "branch-and-bound, the same problems"),
        row("search_same_problems_no_hints", len(subset), cold_rate if on_subset else None, cold_runs,
            "branch-and-bound, the same problems, without hints"),
        row("search_all_problems", len(problems), search_rate, search_runs,
            f"branch-and-bound, all {len(problems)} recorded problems"),
    ]
    summary = {
        "problems": len(problems),
        "plans_per_full_horizon": problems[0][0].n_actions ** 5 if problems else 0,
        "enumeration_problems": len(subset),
        "same_plan_as_enumeration": f"{agree}/{len(subset)}",
        "plans_agree": agree == len(subset),
        "speedup_same_problems": sub_rate / enum_rate if on_subset and enum_rate else None,
        "decide_calls": calls,
        "decide_calls_per_s_in_sessions": statistics.median(decide_runs),
        "decide_calls_per_cpu_s_in_sessions": statistics.median(decide_cpu_runs),
        "search_decisions_per_s_all_problems": search_rate,
    }
    return result("mpc", {**asdict(s), "simulation": _simulation_settings(SimulationConfig())}, rows, summary)


# ------------------------------------------------------------------------------------------------- gym


@dataclass(frozen=True)
class GymBenchSettings:
    """Inputs of `bench_gym`; the environment uses `SimulationConfig`'s defaults over kvcast's default traces."""

    steps: int = 20000
    """Environment steps per timed repeat."""
    repeats: int = 5
    """Timed repeats; the median is reported."""
    warmup: int = 5000
    """Untimed steps first (the environment caches the menus of the context lengths it meets)."""
    vector_envs: int = 4
    """Also time a `gymnasium.vector.SyncVectorEnv` of this many environments (0: skip)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.repeats < 1 or self.warmup < 0 or self.vector_envs < 0:
            raise ValueError("steps and repeats must be >= 1, warmup and vector_envs >= 0")


def bench_gym(settings: GymBenchSettings = GymBenchSettings()) -> dict[str, Any]:
    """Steps per second of `kvcast.streamer.gym.KvcastEnv` on one core, with an agent that takes a uniformly
    random valid action (``info["action_mask"]``): the environment's cost, engine and feature encoding
    included, the agent's next to nothing. Wall-clock and CPU-time rates (the CPU rate is the per-core
    figure on a shared machine)."""
    import numpy as np

    from kvcast.streamer.gym import KvcastEnv

    env = KvcastEnv()
    rng = np.random.default_rng(settings.seed)
    state = {"info": env.reset(seed=settings.seed)[1], "episodes": 0}

    def run(steps: int) -> None:
        info = state["info"]
        draws = rng.random(steps).tolist()
        for u in draws:
            valid = np.flatnonzero(info["action_mask"])
            _, _, terminated, _, info = env.step(int(valid[int(u * len(valid))]))
            if terminated:
                state["episodes"] += 1
                info = env.reset()[1]
        state["info"] = info

    run(settings.warmup)
    rows: list[dict[str, Any]] = []
    for repeat in range(settings.repeats):
        episodes = state["episodes"]
        t0, c0 = time.perf_counter(), time.process_time()
        run(settings.steps)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append({"run": "env", "repeat": repeat, "envs": 1, "steps": settings.steps,
                     "episodes": state["episodes"] - episodes, "wall_s": wall, "cpu_s": cpu,
                     "steps_per_s": settings.steps / wall, "steps_per_cpu_s": settings.steps / cpu})
    env.close()
    if settings.vector_envs:
        rows.extend(_bench_vector(settings))
    single = [r for r in rows if r["run"] == "env"]
    vector = [r for r in rows if r["run"] == "sync-vector"]
    summary: dict[str, Any] = {
        "steps_per_s": statistics.median(r["steps_per_s"] for r in single),
        "steps_per_cpu_s": statistics.median(r["steps_per_cpu_s"] for r in single),
        "steps_per_episode": sum(r["steps"] for r in single) / max(sum(r["episodes"] for r in single), 1),
        "target_steps_per_s": 10000,
        "vector_steps_per_s": statistics.median(r["steps_per_s"] for r in vector) if vector else None}
    return result("gym", {**asdict(settings), "simulation": _simulation_settings(SimulationConfig())}, rows,
                  summary)


def _bench_vector(settings: GymBenchSettings) -> list[dict[str, Any]]:
    """The same agent on a `SyncVectorEnv` (steps counted per environment)."""
    import gymnasium
    import numpy as np

    from kvcast.streamer.gym import KvcastEnv

    n = settings.vector_envs
    envs = gymnasium.vector.SyncVectorEnv([KvcastEnv for _ in range(n)])
    rng = np.random.default_rng(settings.seed + 1)
    _, infos = envs.reset(seed=settings.seed)
    rows = []
    calls = max(settings.steps // n, 1)
    for repeat in range(settings.repeats + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(calls):
            masks = infos["action_mask"]
            actions = [int(rng.choice(np.flatnonzero(m))) if m.any() else 0 for m in masks]
            _, _, _, _, infos = envs.step(np.array(actions))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if repeat:  # the first is the warm-up
            rows.append({"run": "sync-vector", "repeat": repeat - 1, "envs": n, "steps": calls * n,
                         "episodes": None, "wall_s": wall, "cpu_s": cpu, "steps_per_s": calls * n / wall,
                         "steps_per_cpu_s": calls * n / cpu})
    envs.close()
    return rows
