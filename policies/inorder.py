"""The frame shared by the ABR-style baselines `rate` and `slack`: chunks in index order, each loaded at the
level the policy's rule picks, or recomputed from text where the compute unit would have it ready sooner.

A video ABR controller picks one bitrate per chunk for one resource, the network. A KV stream has a second
resource, the GPU, which can recompute a chunk from its text (``reference/streaming-and-policies.md``, the
vocabulary of section 0). The frame adds it the simplest way, per chunk and greedily: for the lowest undecided
chunk it predicts when the chunk would be ready

* loaded at the rule's level: when the link is free (``link_busy_until_s``), plus one RTT, plus the bytes at
  the predicted throughput, then decoded once the decoder is free;
* recomputed: when the compute unit is free, and every chunk before it is ready (a loaded chunk not ready yet
  is ready, at the earliest, when the link and the decoder have finished their queues), plus its recompute
  time;

and queues it where it is ready first (text on a tie). A chunk is sent to the link only while the link is idle
(one request in flight, as a video player requests chunks); otherwise the policy waits for the link. Before
any throughput estimate (no sample, no prior) the link loads the smallest level.

A subclass implements `estimate_bps` and `level_for`.
"""

from __future__ import annotations

import abc

from kvcast.policies.base import TEXT, Decision, LevelOption, Observation, Policy, Session, smallest

__all__ = ["InOrderPolicy"]


class InOrderPolicy(Policy):
    """Chunks in order; each at `level_for`'s level, or text where the GPU has it ready sooner."""

    def reset(self, session: Session) -> None:
        super().reset(session)
        self.rtt_s = session.rtt_s

    @abc.abstractmethod
    def estimate_bps(self, obs: Observation) -> float | None:
        """Throughput (bits/s) the rule assumes for the next transfer; None with no information at all."""

    @abc.abstractmethod
    def level_for(self, obs: Observation, chunk: int, bps: float) -> str:
        """The level the rule loads `chunk` at, given the estimate `bps` (> 0)."""

    def load_ready_s(self, obs: Observation, option: LevelOption, bps: float) -> float:
        """When a chunk loaded at `option` now (after the link's queue) would be ready."""
        end = max(obs.now_s, obs.link_busy_until_s) + self.rtt_s + option.nbytes * 8.0 / bps
        return max(end, obs.decoder_free_at_s) + option.decode_s

    def text_ready_s(self, obs: Observation, chunk: int) -> float:
        """When `chunk`, recomputed from text, would be ready."""
        start = max(obs.now_s, obs.compute_free_at_s)
        actions, ready = obs.actions, obs.ready
        for j in range(chunk):
            if not ready[j] and actions[j] not in (None, TEXT):  # loading: ready after the link and decoder
                start = max(start, obs.link_busy_until_s, obs.decoder_free_at_s)
                break
        return start + obs.menus[chunk].recompute_s

    def decide(self, obs: Observation) -> Decision | None:
        chunk = obs.pending[0]
        bps = self.estimate_bps(obs)
        if bps is None or bps <= 0.0:
            if obs.link_idle and bps is None:
                return Decision(chunk, smallest(obs.menus, chunk))
            return Decision(chunk, TEXT, predicted_bps=bps) if obs.compute_idle or bps is not None else None
        level = self.level_for(obs, chunk, bps)
        option = obs.menus[chunk].option(level)
        if self.text_ready_s(obs, chunk) <= self.load_ready_s(obs, option, bps):
            return Decision(chunk, TEXT, predicted_bps=bps)
        if obs.link_idle:
            return Decision(chunk, level, predicted_bps=bps)
        return None
