"""`rate`: the classic rate-based (throughput) ABR rule, adapted to a TTFT deadline.

Source (``reference/streaming-and-policies.md`` section 3.2): Pensieve's RB controller (dash.js, case 3) takes
the highest bitrate not above ``p x`` the estimated throughput, ``p = 1.0``; sabre's ThroughputRule and
dash.js use a safety factor ``p = 0.9`` and ask that a segment's download (latency plus bytes at ``p x`` the
estimate) fit in the segment's duration. The estimate is the harmonic mean of the last 5 chunks'
throughputs (Pensieve RB's is weighted by download time; sabre's a minimum of two EWMAs).

Adapted to a deadline. A KV chunk has no playback duration; its time budget is its share of what is left:
``(SLO - t) / m``, with ``t`` when the link is free and ``m`` the chunks still undecided. The level is the
highest-quality one (least loss) whose transfer fits its share::

    rtt + bytes(l) * 8 / (p * tput) + decode_s(l)  <=  (SLO - t) / m

and the most compressed one if none fits. The throughput samples leave out the RTT (it is charged per request
above). Then the frame of `kvcast.policies.inorder` adds the GPU: the chunk is recomputed from text instead
where that makes it ready sooner. Every level of the menu is tried (the same menu as every other
controller), best quality first, among the levels no other level dominates.

Arguments: ``rate:<safety>`` or ``rate:safety=<p>+window=<n>`` (defaults 0.9 and 5).
"""

from __future__ import annotations

from kvcast.policies.base import Observation, Session, by_quality, smallest, undominated_levels
from kvcast.policies.inorder import InOrderPolicy
from kvcast.policies.planning.options import parse_options

__all__ = ["RatePolicy"]


class RatePolicy(InOrderPolicy):
    """Highest level whose transfer at ``safety x`` the throughput fits the chunk's share of the time left."""

    name = "rate"

    def __init__(self, options: str | None = None) -> None:
        opts = parse_options(options, {"safety": 0.9, "window": 5}, "rate")
        self.safety, self.window = opts["safety"], int(opts["window"])
        if not 0 < self.safety <= 1 or self.window < 1 or self.window != opts["window"]:
            raise ValueError(f"rate: safety must be in (0, 1] and window an integer >= 1, got {opts}")

    def reset(self, session: Session) -> None:
        super().reset(session)
        self.tried = by_quality(session.menus, undominated_levels(session.menus))
        """The levels tried, best quality first."""

    def estimate_bps(self, obs: Observation) -> float | None:
        """``safety x`` the harmonic mean of the last `window` payload throughputs (the prior before any)."""
        recent = obs.samples[-self.window:]
        if not recent:
            prior = self.session.prior_throughput_bps
            return None if prior is None else self.safety * prior
        rates = [s.payload_bps(self.rtt_s) for s in recent]
        if min(rates) <= 0.0:
            return 0.0
        return self.safety * len(rates) / sum(1.0 / r for r in rates)

    def level_for(self, obs: Observation, chunk: int, bps: float) -> str:
        share = (obs.slo_s - max(obs.now_s, obs.link_busy_until_s)) / len(obs.pending)
        menu = obs.menus[chunk]
        for level in self.tried:
            option = menu.option(level)
            if self.rtt_s + option.nbytes * 8.0 / bps + option.decode_s <= share:
                return level
        return smallest(obs.menus, chunk, self.tried)
