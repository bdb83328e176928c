"""The streaming engine and trace-driven simulation.

* `StreamingEngine` (`kvcast.streamer.engine`): one session of loading a context's KV cache chunk by chunk as a
  policy decides; plain asyncio, so it runs in virtual time (`kvcast.netsim.VirtualTimeLoop` +
  `kvcast.netsim.SimPyLink`) and in real time (a normal event loop + a real link) unchanged.
* `Profile`, `ModelShape`, `RecomputeCost`, `build_menus` (`kvcast.streamer.profile`, `kvcast.streamer.menus`):
  per-chunk menus from a codec profile measured on a small model, scaled to a deployment's model shape.
* `SimulationConfig`, `run_sweep`, `simulate_session` (`kvcast.streamer.simulate`): policies x traces x contexts in
  parallel, deterministic for a seed; `kvcast simulate` and `kvcast bench sim` (`kvcast.streamer.cli`).

Names are imported lazily, so ``import streamer`` (and ``kvcast --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "StreamingEngine": "kvcast.streamer.engine",
    "SessionResult": "kvcast.streamer.engine",
    "ChunkRecord": "kvcast.streamer.engine",
    "PolicyError": "kvcast.streamer.engine",
    "stream_context": "kvcast.streamer.engine",
    "Profile": "kvcast.streamer.profile",
    "ProfileError": "kvcast.streamer.profile",
    "default_profile": "kvcast.streamer.profile",
    "ModelShape": "kvcast.streamer.menus",
    "RecomputeCost": "kvcast.streamer.menus",
    "build_menus": "kvcast.streamer.menus",
    "recompute_cost": "kvcast.streamer.menus",
    "MODEL_SHAPES": "kvcast.streamer.menus",
    "SimulationConfig": "kvcast.streamer.simulate",
    "run_sweep": "kvcast.streamer.simulate",
    "simulate_session": "kvcast.streamer.simulate",
    "session_in_virtual_time": "kvcast.streamer.simulate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'streamer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
