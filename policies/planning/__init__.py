"""What the planning controllers (``mpc``, ``hybrid``, ``oracle``) share; no controller imports another.

* `kvcast.policies.planning.model`: a pure, fast model of the execution model in `kvcast.policies.base`
  (`PlanState`, `simulate_plan` with a `TransferModel`: `ConstantThroughput` or `KnownFuture`), and the
  session's quality loss.
* `kvcast.policies.planning.families`: exact searches for the best plan of two families on that model,
  `plan_in_order` (every chunk in index order) and `plan_cake` (Cake: text from the front, loads from the
  back), for either objective. ``oracle`` runs both with the link's future, ``hybrid`` runs `plan_cake`
  with a predicted throughput.
* `kvcast.policies.planning.objective`: the two objectives (`Objective`: SLO first, then quality; or the
  least TTFT within a quality budget) and `parse_planner_options`, which reads them from a spec argument.
* `kvcast.policies.planning.options`: `parse_options` (``key=value+...`` spec arguments) and
  `DEFAULT_SLO_MARGIN`.

Every public name is importable from here.
"""

from __future__ import annotations

from kvcast.policies.planning.families import FamilyPlan, plan_cake, plan_in_order
from kvcast.policies.planning.model import (
    TEXT_QUALITY_LOSS,
    ConstantThroughput,
    KnownFuture,
    Plan,
    PlanResult,
    PlanState,
    TransferModel,
    action_quality_loss,
    in_order_plan,
    session_quality_loss,
    simulate_plan,
)
from kvcast.policies.planning.objective import (
    OBJECTIVE_KEYS,
    OBJECTIVES,
    SLO_FIRST,
    Objective,
    parse_planner_options,
    probe_level,
)
from kvcast.policies.planning.options import DEFAULT_SLO_MARGIN, parse_options

__all__ = ["DEFAULT_SLO_MARGIN", "OBJECTIVES", "OBJECTIVE_KEYS", "SLO_FIRST", "TEXT_QUALITY_LOSS",
           "ConstantThroughput", "FamilyPlan", "KnownFuture", "Objective", "Plan", "PlanResult", "PlanState",
           "TransferModel", "action_quality_loss", "in_order_plan", "parse_options", "parse_planner_options",
           "plan_cake", "plan_in_order", "probe_level", "session_quality_loss", "simulate_plan"]
