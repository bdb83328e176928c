"""The engine's decoder and compute unit: small interfaces, simulated or real (the link is `kvcast.netsim.Link`).

The `kvcast.streamer.engine.StreamingEngine` drives three resources: the link (transfers), the decoder (turns a
loaded chunk's bytes into KV, one chunk at a time) and the compute unit (recomputes a chunk's KV from its
tokens given the KV of every chunk before it, one chunk at a time). Each is simulated or real:

* `SimulatedDecoder` and `SimulatedCompute` take the durations the chunk menus give (measured decode speed and
  recompute cost); the engine computes their end times when they start, so a simulated chunk costs no event.
  They are the defaults: `kvcast simulate` uses them.
* A real decoder or compute unit does the work (`kvcast.streamer.live`: the codec's decoder and the model's
  prefill) and calls back when done; the engine then learns the chunk's ready time. Real work never blocks the
  event loop: implementations run it in threads or processes and call back on the loop.

Both kinds run under the same engine code, in virtual or real time.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

__all__ = ["Compute", "Decoder", "Done", "SimulatedCompute", "SimulatedDecoder"]

Done = Callable[[BaseException | None], None]
"""A real resource's callback: ``None`` when the work succeeded, else the exception that ended it."""


class Decoder(abc.ABC):
    """Turns a loaded chunk's bytes into KV."""

    timed_by_menu: bool = False
    """True for the simulated decoder: the engine takes durations from the menus (``LevelOption.decode_s``)."""

    @abc.abstractmethod
    def start(self, chunk: int, level: str, payload: bytes | None, on_done: Done) -> None:
        """Begin decoding chunk `chunk` (loaded at `level`, `payload` its bytes); call ``on_done`` on the event
        loop when its KV is in place. Called on the loop, one chunk at a time."""

    def close(self) -> None:  # noqa: B027 (optional hook: most resources hold nothing)
        """Release threads or processes."""


class Compute(abc.ABC):
    """Recomputes a chunk's KV from its tokens, given the KV of the chunks before it."""

    timed_by_menu: bool = False
    """True for the simulated compute unit: durations from the menus (``ChunkMenu.recompute_s``)."""

    @abc.abstractmethod
    def start(self, chunk: int, on_done: Done) -> None:
        """Begin recomputing chunk `chunk` (every chunk before it is ready); call ``on_done`` on the event loop
        when its KV is in place. Called on the loop, one chunk at a time."""

    def close(self) -> None:  # noqa: B027 (optional hook: most resources hold nothing)
        """Release threads or processes."""


class SimulatedDecoder(Decoder):
    """Decoding that takes the menu's time and produces nothing (the simulator's decoder)."""

    timed_by_menu = True

    def start(self, chunk: int, level: str, payload: bytes | None, on_done: Done) -> None:
        raise RuntimeError("the engine times simulated decoding from the menus; start() is never called")


class SimulatedCompute(Compute):
    """Recompute that takes the menu's time and produces nothing (the simulator's compute unit)."""

    timed_by_menu = True

    def start(self, chunk: int, on_done: Done) -> None:
        raise RuntimeError("the engine times simulated recompute from the menus; start() is never called")
