"""Trace-driven simulation: policies x traces x contexts, in virtual time, in parallel over processes.

One *session* loads one context over one trace with one policy (`StreamingEngine` over a `SimPyLink` on a
`VirtualTimeLoop`). A sweep crosses every trace with `SimulationConfig.contexts` contexts (a context = a
length and a start offset into the trace, drawn from the seed) and runs every policy on each
(trace, context) pair: comparisons between policies are paired. Every session starts at virtual time 0 on
a fresh SimPy timeline, so results do not depend on the number of worker processes or on the order in
which sessions run.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from kvcast.netsim.trace_link import SimPyLink
from kvcast.netsim.virtual_time import VirtualTimeLoop
from kvcast.policies.base import ChunkMenu, Policy
from kvcast.policies.registry import PolicyRegistry, default_registry
from kvcast.streamer.config import SimulationConfig  # the settings and their defaults (a light module)
from kvcast.streamer.engine import SessionResult, StreamingEngine
from kvcast.streamer.menus import build_menus, with_recompute_scale
from kvcast.traces.trace import Trace

__all__ = ["SimulationConfig", "SessionSetup", "history_mean_bps", "plan_sessions", "run_sweep",
           "run_tasks_in_processes", "session_in_virtual_time", "simulate_session"]


@dataclass(frozen=True)
class SessionSetup:
    """One (trace, context) pair: everything but the policy."""

    trace_index: int
    trace_key: str
    context: int
    context_tokens: int
    offset_s: float
    """Where in the (scaled) trace the session starts."""
    scale_factor: float
    prior_bps: float
    mean_bps: float = field(default=0.0)
    """Mean of the scaled trace."""


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def trace_keys(traces: Sequence[Trace]) -> list[str]:
    """Stable, unique keys for seeding: source and name (plus ``#k`` for repeats)."""
    seen: dict[str, int] = {}
    keys = []
    for trace in traces:
        key = f"{trace.source}|{trace.name}"
        count = seen.get(key, 0)
        seen[key] = count + 1
        keys.append(key if count == 0 else f"{key}#{count}")
    return keys


def history_mean_bps(trace: Trace, start_s: float, window_s: float) -> float:
    """Mean bandwidth of `trace` over the `window_s` seconds before `start_s` (wrapping if the trace
    wraps)."""
    if window_s <= 0:
        return float(trace.bandwidth_at(start_s))
    if trace.wrap:
        begin = (start_s - window_s) % trace.duration_s
        return float(trace.delivered_bits(begin, begin + window_s)) / window_s
    if start_s <= 0:
        return float(trace.bandwidth_at(0.0))
    span = min(window_s, start_s)
    return float(trace.delivered_bits(start_s - span, start_s)) / span


def scaled_trace(trace: Trace, key: str, config: SimulationConfig) -> tuple[Trace, float]:
    """The trace as simulated (see `SimulationConfig.scaling` and `bandwidth_scale`) and the factor applied."""
    factor = _scaling_factor(trace, key, config)
    if config.bandwidth_scale != 1.0:
        factor = (1.0 if factor is None else factor) * config.bandwidth_scale
    if factor is None:
        return trace, 1.0
    return trace.scaled(factor), factor


def _scaling_factor(trace: Trace, key: str, config: SimulationConfig) -> float | None:
    """The factor of `SimulationConfig.scaling` for this trace (None: ``none``, the trace as read)."""
    factor = config.scale_factor_or_none()
    if config.scaling == "none":
        return None
    if factor is None:  # range: log-uniform target mean, drawn from (seed, trace)
        rng = np.random.default_rng([config.seed, _stable_hash(key), 1])
        lo, hi = config.mean_gbps
        target = math.exp(rng.uniform(math.log(lo), math.log(hi))) * 1e9 if hi > lo else lo * 1e9
        if trace.mean_bps <= 0:
            raise ValueError(f"trace {trace.name!r} ({trace.source}) has zero mean bandwidth; "
                             "cannot scale it")
        factor = target / trace.mean_bps
    return factor


def plan_sessions(trace: Trace, trace_index: int, key: str,
                  config: SimulationConfig) -> tuple[Trace, list[SessionSetup]]:
    """The scaled trace and its `config.contexts` session setups (deterministic for the seed)."""
    scaled, factor = scaled_trace(trace, key, config)
    rng = np.random.default_rng([config.seed, _stable_hash(key), 2])
    lo, hi = config.context_tokens
    setups = []
    mean = scaled.mean_bps
    for c in range(config.contexts):
        tokens = int(rng.integers(lo, hi + 1))
        offset = float(rng.uniform(0.0, scaled.duration_s)) if scaled.wrap else 0.0
        prior = history_mean_bps(scaled, offset, config.prior_window_s)
        setups.append(SessionSetup(trace_index, key, c, tokens, offset, factor, prior, mean))
    return scaled, setups


def simulate_session(policy: Policy, menus: Sequence[ChunkMenu], trace: Trace, *, slo_s: float,
                     offset_s: float = 0.0, rtt_s: float = 0.0, efficiency: float = 1.0,
                     overhead_bytes: int = 0, prior_throughput_bps: float | None = None,
                     query_prefill_s: float = 0.0, label: str | None = None,
                     loop: VirtualTimeLoop | None = None, lossy_prefix_ratio: float = 0.0) -> SessionResult:
    """Run one session in virtual time, starting `offset_s` seconds into `trace`, and return its result."""
    own = loop is None
    loop = VirtualTimeLoop() if own else loop
    try:
        return loop.run_until_complete(session_in_virtual_time(
            policy, menus, trace, slo_s=slo_s, offset_s=offset_s, rtt_s=rtt_s, efficiency=efficiency,
            overhead_bytes=overhead_bytes, prior_throughput_bps=prior_throughput_bps,
            query_prefill_s=query_prefill_s, label=label, lossy_prefix_ratio=lossy_prefix_ratio))
    finally:
        if own:
            loop.close()


async def session_in_virtual_time(policy: Policy, menus: Sequence[ChunkMenu], trace: Trace, *, slo_s: float,
                                  offset_s: float = 0.0, rtt_s: float = 0.0, efficiency: float = 1.0,
                                  overhead_bytes: int = 0, prior_throughput_bps: float | None = None,
                                  query_prefill_s: float = 0.0, label: str | None = None,
                                  lossy_prefix_ratio: float = 0.0) -> SessionResult:
    """Coroutine form of `simulate_session`, to run many sessions back to back inside one coroutine on a
    `VirtualTimeLoop`: each session starts on a fresh timeline at time 0."""
    loop = asyncio.get_running_loop()
    if not isinstance(loop, VirtualTimeLoop):
        raise RuntimeError("session_in_virtual_time needs a running netsim.VirtualTimeLoop")
    env = loop.new_timeline()
    link = SimPyLink(env, trace, rtt_s=rtt_s, efficiency=efficiency, overhead_bytes=overhead_bytes,
                     origin_s=-offset_s)
    engine = StreamingEngine(policy, menus, link, slo_s=slo_s, prior_throughput_bps=prior_throughput_bps,
                             query_prefill_s=query_prefill_s, label=label, lossy_prefix_ratio=lossy_prefix_ratio)
    return await engine.run()


@dataclass
class TraceTask:
    """The work of one worker call: every context of one trace, every policy."""

    trace: Trace
    trace_index: int
    key: str
    config: SimulationConfig
    chunk_log: bool = True


@dataclass
class TraceOutcome:
    trace_index: int
    sessions: list[dict[str, Any]]
    chunk_lines: list[str]
    chunks: int


def run_trace_task(task: TraceTask, registry: PolicyRegistry | None = None) -> TraceOutcome:
    """Run every policy on every context of one trace (the unit of parallel work)."""
    config = task.config
    registry = registry if registry is not None else default_registry()
    scaled, setups = plan_sessions(task.trace, task.trace_index, task.key, config)
    profile = config.load_profile()
    lossy_prefix_ratio = config.resolved_lossy_prefix_ratio(profile)
    shape = config.shape()
    cost = config.recompute_cost()
    host = config.load_host_profile()
    speeds = None if host is None else dict(host.decode_values_per_s)
    default_speed = None if host is None else host.default_decode_values_per_s
    menus_by_length: dict[int, tuple[ChunkMenu, ...]] = {}
    sessions: list[dict[str, Any]] = []
    lines: list[str] = []
    chunks = 0

    async def run_all() -> None:
        nonlocal chunks
        for setup in setups:
            menus = menus_by_length.get(setup.context_tokens)
            if menus is None:
                menus = build_menus(profile, shape, setup.context_tokens, config.chunk_tokens, cost,
                                    levels=config.levels, decode_speeds=speeds,
                                    default_decode_speed=default_speed)
                if config.gpu_share != 1.0:
                    menus = with_recompute_scale(menus, 1.0 / config.gpu_share)
                menus_by_length[setup.context_tokens] = menus
            for spec in config.policies:
                try:
                    result = await session_in_virtual_time(
                        registry.create(spec), menus, scaled, slo_s=config.slo_s, offset_s=setup.offset_s,
                        rtt_s=config.rtt_s, efficiency=config.efficiency,
                        overhead_bytes=config.overhead_bytes, prior_throughput_bps=setup.prior_bps,
                        query_prefill_s=config.query_prefill_s, label=spec,
                        lossy_prefix_ratio=lossy_prefix_ratio)
                except Exception as exc:
                    raise RuntimeError(f"policy {spec!r} on trace {task.trace.name!r} ({task.trace.source}), "
                                       f"context {setup.context}: {type(exc).__name__}: {exc}") from exc
                row = {"policy": spec, "trace": task.trace.name, "trace_index": setup.trace_index,
                       "trace_source": task.trace.source, "context": setup.context,
                       "offset_s": setup.offset_s, "scale_factor": setup.scale_factor,
                       "trace_mean_bps": setup.mean_bps, "prior_bps": setup.prior_bps}
                row.update(result.summary())
                sessions.append(row)
                chunks += len(result.chunks)
                if task.chunk_log:
                    head = {"policy": spec, "trace_index": setup.trace_index, "context": setup.context}
                    for rec in result.chunks:
                        lines.append(json.dumps({**head, **rec.to_dict()}, separators=(",", ":")))

    loop = VirtualTimeLoop()
    try:
        loop.run_until_complete(run_all())
    finally:
        loop.close()
    return TraceOutcome(task.trace_index, sessions, lines, chunks)


def _run_task(task: TraceTask) -> TraceOutcome:
    return run_trace_task(task)


def run_tasks_in_processes(tasks: Sequence[TraceTask], workers: int | None = None) -> Iterator[TraceOutcome]:
    """Run `tasks` on `workers` processes (None: one per CPU; 1, or a single task: in this process) and yield
    their outcomes in task order; an error or an abandoned generator cancels the tasks not yet started."""
    if workers is None:
        workers = os.cpu_count() or 1
    if workers <= 1 or len(tasks) <= 1:
        registry = default_registry()
        for task in tasks:
            yield run_trace_task(task, registry)
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
        futures = [pool.submit(_run_task, task) for task in tasks]
        done = False
        try:
            for future in futures:
                yield future.result()
            done = True
        finally:
            if not done:
                for future in futures:
                    future.cancel()


def run_sweep(traces: Sequence[Trace], config: SimulationConfig, *, workers: int | None = None,
              chunk_log: bool = True, on_outcome: Callable[[TraceOutcome], None] | None = None,
              ) -> Iterator[TraceOutcome]:
    """Run the sweep; yields one `TraceOutcome` per trace, in trace order (whatever the worker count).

    `workers`: processes (None: one per CPU; 1: in this process, no pool).
    """
    keys = trace_keys(traces)
    tasks = [TraceTask(t, i, k, config, chunk_log) for i, (t, k) in enumerate(zip(traces, keys, strict=True))]
    yield from run_tasks_in_processes(tasks, workers)


def with_overrides(config: SimulationConfig, **changes: Any) -> SimulationConfig:
    """`config` with some fields replaced (None values are ignored)."""
    return replace(config, **{k: v for k, v in changes.items() if v is not None})
