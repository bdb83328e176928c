"""What the planners optimise: SLO first (the default), or the least TTFT within a quality budget.

Two objectives, selected per policy with the spec arguments ``objective``, ``quality_budget`` and
``level_floor`` (`parse_planner_options`), for example ``mpc:objective=ttft+quality_budget=0.01`` or
``oracle:objective=ttft+level_floor=kvcast-3``:

* ``objective=slo`` (the default): meet the SLO first, then the least quality loss, then the least TTFT
  (each planner states how it weighs the first two; ``oracle`` and ``hybrid`` order them lexicographically,
  ``mpc`` with RobustMPC's linear cost).
* ``objective=ttft``: the least **TTFT** (predicted finish of the last chunk) among the plans within the
  quality budget, ties broken by the least quality loss; the SLO plays no part in the choice (it is still
  reported). The budget is one or both of

  - ``quality_budget=B``: the session's token-weighted mean quality loss (the profile's metric, mean KL per
    token for the shipped profile) at most ``B``, decided chunks included;
  - ``level_floor=X``: no chunk loaded at a level whose quality loss on that chunk exceeds that of level
    ``X`` (``X`` must be on every chunk's menu; text is always allowed).

  Without either, the TTFT is minimised whatever the loss. A plan that loads a level below the floor is
  not a plan at all; a plan over ``quality_budget`` is only chosen when no plan meets it: then the plan of
  least quality loss wins (ties: least TTFT). Recomputing from text is lossless
  (`kvcast.policies.planning.model.TEXT_QUALITY_LOSS`), so the all-text plan always meets the budget from a
  session's start; online, only loss already committed (for example a decision made on a prediction that
  turned out wrong) can leave no plan within it.

As a key compared lexicographically (smaller is better; `Objective.key`)::

    objective=slo:  (max(0, TTFT - SLO), Q, TTFT)
    objective=ttft: (max(0, Q - B),      TTFT, Q)

where ``Q`` is the session's token-weighted mean loss. Both keys are non-decreasing in every component of the
planning model's state (link free, decoder free, prefix ready, accumulated loss), which is what keeps the
planners' searches exact under either objective.

>>> objective, rest = parse_planner_options("objective=ttft+quality_budget=0.01+margin=0.1",
...                                         {"margin": 0.05}, "hybrid")
>>> objective.kind, objective.quality_budget, rest
('ttft', 0.01, {'margin': 0.1})
>>> objective.key(ttft_s=0.4, quality=0.02, slo_s=0.6)
(0.01, 0.4, 0.02)
>>> parse_planner_options("quality_budget=0.01", {}, "oracle")  # doctest: +ELLIPSIS
Traceback (most recent call last):
ValueError: oracle: quality_budget and level_floor bound objective=ttft; ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvcast.policies.base import TEXT, ChunkMenu, LevelOption, Observation, smallest
from kvcast.policies.planning.options import parse_options

__all__ = ["OBJECTIVE_KEYS", "OBJECTIVES", "SLO_FIRST", "Objective", "parse_planner_options", "probe_level"]

OBJECTIVES = ("slo", "ttft")
"""The objective names: ``slo`` (SLO first, then quality; the default) and ``ttft`` (least TTFT within a
quality budget)."""
OBJECTIVE_KEYS = ("objective", "quality_budget", "level_floor")
"""The spec-argument keys that select the objective, shared by ``mpc``, ``hybrid`` and ``oracle``."""


@dataclass(frozen=True, slots=True)
class Objective:
    """A planner's objective; see the module docstring. The default is SLO first."""

    kind: str = "slo"
    """``"slo"`` or ``"ttft"``."""
    quality_budget: float = math.inf
    """``objective=ttft``: the largest token-weighted mean quality loss of the session (``inf``: none)."""
    level_floor: str | None = None
    """``objective=ttft``: no loaded chunk may lose more quality than this level does on it (None: none)."""

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.kind!r}")
        if not self.quality_budget >= 0:
            raise ValueError(f"quality_budget must be >= 0, got {self.quality_budget}")
        if self.kind == "slo" and (self.quality_budget != math.inf or self.level_floor is not None):
            raise ValueError("quality_budget and level_floor bound objective=ttft")
        if self.level_floor is not None and not self.level_floor:
            raise ValueError("level_floor must name a level")

    @property
    def ttft_first(self) -> bool:
        """True for ``objective=ttft``."""
        return self.kind == "ttft"

    def excess(self, quality: float) -> float:
        """How far the mean loss `quality` lies over the budget (0 within it)."""
        over = quality - self.quality_budget
        return over if over > 0.0 else 0.0

    def key(self, ttft_s: float, quality: float, slo_s: float) -> tuple[float, float, float]:
        """The objective of a plan with this TTFT and session mean loss, compared lexicographically."""
        if self.kind == "ttft":
            return (self.excess(quality), ttft_s, quality)
        over = ttft_s - slo_s
        return (over if over > 0.0 else 0.0, quality, ttft_s)

    def check_menus(self, menus: Sequence[ChunkMenu], policy: str) -> None:
        """ValueError naming `policy` when the level floor is not on every chunk's menu."""
        floor = self.level_floor
        if floor is None:
            return
        for menu in menus:
            if all(o.level != floor for o in menu.levels):
                raise ValueError(f"{policy}: level_floor {floor!r} is not on the menu of chunk {menu.index}; "
                                 f"its levels: {', '.join(o.level for o in menu.levels)}")

    def allows(self, menu: ChunkMenu, option: LevelOption) -> bool:
        """May a plan load `menu`'s chunk at `option` (not worse than the level floor on this chunk)?"""
        floor = self.level_floor
        if floor is None:
            return True
        return option.quality_loss <= menu.option(floor).quality_loss

    def spec_argument(self) -> str:
        """This objective as spec-argument pairs (empty for the default), e.g.
        ``objective=ttft+quality_budget=0.01``."""
        if self.kind == "slo":
            return ""
        parts = ["objective=ttft"]
        if self.quality_budget != math.inf:
            parts.append(f"quality_budget={self.quality_budget!r}")
        if self.level_floor is not None:
            parts.append(f"level_floor={self.level_floor}")
        return "+".join(parts)


SLO_FIRST = Objective()
"""The default objective: SLO first, then quality, then TTFT."""


def parse_planner_options(spec_argument: str | None, defaults: Mapping[str, float], policy: str
                          ) -> tuple[Objective, dict[str, float]]:
    """A planner's spec argument: the objective (keys `OBJECTIVE_KEYS`) and its numeric options
    (`kvcast.policies.planning.options.parse_options` with `defaults`; a bare number sets the first one,
    and only as the first part). ValueError naming `policy` for anything it cannot read."""
    if not spec_argument:
        return SLO_FIRST, dict(defaults)
    found: dict[str, str] = {}
    rest: list[str] = []
    known = ", ".join([*defaults, *OBJECTIVE_KEYS])
    for i, part in enumerate(spec_argument.split("+")):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep:
            if i or not defaults:
                raise ValueError(f"{policy}: expected key=value in {spec_argument!r}; keys: {known}")
            rest.append(part)
        elif key in OBJECTIVE_KEYS:
            found[key] = value.strip()
        elif key not in defaults:
            raise ValueError(f"{policy}: unknown option {key!r}; known: {known}")
        else:
            rest.append(part)
    options = parse_options("+".join(rest), defaults, policy)
    kind = found.get("objective", "slo")
    if kind not in OBJECTIVES:
        raise ValueError(f"{policy}: objective must be one of {', '.join(OBJECTIVES)}, got {kind!r}")
    budget = math.inf
    if "quality_budget" in found:
        text = found["quality_budget"]
        try:
            budget = float(text)
        except ValueError:
            raise ValueError(f"{policy}: option quality_budget={text!r} is not a number") from None
        if not (budget >= 0 and math.isfinite(budget)):
            raise ValueError(f"{policy}: quality_budget must be a finite number >= 0 (the session's mean "
                             f"quality loss per token), got {text!r}")
    floor = found.get("level_floor")
    if floor is not None and not floor:
        raise ValueError(f"{policy}: level_floor must name a level, e.g. level_floor=kvcast-3")
    if kind == "slo" and ("quality_budget" in found or floor is not None):
        raise ValueError(f"{policy}: quality_budget and level_floor bound objective=ttft; add it, e.g. "
                         f"{policy}:objective=ttft+quality_budget=0.01")
    return Objective(kind, budget, floor), options


def probe_level(obs: Observation, chunk: int, objective: Objective,
                names: Sequence[str] | None = None) -> str | None:
    """The level a planner probes the link with before it has any throughput estimate: the smallest of
    `names` (default: every level) on `chunk`'s menu (`kvcast.policies.base.smallest`); under
    ``objective=ttft`` the smallest that the level floor allows and that keeps the session's mean loss, with
    the decided chunks' loss, within the budget. None when no level qualifies (the planner then recomputes)."""
    menus = obs.menus
    if not objective.ttft_first:
        return smallest(menus, chunk, names)
    menu = menus[chunk]
    total = float(sum(m.tokens for m in menus)) or 1.0
    committed = 0.0
    for m, action in zip(menus, obs.actions):
        if action is not None and action != TEXT:
            committed += m.tokens * m.option(action).quality_loss
    candidates = [o.level for o in menu.levels if (names is None or o.level in names)
                  and objective.allows(menu, o)
                  and (committed + menu.tokens * o.quality_loss) / total <= objective.quality_budget]
    return smallest(menus, chunk, candidates) if candidates else None
