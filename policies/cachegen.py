"""`cachegen`: CacheGen's published adaptation controller (SIGCOMM 2024, section 5.3 as published).

Before each chunk (in chunk order, when the link is free) it estimates the throughput from the previous
chunk(s) and picks the highest-quality level that lets *all remaining* chunks, sent at that level, finish
within the *remaining* SLO; if even the most compressed level cannot, the chunk is recomputed from text.
The first chunk uses the session's historical throughput (`Session.prior_throughput_bps`).

Predicted finish time at level ``l`` (``P`` = undecided chunks, ``tput`` = estimate, ``rtt`` = link RTT)::

    now + sum_{j in P} (rtt + bytes_j(l) * 8 / tput) + decode_s of the last chunk  <=  SLO

Levels. To stay faithful, by default it only uses CacheGen's own levels (`CACHEGEN_LEVELS`: ``cachegen-3``,
``-2``, ``-1``) among those on the menu, and text: CacheGen's code tries its levels 3, 2, 1 and never the
uncompressed KV (``reference/streaming-and-policies.md`` section 1.2), so ``raw`` is not tried; the other
levels a simulation offers (``raw``, ``int8``, ``cachegen-delta-*``, ``kvcast-*``) are not CacheGen's. On
CacheGen's menu (``kvcast simulate --levels cachegen``: exactly those three levels) every controller then
chooses among the same levels. "Highest quality" means the least quality loss (the menu's order is not
monotone in quality or size); "most compressed" the fewest bytes. A menu with none of ``cachegen-1..3`` (a
custom profile, or ``kvcast simulate --levels kvcast``) is not CacheGen's: then the rule runs on the menu's
own levels, i.e. CacheGen's controller with another codec. ``levels=menu`` asks for that on any menu.

Arguments: ``cachegen:<window>`` or ``cachegen:window=<n>+levels=<cachegen|menu>``. `window` takes the
harmonic mean of the last `window` chunks' throughputs (default 1, the previous chunk). Throughput samples
leave out the RTT (it is added per chunk above). See `kvcast.policies.cachegen_code` for the variant in
CacheGen's public code.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvcast.policies.base import (
    TEXT,
    ChunkMenu,
    Decision,
    Observation,
    Policy,
    Session,
    ThroughputSample,
    by_quality,
    level_names,
    smallest,
)

CACHEGEN_LEVELS = ("cachegen-3", "cachegen-2", "cachegen-1")
"""The levels CacheGen's controllers choose from: its three encoding levels, tried 3 -> 2 -> 1 in its code (the
uncompressed KV is never tried)."""


def cachegen_levels(menus: Sequence[ChunkMenu], mode: str = "cachegen") -> tuple[str, ...]:
    """The levels a CacheGen controller tries, best quality (least loss) first: with ``mode="cachegen"`` the
    menu's levels of `CACHEGEN_LEVELS` (the whole menu if it has none of ``cachegen-1..3``); with ``"menu"``
    every level of the menu."""
    if mode not in ("cachegen", "menu"):
        raise ValueError(f"levels must be 'cachegen' or 'menu', got {mode!r}")
    names = level_names(menus)
    if mode == "cachegen":
        own = tuple(n for n in names if n in CACHEGEN_LEVELS)
        if own:
            names = own
    return by_quality(menus, names)


def payload_throughput_bps(sample: ThroughputSample, rtt_s: float) -> float:
    """A transfer's throughput with the request's RTT taken out (bits/s)."""
    return sample.payload_bps(rtt_s)


class CacheGenPolicy(Policy):
    """CacheGen's published controller: highest level whose predicted remaining time fits, else text."""

    name = "cachegen"

    def __init__(self, window: str | int = 1, *, levels: str = "cachegen") -> None:
        if isinstance(window, str) and "=" in window:
            options, window = window, 1
            for part in options.split("+"):
                key, _, value = part.partition("=")
                if key == "window":
                    window = value
                elif key == "levels":
                    levels = value
                else:
                    raise ValueError(f"cachegen: unknown option {key!r}; known: window, levels")
        try:
            self.window = int(window)
        except ValueError:
            raise ValueError(f"cachegen:<window> needs an integer window, got {window!r}") from None
        if self.window < 1:
            raise ValueError(f"cachegen window must be >= 1, got {self.window}")
        if levels not in ("cachegen", "menu"):
            raise ValueError(f"cachegen: levels must be 'cachegen' or 'menu', got {levels!r}")
        self.levels_mode = levels

    def reset(self, session: Session) -> None:
        super().reset(session)
        self.rtt_s = session.rtt_s
        menus = session.menus
        n = len(menus)
        self.tried = cachegen_levels(menus, self.levels_mode)
        """The levels this session tries, best quality first."""
        # suffix_bits[k][i]: bits of chunks i..n-1 at level tried[k] (the remaining chunks, as decisions go
        # in order)
        self.suffix_bits = []
        for name in self.tried:
            acc = [0.0] * (n + 1)
            for i in range(n - 1, -1, -1):
                acc[i] = acc[i + 1] + menus[i].option(name).nbytes * 8.0
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
        if tput is None:  # no history at all: the most compressed level
            return Decision(chunk, smallest(menus, chunk, self.tried))
        if tput <= 0.0:
            return Decision(chunk, TEXT, predicted_bps=tput)
        budget = obs.remaining_s
        last = menus[obs.pending[-1]]
        rtts = self.rtt_s * len(obs.pending)
        pending = obs.pending
        suffix = pending[-1] == len(menus) - 1 and pending[-1] - pending[0] + 1 == len(pending)
        for k, name in enumerate(self.tried):
            if suffix:
                bits = self.suffix_bits[k][chunk]
            else:
                bits = sum(menus[j].option(name).nbytes for j in pending) * 8.0
            if rtts + bits / tput + last.option(name).decode_s <= budget:
                return Decision(chunk, name, predicted_bps=tput)
        return Decision(chunk, TEXT, predicted_bps=tput)
