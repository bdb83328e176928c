"""`cachegen-code`: the adaptation in CacheGen's public code (UChi-JCL/CacheGen ``run_adaptation.py``,
``config_selection``), labelled as such; not the published controller (that is `cachegen`).

Faithful to the artifact's decision rule (see ``reference/streaming-and-policies.md`` section 1.2):

* **oracle bandwidth**: the bandwidth at the moment the chunk is sent is read from the trace
  (``needs_future``; only a simulated link can run it);
* **static budget**: each chunk may take ``SLO / num_chunks`` seconds, with no carry-over of slack;
* levels tried best-first (least quality loss first; the menu's order is not monotone in quality); the
  first whose transfer time ``bytes * 8 / bandwidth`` (no RTT) is below the budget wins; if none, the chunk
  is recomputed from text. The artifact then charges a fixed 0.2 s per text chunk (`ARTIFACT_TEXT_COST_S`);
  kvcast's engine runs the real recompute cost model instead, so the decisions are the artifact's and the
  timing is kvcast's.

Levels: by default CacheGen's own levels on the menu (`kvcast.policies.cachegen.CACHEGEN_LEVELS`: ``raw`` and
``cachegen-3``, ``-2``, ``-1``; the artifact tries its three levels 3, 2, 1, and ``raw`` never fits the
budget at these sizes), or the whole menu if it has none of ``cachegen-1..3`` (see
`kvcast.policies.cachegen`). Argument: ``cachegen-code:<level>+<level>+...`` tries only the listed levels;
``cachegen-code:menu`` every level of the menu.
"""

from __future__ import annotations

from kvcast.policies.base import TEXT, Decision, Observation, Policy, Session, by_quality, level_names
from kvcast.policies.cachegen import cachegen_levels

ARTIFACT_TEXT_COST_S = 0.2
"""Recompute cost per text chunk assumed by the artifact (``chunk_delay``); informative only here."""


class CacheGenCodePolicy(Policy):
    """CacheGen's artifact controller: oracle per-chunk bandwidth, static SLO/num_chunks budget."""

    name = "cachegen-code"
    needs_future = True

    def __init__(self, levels: str | None = None) -> None:
        self.only = tuple(levels.split("+")) if levels else None

    def reset(self, session: Session) -> None:
        super().reset(session)
        if session.future_bandwidth_bps is None:
            raise ValueError("cachegen-code reads the bandwidth from the trace: it needs a simulated link")
        self.budget_s = session.slo_s / len(session.menus)
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
            for level in self.tried:
                if menu.option(level).nbytes * 8.0 / bandwidth < self.budget_s:
                    return Decision(chunk, level, predicted_bps=bandwidth)
        return Decision(chunk, TEXT, predicted_bps=bandwidth)
