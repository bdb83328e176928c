# SPDX-License-Identifier: GPL-3.0-or-later
"""`loss-budget`: the GPU recomputes the context from the front while the link loads it from the back, every
loaded chunk at the fewest bytes its quality-loss budget allows.

An example of a kvcast policy in one file, installed as a plug-in (``docs/writing-a-policy.md`` in kvcast).

* **Split** (Cake's): whenever the compute unit is idle, the lowest undecided chunk is recomputed from text;
  whenever the link is idle, the highest undecided chunk is loaded. The two ends meet where the GPU's and the
  link's speeds balance.
* **Level**: a loaded chunk gets the level with the fewest bytes whose quality loss *on that chunk* (the menu
  has a row per chunk: the loss depends on the position) is at most ``loss``.
* **Only loads that pay**: the link takes the chunk only if, at the last transfer's throughput (the session's
  prior before any), it would be ready before the GPU alone could recompute every undecided chunk. Otherwise,
  or if no level of the chunk is within the budget, the link stops and the GPU recomputes the rest. (Cake
  itself always loads, and on a slow link one chunk's transfer can outlast recomputing the whole context.)

So no chunk's loss exceeds the budget: loaded chunks by the rule, and text chunks because every chunk before
a text chunk is text too (their KV is exact). The policy ignores the SLO: it shortens the time to first token
(TTFT) for the quality asked, and misses the SLO when even that is too slow.

Argument: ``loss-budget:loss=<budget>`` or ``loss-budget:<budget>``, in the menu's quality-loss unit (KL per
token in kvcast's shipped profile); default 0.001.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvcast.policies.base import TEXT, Decision, LevelOption, Observation, Policy, Session
from kvcast.policies.planning.options import parse_options

__all__ = ["LossBudgetPolicy", "cheapest_within"]


def cheapest_within(options: Sequence[LevelOption], loss: float) -> str | None:
    """The level with the fewest bytes among `options` whose quality loss is at most `loss` (ties: the smaller
    loss, then menu order); None when there is none.

    >>> cheapest_within([LevelOption("raw", 400, 0.0, 0.0), LevelOption("q4", 100, 0.0, 0.002),
    ...                  LevelOption("q8", 200, 0.0, 0.0005)], loss=0.001)
    'q8'
    """
    within = [o for o in options if o.quality_loss <= loss]
    return min(within, key=lambda o: (o.nbytes, o.quality_loss)).level if within else None


class LossBudgetPolicy(Policy):
    """Text from the front; loads from the back at the cheapest level within the loss budget, while they pay."""

    name = "loss-budget"

    def __init__(self, options: str | None = None) -> None:
        self.loss = parse_options(options, {"loss": 0.001}, self.name)["loss"]
        if not 0.0 <= self.loss < float("inf"):
            raise ValueError(f"{self.name}: loss must be a finite number >= 0, got {self.loss}")

    def reset(self, session: Session) -> None:
        super().reset(session)
        self.levels = [cheapest_within(menu.levels, self.loss) for menu in session.menus]
        """Per chunk: the level it is loaded at, or None (then only the GPU may take it)."""

    def throughput_bps(self, obs: Observation) -> float | None:
        """The last transfer's payload throughput (bits/s), else the session's prior, else None."""
        if obs.samples:
            return obs.samples[-1].payload_bps(self.session.rtt_s)
        return self.session.prior_throughput_bps

    def decide(self, obs: Observation) -> Decision | None:
        if obs.compute_idle:
            return Decision(obs.pending[0], TEXT)
        back = obs.pending[-1]
        level = self.levels[back]
        if not obs.link_idle or level is None:
            return None  # the compute unit is busy: the engine asks again when its chunk is done
        bps = self.throughput_bps(obs)
        if bps is not None:  # with no estimate at all, load: the transfer measures the link
            option = obs.menus[back].option(level)
            arrives_s = max(obs.now_s, obs.link_busy_until_s) + self.session.rtt_s + option.nbytes * 8.0 / bps
            ready_s = max(arrives_s, obs.decoder_free_at_s) + option.decode_s
            gpu_alone_s = obs.compute_free_at_s + sum(obs.menus[c].recompute_s for c in obs.pending)
            if ready_s > gpu_alone_s:
                return None
        return Decision(back, level, predicted_bps=bps)
