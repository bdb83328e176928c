"""Where a sweep's tasks run: in this process, on a local process pool, or on Ray (``kvcast[ray]``).

A task is a `kvcast.streamer.simulate.TraceTask` (every context of one trace, every policy, at one operating
point); it depends on nothing but its own inputs (the seed included), so every executor returns the very same
outcomes. `run_tasks` yields them in task order whatever order they finish in.

Ray is optional and imported only when asked for. Without an address, `ray_session` starts a local instance
(``ray.init()``) whose workers import the same kvcast as this process (its folder goes on their
``PYTHONPATH``), and stops it afterwards; with an address (``auto`` or ``ray://host:10001``) it joins that
cluster, whose nodes need the same kvcast installed. If Ray is already initialised (a test, a notebook) it is
used as it is. Each distinct trace is put into Ray's object store once, not once per operating point.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvcast.streamer.simulate import TraceOutcome, TraceTask, run_tasks_in_processes, run_trace_task
from kvcast.traces.trace import Trace

__all__ = ["EXECUTORS", "ExecutorError", "ray_session", "run_tasks"]

EXECUTORS = ("process", "ray")
"""Executor names of ``kvcast sweep --executor``."""

RAY_HINT = "pip install 'kvcast[ray]'"


class ExecutorError(RuntimeError):
    """An executor cannot run: Ray missing or unreachable, an unknown executor name."""


def _kvcast_root() -> str:
    """The folder that holds this process's ``kvcast`` package (for local Ray workers' ``PYTHONPATH``)."""
    import kvcast

    return str(Path(kvcast.__file__).resolve().parent.parent)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ExecutorError(f"the ray executor needs Ray, an optional extra: {RAY_HINT}") from None
    return ray


@contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[Any]:
    """The `ray` module, initialised: as it is if already initialised, else started (locally when `address` is
    None, with `num_cpus` CPUs) and shut down on exit."""
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address is None:
        path = os.pathsep.join(p for p in (_kvcast_root(), os.environ.get("PYTHONPATH", "")) if p)
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except Exception as exc:  # ConnectionError, RuntimeError, ...: Ray's own types vary by version
        where = "a local Ray instance" if address is None else f"the Ray cluster at {address!r}"
        raise ExecutorError(f"could not start or join {where}: {type(exc).__name__}: {exc}") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def _run_with_trace(trace: Trace, task: TraceTask) -> TraceOutcome:
    """A Ray task: the trace comes from the object store, the rest of the task by value."""
    return run_trace_task(replace(task, trace=trace))


def run_tasks(tasks: Sequence[TraceTask], *, executor: str = "process", workers: int | None = None,
              ray_address: str | None = None) -> Iterator[TraceOutcome]:
    """Run `tasks` and yield their outcomes in task order.

    ``process``: `workers` processes (None: one per CPU; 1, or a single task: in this process). ``ray``: on
    Ray (`ray_session`; `workers` caps the CPUs of a local instance this call starts).
    """
    if executor not in EXECUTORS:
        raise ExecutorError(f"unknown executor {executor!r}; executors: {', '.join(EXECUTORS)}")
    if executor == "ray":
        yield from _run_on_ray(tasks, workers, ray_address)
        return
    yield from run_tasks_in_processes(tasks, workers)


def _run_on_ray(tasks: Sequence[TraceTask], workers: int | None, address: str | None) -> Iterator[TraceOutcome]:
    with ray_session(address, num_cpus=workers) as ray:
        remote = ray.remote(num_cpus=1, max_retries=0)(_run_with_trace)
        refs_by_trace: dict[int, Any] = {}
        pending = []
        for task in tasks:
            ref = refs_by_trace.get(id(task.trace))
            if ref is None:
                ref = refs_by_trace[id(task.trace)] = ray.put(task.trace)
            pending.append(remote.remote(ref, replace(task, trace=None)))
        done = False
        try:
            for ref in pending:
                yield ray.get(ref)
            done = True
        finally:
            if not done:
                for ref in pending:
                    ray.cancel(ref)
