"""`cachegen-code`: the adaptation in CacheGen's public code (UChi-JCL/CacheGen ``run_adaptation.py``,
``config_selection``), labelled as such; not the published controller (that is `cachegen`).

Faithful to the artifact's decision rule (see ``reference/streaming-and-policies.md`` section 1.2):

* **oracle bandwidth**: the bandwidth at the moment the chunk is sent is read from the trace
  (``needs_future``; only a simulated link can run it);
* **static budget**: each chunk may take ``SLO / num_chunks`` seconds, with no carry-over of slack;
* levels tried best-first (least quality loss first; the menu's order is not monotone in quality); the
  first whose predicted time is below the budget wins; if none, the chunk is recomputed from text.

What the artifact charges, and what kvcast charges. The artifact's predicted time of a chunk is its transfer
alone, ``bytes * 8 / bandwidth``: **no RTT**, no decode time, no payload overhead; a text chunk costs a fixed
0.2 s (`ARTIFACT_TEXT_COST_S`), whatever its length or position; the session's TTFT is the sum of those
per-chunk times. kvcast's engine instead charges one RTT per request (and the real decode and recompute
costs), so a budget without the RTT admits levels that overrun it: with a 10 ms RTT and a 0.6 s SLO over ten
chunks, a tenth of every chunk's 60 ms budget goes to the round trip the rule ignores. To be fair to CacheGen,
kvcast's version therefore charges the link's RTT in the rule by default (``rtt + bytes * 8 / bandwidth <
SLO / num_chunks``, option ``rtt=on``); ``rtt=off`` is the artifact's exact rule (its decisions, kvcast's
timing). The fixed 0.2 s text cost is not used: the engine runs the real recompute cost model, so the
decisions are the artifact's and the timing is kvcast's.

Levels: by default CacheGen's own levels on the menu (`kvcast.policies.cachegen.CACHEGEN_LEVELS`:
``cachegen-3``, ``-2``, ``-1``, which the artifact tries 3, 2, 1; it never tries the uncompressed KV), or the
whole menu if it has none of ``cachegen-1..3`` (see `kvcast.policies.cachegen`).

Arguments, ``+``-separated: level names (``cachegen-code:cachegen-3+cachegen-2`` tries only those), ``menu``
(every level of the menu) and ``rtt=on|off``; e.g. ``cachegen-code:rtt=off`` for the artifact's rule.
"""

from __future__ import annotations

from kvcast.policies.base import TEXT, Decision, Observation, Policy, Session, by_quality, level_names
from kvcast.policies.cachegen import cachegen_levels

ARTIFACT_TEXT_COST_S = 0.2
"""Recompute cost per text chunk assumed by the artifact (``chunk_delay``); informative only here."""


class CacheGenCodePolicy(Policy):
    """CacheGen's artifact controller: oracle per-chunk bandwidth, static SLO/num_chunks budget (RTT charged
    unless ``rtt=off``)."""

    name = "cachegen-code"
    needs_future = True

    def __init__(self, options: str | None = None, *, charge_rtt: bool = True) -> None:
        only: list[str] = []
        for part in (options.split("+") if options else ()):
            key, sep, value = part.partition("=")
            if not sep:
                only.append(part)
            elif key == "rtt" and value in ("on", "off"):
                charge_rtt = value == "on"
            else:
                raise ValueError(f"cachegen-code: unknown option {part!r}; expected level names, 'menu' or "
                                 f"rtt=on|off")
        self.only = tuple(only) or None
        self.charge_rtt = charge_rtt
        """Whether the per-chunk budget check includes the link's RTT (the artifact's own rule does not)."""

    def reset(self, session: Session) -> None:
        super().reset(session)
        if session.future_bandwidth_bps is None:
            raise ValueError("cachegen-code reads the bandwidth from the trace: it needs a simulated link")
        self.budget_s = session.slo_s / len(session.menus)
        self.rtt_s = session.rtt_s if self.charge_rtt else 0.0
        names = level_names(session.menus)
        if self.only is None:
            self.tried = cachegen_levels(session.menus, "cachegen")
        elif self.only == ("menu",):
            self.tried = cachegen_levels(session.menus, "menu")
        else:
            missing = [name for name in self.only if name not in names]
            if missing:
                raise ValueError(f"cachegen-code: levels {missing} are not on the menu {list(names)}")
            self.tried = by_quality(session.menus, [name for name in names if name in self.only])

    def decide(self, obs: Observation) -> Decision | None:
        if not obs.link_idle:
            return None
        chunk = obs.pending[0]
        bandwidth = self.session.future_bandwidth_bps(obs.now_s)
        menu = obs.menus[chunk]
        if bandwidth > 0.0:
            budget = self.budget_s - self.rtt_s
            for level in self.tried:
                if menu.option(level).nbytes * 8.0 / bandwidth < budget:
                    return Decision(chunk, level, predicted_bps=bandwidth)
        return Decision(chunk, TEXT, predicted_bps=bandwidth)
