"""`slack`: a buffer-based rule in the spirit of BBA (and BOLA), adapted to a TTFT deadline.

Source (``reference/streaming-and-policies.md`` sections 3.3-3.4): BBA maps the playback buffer to a level
with a *reservoir* and a *cushion*: the lowest level while the buffer is below the reservoir, the highest once
it is above reservoir + cushion, in between linearly over the level *index* (Pensieve's ``bb.py``: reservoir
5 s, cushion 10 s, ``floor((A - 1) * (B - 5) / 10)`` of ``A`` levels; Puffer's LinearBBA likewise between
0.2 and 0.8 of the maximum buffer). No throughput rule picks the level: the buffer itself does, and it falls
when chunks come slowly.

Adapted to a deadline (section 0: buffer level <-> remaining SLO slack). The "buffer" is the slack: the time
left before the SLO less the predicted time of the remaining work at the most compressed level (every
undecided chunk over the link: one RTT and its smallest size at the estimated throughput each, plus a
decode). It is taken per remaining chunk, in units of a chunk's share of the SLO (``SLO / n``)::

    x = (SLO - t - W_min) / m  /  (SLO / n)

with ``t`` when the link is free, ``m`` the undecided chunks and ``n`` all chunks. Then BBA's map: the
smallest level while ``x <= reservoir``, the best once ``x >= reservoir + cushion``, in between level index
``floor((A - 1) * (x - reservoir) / cushion)`` of the ladder. The ladder is the menu's levels ordered by size
whose loss falls as the size grows (each bigger level strictly better: the levels a bitrate ladder would
hold), over every level of the menu (the same menu as every other controller). The throughput estimate is
the harmonic mean of the last 5 payload throughputs (the prior before any).

As in `rate`, the frame of `kvcast.policies.inorder` adds the GPU: a chunk is recomputed from text where that
makes it ready sooner.

Arguments: ``slack:reservoir=<r>+cushion=<c>+window=<n>`` (defaults 0.1, 0.9 and 5).
"""

from __future__ import annotations

import math

from kvcast.policies.base import Observation, Session, undominated_levels
from kvcast.policies.inorder import InOrderPolicy
from kvcast.policies.planning.options import parse_options

__all__ = ["SlackPolicy", "size_ladder"]


def size_ladder(menus, names) -> tuple[str, ...]:
    """`names` by size on chunk 0, smallest first, keeping each level only if its loss is below that of every
    smaller one (a monotone ladder: bigger means better)."""
    menu = menus[0]
    ladder: list[str] = []
    for name in sorted(names, key=lambda n: (menu.option(n).nbytes, menu.option(n).quality_loss)):
        if not ladder or menu.option(name).quality_loss < menu.option(ladder[-1]).quality_loss:
            ladder.append(name)
    return tuple(ladder)


class SlackPolicy(InOrderPolicy):
    """BBA's reservoir/cushion map from the SLO slack per remaining chunk to a level of the size ladder."""

    name = "slack"

    def __init__(self, options: str | None = None) -> None:
        opts = parse_options(options, {"reservoir": 0.1, "cushion": 0.9, "window": 5}, "slack")
        self.reservoir, self.cushion, self.window = opts["reservoir"], opts["cushion"], int(opts["window"])
        if not (self.reservoir >= 0 and self.cushion > 0) or self.window < 1 or self.window != opts["window"]:
            raise ValueError(f"slack: reservoir must be >= 0, cushion > 0 and window an integer >= 1, got {opts}")

    def reset(self, session: Session) -> None:
        super().reset(session)
        self.ladder = size_ladder(session.menus, undominated_levels(session.menus))
        """The levels, smallest (worst) first."""
        self.chunk_share_s = session.slo_s / len(session.menus)
        menus, low = session.menus, self.ladder[0]
        self._suffix_bits = [0.0] * (len(menus) + 1)  # bits of chunks i..n-1 at the smallest level
        for i in range(len(menus) - 1, -1, -1):
            self._suffix_bits[i] = self._suffix_bits[i + 1] + menus[i].option(low).nbytes * 8.0

    def estimate_bps(self, obs: Observation) -> float | None:
        """Harmonic mean of the last `window` payload throughputs (the prior before any)."""
        recent = obs.samples[-self.window:]
        if not recent:
            return self.session.prior_throughput_bps
        rates = [s.payload_bps(self.rtt_s) for s in recent]
        if min(rates) <= 0.0:
            return 0.0
        return len(rates) / sum(1.0 / r for r in rates)

    def slack_ratio(self, obs: Observation, bps: float) -> float:
        """``x``: the slack per remaining chunk over a chunk's share of the SLO (see the module docstring)."""
        menus, pending, low = obs.menus, obs.pending, self.ladder[0]
        if pending[-1] == len(menus) - 1 and pending[-1] - pending[0] + 1 == len(pending):  # a suffix
            bits = self._suffix_bits[pending[0]]
        else:
            bits = sum(menus[j].option(low).nbytes * 8.0 for j in pending)
        work = self.rtt_s * len(pending) + bits / bps + menus[pending[-1]].option(low).decode_s
        slack = obs.slo_s - max(obs.now_s, obs.link_busy_until_s) - work
        return slack / len(pending) / self.chunk_share_s

    def level_for(self, obs: Observation, chunk: int, bps: float) -> str:
        x = self.slack_ratio(obs, bps)
        top = len(self.ladder) - 1
        if x <= self.reservoir:
            return self.ladder[0]
        if x >= self.reservoir + self.cushion:
            return self.ladder[top]
        return self.ladder[min(top, math.floor(top * (x - self.reservoir) / self.cushion))]
