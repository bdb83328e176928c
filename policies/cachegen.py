"""`cachegen`: CacheGen's published adaptation controller (SIGCOMM 2024, section 5.3 as published).

Before each chunk (in chunk order, when the link is free) it estimates the throughput from the previous
chunk(s) and picks the highest-quality level that lets *all remaining* chunks, sent at that level, finish
within the *remaining* SLO; if even the most compressed level cannot, the chunk is recomputed from text.
The first chunk uses the session's historical throughput (`Session.prior_throughput_bps`).

Predicted finish time at level ``l`` (``P`` = undecided chunks, ``tput`` = estimate, ``rtt`` = link RTT)::

    now + sum_{j in P} (rtt + bytes_j(l) * 8 / tput) + decode_s of the last chunk  <=  SLO

Argument: ``cachegen:<window>`` uses the harmonic mean of the last `window` chunks' throughputs (default 1,
the previous chunk). Throughput samples leave out the RTT (it is added per chunk above).
See `policies.cachegen_code` for the variant in CacheGen's public code.
"""

from __future__ import annotations

from policies.base import TEXT, Decision, Observation, Policy, Session, ThroughputSample


def payload_throughput_bps(sample: ThroughputSample, rtt_s: float) -> float:
    """A transfer's throughput with the request's RTT taken out (bits/s)."""
    duration = sample.end_s - sample.start_s
    return sample.nbytes * 8.0 / max(duration - rtt_s, 1e-3 * duration, 1e-12)


class CacheGenPolicy(Policy):
    """CacheGen's published controller: highest level whose predicted remaining time fits, else text."""

    name = "cachegen"

    def __init__(self, window: str | int = 1) -> None:
        try:
            self.window = int(window)
        except ValueError:
            raise ValueError(f"cachegen:<window> needs an integer window, got {window!r}") from None
        if self.window < 1:
            raise ValueError(f"cachegen window must be >= 1, got {self.window}")

    def reset(self, session: Session) -> None:
        super().reset(session)
        self.rtt_s = session.rtt_s
        menus = session.menus
        n = len(menus)
        # suffix_bits[k][i]: bits of chunks i..n-1 at level k (the remaining chunks, as decisions go in order)
        self.suffix_bits = []
        for k in range(len(menus[0].levels)):
            acc = [0.0] * (n + 1)
            for i in range(n - 1, -1, -1):
                acc[i] = acc[i + 1] + menus[i].levels[k].nbytes * 8.0
            self.suffix_bits.append(acc)

    def estimate_bps(self, obs: Observation) -> float | None:
        """Harmonic mean of the last `window` throughputs, or the prior before the first transfer."""
        recent = obs.samples[-self.window:]
        if not recent:
            return self.session.prior_throughput_bps
        rates = [payload_throughput_bps(s, self.rtt_s) for s in recent]
        if min(rates) <= 0.0:
            return 0.0
        return len(rates) / sum(1.0 / r for r in rates)

    def decide(self, obs: Observation) -> Decision | None:
        if not obs.link_idle:
            return None
        chunk = obs.pending[0]
        menus = obs.menus
        tput = self.estimate_bps(obs)
        first = menus[chunk]
        if tput is None:  # no history at all: the most compressed level
            return Decision(chunk, first.levels[-1].level)
        if tput <= 0.0:
            return Decision(chunk, TEXT, predicted_bps=tput)
        budget = obs.remaining_s
        last = menus[obs.pending[-1]]
        rtts = self.rtt_s * len(obs.pending)
        pending = obs.pending
        suffix = pending[-1] == len(menus) - 1 and pending[-1] - pending[0] + 1 == len(pending)
        for k, option in enumerate(first.levels):
            if suffix:
                bits = self.suffix_bits[k][chunk]
            else:
                bits = sum(menus[j].levels[k].nbytes for j in pending) * 8.0
            if rtts + bits / tput + last.levels[k].decode_s <= budget:
                return Decision(chunk, option.level, predicted_bps=tput)
        return Decision(chunk, TEXT, predicted_bps=tput)
