"""What the planning controllers (``mpc``, ``hybrid``, ``oracle``) share; no controller imports another.

* `kvcast.policies.planning.model`: a pure, fast model of the execution model in `kvcast.policies.base`
  (`PlanState`, `simulate_plan` with a `TransferModel`: `ConstantThroughput` or `KnownFuture`), and the
  session's quality loss.
* `kvcast.policies.planning.families`: exact searches for the best plan of two families on that model,
  `plan_in_order` (every chunk in index order) and `plan_cake` (Cake: text from the front, loads from the
  back), objective overrun, then quality loss, then TTFT. ``oracle`` runs both with the link's future,
  ``hybrid`` runs `plan_cake` with a predicted throughput.
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
from kvcast.policies.planning.options import DEFAULT_SLO_MARGIN, parse_options

__all__ = ["DEFAULT_SLO_MARGIN", "TEXT_QUALITY_LOSS", "ConstantThroughput", "FamilyPlan", "KnownFuture", "Plan",
           "PlanResult", "PlanState", "TransferModel", "action_quality_loss", "in_order_plan", "parse_options",
           "plan_cake", "plan_in_order", "session_quality_loss", "simulate_plan"]
