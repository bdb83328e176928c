"""Virtual time for asyncio: an event loop whose clock is a SimPy `Environment`.

`VirtualTimeLoop` is an ordinary asyncio event loop (``asyncio.sleep``, ``loop.call_at``, futures, tasks,
``loop.time()`` all work) except that it never waits: its timers are SimPy timeouts, and when no callback is
ready it steps the SimPy environment to its next event, which moves ``env.now`` (and thus ``loop.time()``)
forward. SimPy processes and asyncio coroutines therefore share one timeline and one event order, and code
written for asyncio runs unchanged, in simulated seconds, as fast as the CPU allows.

An hour passes instantly:

>>> import asyncio
>>> from kvcast.netsim import VirtualTimeLoop
>>> loop = VirtualTimeLoop()
>>> async def main():
...     await asyncio.sleep(3600)
...     return asyncio.get_running_loop().time()
>>> loop.run_until_complete(main())
3600
>>> loop.close()

There is no I/O: sockets, subprocesses and executors are not supported (they need real time).

``loop.stop()`` takes effect as soon as the callback that called it returns (asyncio's loops finish the batch
of ready callbacks first); the others stay ready for the next ``run_forever``. A driver that steps a
simulation from outside (`kvcast.streamer.gym`) stops time exactly where it asked.
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import simpy
from simpy.core import EmptySchedule

__all__ = ["VirtualTimeLoop", "VirtualTimeDeadlock", "run_virtual"]

T = TypeVar("T")


class VirtualTimeDeadlock(RuntimeError):
    """Nothing is scheduled any more, yet the awaited coroutine has not finished (it waits forever)."""


class VirtualTimeLoop(asyncio.base_events.BaseEventLoop):
    """An asyncio event loop driven by SimPy virtual time (see the module docstring).

    Args:
        env: the SimPy environment that provides the clock and the timer queue (a new one if omitted).
    """

    def __init__(self, env: simpy.Environment | None = None) -> None:
        super().__init__()
        self.env = env if env is not None else simpy.Environment()
        self._clock_resolution = 0.0

    def new_timeline(self, env: simpy.Environment | None = None) -> simpy.Environment:
        """Continue on a fresh SimPy environment (time 0 unless `env` says otherwise) and return it.

        For running many independent simulations on one loop, each from time 0 (so each result is the same
        whatever ran before it). Timers and SimPy events still scheduled on the old timeline are dropped:
        call this only when the previous simulation is over. Ready callbacks are kept.
        """
        self.env = env if env is not None else simpy.Environment()
        return self.env

    def time(self) -> float:
        """The SimPy environment's ``now``."""
        return self.env.now

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any,
                context: Any = None) -> asyncio.TimerHandle:
        """Schedule `callback(*args)` at virtual time `when`, as a SimPy timeout."""
        handle = asyncio.TimerHandle(when, callback, args, self, context)
        env = self.env
        delay = when - env.now
        timeout = env.timeout(delay if delay > 0.0 else 0.0)
        ready = self._ready
        timeout.callbacks.append(lambda _event: ready.append(handle))
        return handle

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        pass  # a cancelled handle is skipped when its timeout fires

    def _process_events(self, event_list: Any) -> None:
        pass

    def _write_to_self(self) -> None:
        pass

    def _run_once(self) -> None:
        ready = self._ready
        if not ready:
            if self._stopping:
                return
            try:
                self.env.step()
            except EmptySchedule:
                raise VirtualTimeDeadlock(
                    f"virtual time {self.env.now:.6g} s: no timer or SimPy event is left, but the loop still "
                    f"waits (an awaited future is never completed)") from None
            return
        for _ in range(len(ready)):
            handle = ready.popleft()
            if not handle._cancelled:
                handle._run()
                if self._stopping:  # stop() takes effect after the current callback, not the batch
                    return


def run_virtual(main: Awaitable[T] | Callable[[], Awaitable[T]], env: simpy.Environment | None = None) -> T:
    """Run a coroutine (or a coroutine function) to completion in virtual time and return its result."""
    loop = VirtualTimeLoop(env)
    try:
        return loop.run_until_complete(main() if callable(main) else main)
    finally:
        loop.close()
