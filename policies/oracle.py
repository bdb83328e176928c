"""``oracle``: knows the link's future and plans the best session; the bound for every other policy.

Objective (`kvcast.policies.planning.objective`), lexicographic (smaller is better), one of two:

* ``oracle`` (``objective=slo``, the default): **SLO overrun** ``max(0, TTFT - SLO)`` first, then the
  session's **quality loss** (token-weighted mean; text is lossless), then TTFT. So the oracle has the lowest
  SLO-violation rate any plan of its families can reach, and among the plans with that overrun the best
  quality: it bounds the others on violations, and on quality at equal violations. (A policy that violates
  more can have less quality loss; the Pareto plot shows both.)
* ``oracle:objective=ttft+quality_budget=B`` and/or ``+level_floor=X``: the least **TTFT** among the plans
  whose session mean loss is at most ``B`` and that load no level worse than ``X``, ties broken by quality
  loss; if no plan meets ``B`` (only possible after loss already committed), the plan of least loss. So it
  bounds every policy's TTFT at that quality budget. Without ``B`` and ``X``: the least TTFT at any quality.

Plan families. `best_plan` is the best of two exact searches (`kvcast.policies.planning.families`, which
describes them), each played on the planning model (`kvcast.policies.planning.model`) with the link's exact
future (`Session.future_transfer_end_s`):

* **in order** (`kvcast.policies.planning.plan_in_order`): every undecided chunk, in index order, a codec
  level or text. This holds every plan of ``mpc``, ``cachegen``, ``fixed``, ``raw`` and ``text``.
* **Cake** (`kvcast.policies.planning.plan_cake`): a text prefix computed from the front while the rest is
  loaded from the back, each loaded chunk at its own level. This holds every plan of ``hybrid``.

*Exact* means, under either objective: the plan's key is the least key of every plan in the union of the
two families, played on the planning model with the link's exact future (the searches drop a partial plan
only when another is at least as good in every component of the model's state, or when a lower bound on its
completions is no better than the incumbent; both keys are monotone in that state). Ties between the
families go to Cake. Plans outside both families (for example loads in an arbitrary order) are not searched.

The plan is made at the first decision; it is followed decision by decision and made again from the
current state if a transfer ends at another time than planned (only a model mismatch can cause that).
"""

from __future__ import annotations

from typing import ClassVar

from kvcast.policies.base import TEXT, Decision, Observation, Policy, Session
from kvcast.policies.planning import (
    SLO_FIRST,
    FamilyPlan,
    KnownFuture,
    Objective,
    PlanState,
    TransferModel,
    parse_planner_options,
    plan_cake,
    plan_in_order,
)

__all__ = ["OraclePlan", "OraclePolicy", "best_plan"]

OraclePlan = FamilyPlan
"""The oracle's plan, a `kvcast.policies.planning.FamilyPlan` (its name when the searches lived here)."""


def best_plan(state: PlanState, transfer: TransferModel, slo_s: float,
              objective: Objective = SLO_FIRST) -> FamilyPlan:
    """The best plan of both families for `objective` (Cake first: its optimum prunes the in-order
    search)."""
    state = state.resolved()
    cake = plan_cake(state, transfer, slo_s, objective=objective)
    assert cake is not None  # the all-text plan always exists
    in_order = plan_in_order(state, transfer, slo_s, cake.key, objective=objective)
    return in_order if in_order is not None and in_order.key < cake.key else cake


class OraclePolicy(Policy):
    """Plans with the link's future (`Session.future_transfer_end_s`); see the module docstring.

    Spec ``oracle`` or ``oracle:key=value+...`` with keys ``objective`` (``slo``, the default, or ``ttft``),
    ``quality_budget`` and ``level_floor`` (`kvcast.policies.planning.objective`).
    """

    name = "oracle"
    needs_future = True
    supports_objective: ClassVar[bool] = True
    """Takes ``objective=...`` spec arguments (``kvcast simulate --objective`` adds them)."""

    def __init__(self, options: str | None = None, *, objective: Objective | None = None) -> None:
        parsed, _ = parse_planner_options(options, {}, "oracle")
        self.objective = objective if objective is not None else parsed

    def reset(self, session: Session) -> None:
        super().reset(session)
        self.objective.check_menus(session.menus, "oracle")
        if session.future_transfer_end_s is None:
            raise ValueError("oracle needs the link's future (Session.future_transfer_end_s); only simulated "
                             "links can tell it")
        self._transfer = KnownFuture(session.future_transfer_end_s)
        self.plan: FamilyPlan | None = None
        self.replans = 0
        """How many times the plan was made again after a deviation (0 when the model matches the link)."""
        self._actions: dict[int, str] = {}
        self._loads: list[int] = []
        self._planned_end: dict[int, float] = {}
        self._checked = 0
        self._link_order: list[int] = []
        self._decided_at: dict[int, float] = {}

    def _replan(self, obs: Observation) -> None:
        if self.plan is None and not obs.samples and all(a is None for a in obs.actions):
            state = PlanState.initial(self.session, obs.now_s)
        else:
            state = PlanState.from_observation(obs, self._transfer, self._link_order, self._decided_at)
        plan = best_plan(state, self._transfer, self.session.slo_s, self.objective)
        if self.plan is not None:
            self.replans += 1
        self.plan = plan
        self._actions = dict(plan.actions)
        self._loads = [c for c in plan.load_order]
        self._planned_end = dict(plan.transfer_end_s)

    def _deviated(self, obs: Observation) -> bool:
        samples = obs.samples
        for s in samples[self._checked:]:
            planned = self._planned_end.get(s.chunk)
            if planned is None or abs(s.end_s - planned) > 1e-9 * max(1.0, abs(planned)) + 1e-9:
                self._checked = len(samples)
                return True
        self._checked = len(samples)
        return False

    def decide(self, obs: Observation) -> Decision | None:
        if not obs.pending:
            return None
        if self.plan is None or self._deviated(obs):
            self._replan(obs)
        pending = set(obs.pending)
        if obs.link_idle:
            while self._loads and self._loads[0] not in pending:
                self._loads.pop(0)
            if self._loads:
                chunk = self._loads.pop(0)
                self._link_order.append(chunk)
                self._decided_at[chunk] = obs.now_s
                return Decision(chunk, self._actions[chunk])
        if obs.compute_idle:
            # The lowest planned text chunk, once every chunk below it is decided (it could not start
            # earlier anyway: it waits for them to be ready).
            for chunk in obs.pending:
                if self._actions.get(chunk) == TEXT:
                    if all(a is not None for a in obs.actions[:chunk]):
                        return Decision(chunk, TEXT)
                    break
        return None
