"""The streaming engine and trace-driven simulation.

* `StreamingEngine` (`streamer.engine`): one session of loading a context's KV cache chunk by chunk as a
  policy decides; plain asyncio, so it runs in virtual time (`netsim.VirtualTimeLoop` + `netsim.SimPyLink`)
  and in real time (a normal event loop + a real link) unchanged.
* `Profile`, `ModelShape`, `RecomputeCost`, `build_menus` (`streamer.profile`, `streamer.menus`): per-chunk
  menus from a codec profile measured on a small model, scaled to a deployment's model shape.
* `SimulationConfig`, `run_sweep`, `simulate_session` (`streamer.simulate`): policies x traces x contexts in
  parallel, deterministic for a seed; `kvcast simulate` and `kvcast bench sim` (`streamer.cli`).

Names are imported lazily, so ``import streamer`` (and ``kvcast --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "StreamingEngine": "streamer.engine", "SessionResult": "streamer.engine", "ChunkRecord": "streamer.engine",
    "PolicyError": "streamer.engine", "stream_context": "streamer.engine",
    "Profile": "streamer.profile", "ProfileError": "streamer.profile", "default_profile": "streamer.profile",
    "ModelShape": "streamer.menus", "RecomputeCost": "streamer.menus", "build_menus": "streamer.menus",
    "recompute_cost": "streamer.menus", "MODEL_SHAPES": "streamer.menus",
    "SimulationConfig": "streamer.simulate", "run_sweep": "streamer.simulate",
    "simulate_session": "streamer.simulate", "session_in_virtual_time": "streamer.simulate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'streamer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
