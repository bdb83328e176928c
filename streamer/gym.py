"""A Gymnasium environment over the real streaming engine in virtual time: ``KvcastEnv`` (needs ``kvcast[gym]``).

One episode is one session of `kvcast simulate`: a context (length and start offset drawn from the seed) loaded
over a trace (scaled as `kvcast simulate` scales it, `kvcast.streamer.simulate.scaled_trace`) by the real
`StreamingEngine` over a `SimPyLink` on a `VirtualTimeLoop`. Nothing is re-implemented: the agent is a policy
whose ``decide`` returns `kvcast.streamer.engine.PAUSE`, which holds the engine at the decision point and stops
the event loop; `step` answers with `StreamingEngine.resume` and runs the loop to the next decision point (or
the session's end). No threads; virtual time does not move while the agent thinks. An agent that answers what a
`Policy` would answer reproduces that policy's session exactly.

**Observation**: the engine's `Observation` encoded by `kvcast.policies.features.FeatureEncoder` (the same
encoding the `learned` policy uses): ``(K + 2) * len(FEATURES)`` float32 in ``[-CLIP, CLIP]``, one row per
action, ``K`` the menu's levels; `kvcast.policies.features` documents each feature and its scaling. The raw
`Observation` is in ``info["observation"]``.

**Action**: ``Discrete(K + 2)`` (`kvcast.policies.features.ActionSpace`): ``a < K`` loads the last pending
chunk at level ``a`` of ``info["levels"]``, ``K`` recomputes the first pending chunk from text, ``K + 1``
waits for the next event. ``info["action_mask"]`` (bool) gives the valid actions; an invalid one (a level not
on the chunk's menu, or waiting with the link and the compute unit both idle) is replaced by text and
``info["invalid_action"]`` is True in the answer (plus ``RewardWeights.invalid`` as a penalty).

**Reward** (`RewardWeights`; the episode's return is the same either way)::

    -(miss * [TTFT > SLO] + overrun * overrun_s + quality * quality_loss + invalid * invalid actions)

``quality_loss`` is the session's token-weighted mean loss as the engine reports it. With ``shaped=True`` (the
default) the quality term is paid per step as chunks are given levels (``loss * tokens / context tokens``) and
the rest at the end; with ``shaped=False`` everything comes at the last step.

Sessions: ``reset(seed=s)`` draws a trace, a context length in ``config.context_tokens`` and a start offset
from the environment's generator (Gymnasium's ``np_random``), so a seed fixes the session; ``options`` may fix
them instead (``{"trace": i, "context_tokens": n, "offset_s": t}``). Traces: the caller's, else kvcast's
shipped synthetic default set.

>>> env = KvcastEnv(config=SimulationConfig(context_tokens=(4096, 4096)))
>>> obs, info = env.reset(seed=0)
>>> obs.shape == env.observation_space.shape, bool(info["action_mask"][env.actions.text])
(True, True)
>>> terminated = False
>>> while not terminated:
...     obs, reward, terminated, truncated, info = env.step(env.actions.text)
>>> info["result"]["text_chunks"], info["result"]["slo_met"], reward == 0.0  # 4K tokens recompute in time
(3, True, True)
>>> env.close()
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import gymnasium
    from gymnasium import spaces
except ImportError as exc:  # pragma: no cover - the extra is installed in the dev set-up
    raise ImportError("kvcast.streamer.gym needs Gymnasium: pip install 'kvcast[gym]'") from exc

from kvcast.netsim.trace_link import SimPyLink
from kvcast.netsim.virtual_time import VirtualTimeLoop
from kvcast.policies.base import TEXT, ChunkMenu, Observation, Policy
from kvcast.policies.features import CLIP, FEATURES, ActionSpace, FeatureEncoder
from kvcast.streamer.config import SimulationConfig
from kvcast.streamer.engine import PAUSE, SessionResult, StreamingEngine
from kvcast.streamer.menus import build_menus
from kvcast.streamer.simulate import history_mean_bps, scaled_trace, trace_keys
from kvcast.traces.trace import Trace

__all__ = ["KvcastEnv", "RewardWeights"]

MENU_CACHE = 8192
"""Context lengths whose menus an environment keeps (least recently used dropped; with shared full chunks an
entry is about one chunk menu)."""


@dataclass(frozen=True)
class RewardWeights:
    """The reward's terms (see the module docstring). Defaults: the SLO first (a miss costs 1, plus 0.5 per
    second of overrun), then quality at 2 per KL/token: loading every chunk at the profile's lossiest level
    (kvcast-1, 0.21 KL/token) costs 0.43, less than a miss, as the planners' SLO-first objective has it."""

    miss: float = 1.0
    """Per session that misses the SLO."""
    overrun: float = 0.5
    """Per second of TTFT beyond the SLO."""
    quality: float = 2.0
    """Per unit of the session's mean quality loss (the profile's metric, KL per token by default)."""
    invalid: float = 0.0
    """Per invalid action (replaced by text)."""
    shaped: bool = True
    """Pay the quality term per step as chunks get levels (else all at the end)."""


class _Agent(Policy):
    """The environment's side of the engine: every decision point pauses the engine for `KvcastEnv.step`."""

    name = "gym-agent"

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self.loop = loop
        self.active = True
        """False once its episode is over or abandoned: a stale callback of that session then stops nothing."""

    def decide(self, obs: Observation) -> Any:
        if self.active and self.loop.is_running():
            self.loop.stop()  # after this callback: time stands still until resume
        return PAUSE


class KvcastEnv(gymnasium.Env):
    """Sessions of the streaming engine as a Gymnasium environment; see the module docstring.

    Args:
        traces: bandwidth traces to draw sessions from (default: kvcast's shipped default set).
        config: the simulation settings (`SimulationConfig`: menu levels, chunk and context sizes, SLO, RTT,
            scaling, prior window, seed of the trace scaling); its ``policies`` are ignored.
        reward: the reward's weights.
    """

    metadata = {"render_modes": []}

    def __init__(self, traces: Sequence[Trace] | None = None, config: SimulationConfig | None = None,
                 reward: RewardWeights | None = None) -> None:
        super().__init__()
        if traces is None:
            from kvcast.traces.defaults import default_traces

            traces = default_traces()
        if not traces:
            raise ValueError("KvcastEnv needs at least one trace")
        self.config = config if config is not None else SimulationConfig()
        self.reward_weights = reward if reward is not None else RewardWeights()
        self.traces = list(traces)
        keys = trace_keys(self.traces)
        self._scaled = [scaled_trace(t, k, self.config)[0] for t, k in zip(self.traces, keys)]
        self._profile = self.config.load_profile()
        self._shape = self.config.shape()
        self._cost = self.config.recompute_cost()
        host = self.config.load_host_profile()
        self._speeds = None if host is None else dict(host.decode_values_per_s)
        self._default_speed = None if host is None else host.default_decode_values_per_s
        self._menus: OrderedDict[int, tuple[ChunkMenu, ...]] = OrderedDict()
        self._template: tuple[ChunkMenu, ...] | None = None
        self._shared_prefix = False
        probe = self._menus_for(self.config.context_tokens[0])
        self.actions = ActionSpace(tuple(o.level for o in probe[0].levels))
        self.encoder = FeatureEncoder(self.actions)
        self.action_space = spaces.Discrete(self.actions.size)
        self.observation_space = spaces.Box(-CLIP, CLIP, shape=(self.actions.size * len(FEATURES),),
                                            dtype=np.float32)
        self._loop = VirtualTimeLoop()
        self._engine: StreamingEngine | None = None
        self._task: asyncio.Task[SessionResult] | None = None

    # ------------------------------------------------------------------ Gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._abandon()
        options = options or {}
        rng = self.np_random
        config = self.config
        index = int(options["trace"]) if "trace" in options else int(rng.integers(len(self.traces)))
        trace = self._scaled[index]
        lo, hi = config.context_tokens
        tokens = int(options.get("context_tokens", rng.integers(lo, hi + 1)))
        if "offset_s" in options:
            offset = float(options["offset_s"])
        else:
            offset = float(rng.uniform(0.0, trace.duration_s)) if trace.wrap else 0.0
        prior = history_mean_bps(trace, offset, config.prior_window_s)
        menus = self._menus_for(tokens)
        self.session_info = {"trace": index, "trace_name": self.traces[index].name,
                             "trace_source": self.traces[index].source, "context_tokens": tokens,
                             "offset_s": offset, "prior_bps": prior}
        loop = self._loop
        env = loop.new_timeline()
        link = SimPyLink(env, trace, rtt_s=config.rtt_s, efficiency=config.efficiency,
                         overhead_bytes=config.overhead_bytes, origin_s=-offset)
        self._agent = _Agent(loop)
        self._engine = StreamingEngine(self._agent, menus, link, slo_s=config.slo_s, prior_throughput_bps=prior,
                                       query_prefill_s=config.query_prefill_s, label="gym")
        self._tokens = [m.tokens for m in menus]
        self._context_tokens = sum(self._tokens)
        self._shaped_quality = 0.0
        self._task = loop.create_task(self._engine.run())
        self._task.add_done_callback(self._on_session_end)
        self._task._log_destroy_pending = False  # an env dropped mid-episode loses nothing worth a warning
        self._advance()
        if self._task.done():  # a session is never over before its first decision
            self._task.result()
            raise RuntimeError("the session ended before its first decision")
        obs, info = self._observation()
        info["session"] = dict(self.session_info)
        return obs, info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        engine = self._engine
        if engine is None or engine.paused is None:
            raise RuntimeError("step() before reset() or after the episode ended")
        obs = engine.paused
        mask = self._mask
        a = int(action)
        invalid = not (0 <= a < self.actions.size and mask[a])
        decision = self.actions.decision(obs, a, mask)
        weights = self.reward_weights
        reward = -weights.invalid if invalid else 0.0
        if decision is not None and decision.action != TEXT and weights.shaped:
            loss = obs.session.menus[decision.chunk].option(decision.action).quality_loss
            share = loss * self._tokens[decision.chunk] / self._context_tokens
            self._shaped_quality += share
            reward -= weights.quality * share
        engine.resume(decision)
        self._advance()
        if self._task.done():
            result = self._task.result()
            reward -= self._final_penalty(result)
            self._agent.active = False
            self._engine = self._task = None
            obs_vec = np.zeros(self.observation_space.shape, dtype=np.float32)
            info = {"action_mask": np.zeros(self.actions.size, dtype=bool), "levels": self.actions.levels,
                    "invalid_action": invalid, "result": result.summary(), "session": dict(self.session_info)}
            return obs_vec, float(reward), True, False, info
        obs_vec, info = self._observation()
        info["invalid_action"] = invalid
        return obs_vec, float(reward), False, False, info

    def close(self) -> None:
        self._abandon()
        if not self._loop.is_closed():
            self._loop.close()
        super().close()

    # ------------------------------------------------------------------ helpers
    def action_masks(self) -> np.ndarray:
        """The valid actions now (bool), as ``info["action_mask"]``."""
        return self._mask.copy()

    def _final_penalty(self, result: SessionResult) -> float:
        w = self.reward_weights
        quality = w.quality * (result.quality_loss - self._shaped_quality) if w.shaped else \
            w.quality * result.quality_loss
        return w.miss * (not result.slo_met) + w.overrun * result.overrun_s + quality

    def _advance(self) -> None:
        """Run virtual time until the engine pauses at a decision point or the session ends."""
        if self._engine.paused is None and not self._task.done():
            self._loop.run_forever()

    def _observation(self) -> tuple[np.ndarray, dict[str, Any]]:
        obs = self._engine.paused
        mask = self._mask = self.encoder.mask(obs)
        vec = self.encoder.encode(obs, mask).reshape(-1)
        return vec, {"action_mask": mask.copy(), "levels": self.actions.levels, "observation": obs}

    def _on_session_end(self, task: asyncio.Task[SessionResult]) -> None:
        if task is self._task:
            self._loop.stop()

    def _abandon(self) -> None:
        """Drop an unfinished episode (its timers die with the timeline that `reset` replaces)."""
        task, self._task, self._engine = self._task, None, None
        if task is not None and not task.done():
            self._agent.active = False
            task.cancel()
            try:
                self._loop.run_until_complete(task)
            except asyncio.CancelledError:
                pass

    def _menus_for(self, tokens: int) -> tuple[ChunkMenu, ...]:
        """The menus of a `tokens`-token context, as `build_menus` makes them (cached). When a chunk's menu
        depends only on its index, start and size (checked once on two lengths), the full chunks are shared
        with a template of the longest context and only the last chunk is built per length."""
        menus = self._menus.get(tokens)
        if menus is not None:
            self._menus.move_to_end(tokens)
            return menus
        chunk = self.config.chunk_tokens
        if self._template is None:
            longest = -(-self.config.context_tokens[1] // chunk) * chunk
            self._template = self._build(longest)
            probe = max(chunk + 1, longest - chunk - 1)
            built = self._build(probe)
            self._shared_prefix = built[:-1] == self._template[:len(built) - 1]
        full = tokens // chunk
        if self._shared_prefix and tokens <= len(self._template) * chunk:
            if tokens % chunk == 0:
                menus = self._template[:full]
            else:
                menus = self._template[:full] + self._build(tokens)[-1:]
        else:
            menus = self._build(tokens)
        self._menus[tokens] = menus
        if len(self._menus) > MENU_CACHE:
            self._menus.popitem(last=False)
        return menus

    def _build(self, tokens: int) -> tuple[ChunkMenu, ...]:
        return build_menus(self._profile, self._shape, tokens, self.config.chunk_tokens, self._cost,
                           levels=self.config.levels, decode_speeds=self._speeds,
                           default_decode_speed=self._default_speed)
