"""``hybrid``: Cake-style bidirectional compute and load (Jin et al., ICML 2025), with codec levels.

Cake recomputes the context from the front on the GPU while it loads the KV from the back, and the two meet
where their rates balance; the meeting point is not fixed in advance, both sides go on until they meet. This
controller keeps that shape and adds what Cake lacks:

* **Levels for the loaded part.** At every decision it plans the rest of the session over the Cake family
  (a text prefix of the undecided chunks, the others loaded from the back, each at its own level) with
  `kvcast.policies.planning.plan_cake` and the *predicted* throughput in place of the future: the plan with
  the least predicted SLO overrun, then the least quality loss (text is lossless, so it recomputes as much as
  the SLO allows and loads the rest at the best levels that still fit), then the earliest TTFT.
* **Adaptive meeting point.** It re-plans whenever the link or the compute unit runs dry, with the latest
  measurements (RobustMPC's predictor: harmonic mean of the last 5 throughputs over ``1 + max`` recent
  error, `kvcast.policies.estimate`). The link then loads the highest undecided chunk the plan loads; the
  compute unit recomputes the lowest undecided chunk if the plan still says text. If the link is slower than
  predicted, the text prefix grows; if faster, the loaded part grows; levels move with the prediction.
* **Any menu order.** The plan search (`plan_cake`) tries every undominated level of every loaded chunk;
  nothing assumes the menu is ordered by size or quality.
* **One resource when the other does not pay.** The plan may load everything (slow GPU) or recompute
  everything (slow link): Cake's reported losses come from always using both.

Objective (`kvcast.policies.planning.objective`). By default (``objective=slo``) the plan is the one of least
predicted SLO overrun, then least loss, then earliest TTFT, as above. With
``hybrid:objective=ttft+quality_budget=B`` (and/or ``level_floor=X``) it is the plan of least predicted TTFT
whose session mean loss is at most ``B`` (no level worse than ``X``), ties broken by loss, else the plan of
least loss. `plan_cake` is exact over the Cake family *for the predicted throughput*; the session as executed
differs when the prediction is wrong, but every action it takes belongs to a plan within the budget (text is
lossless), so the realised mean loss stays within ``B`` whenever a plan within it exists at the start (the
committed loss plus the all-text rest always is one).

Before any measurement or prior the link probes with the smallest level of the last chunk while the front is
recomputed (under ``objective=ttft`` the smallest level the budget and floor allow; none: no probe).
"""

from __future__ import annotations

from typing import ClassVar

from kvcast.policies.base import TEXT, Decision, Observation, Policy, Session
from kvcast.policies.estimate import DEFAULT_PRIOR_ERROR, RobustThroughputEstimator
from kvcast.policies.planning import (
    DEFAULT_SLO_MARGIN,
    ConstantThroughput,
    FamilyPlan,
    PlanState,
    parse_planner_options,
    plan_cake,
    probe_level,
)

__all__ = ["HybridPolicy"]


class HybridPolicy(Policy):
    """Cake's compute-from-the-front / load-from-the-back with planned levels; see the module docstring.

    Spec ``hybrid`` or ``hybrid:key=value+...`` with keys ``margin`` (plan for ``(1 - margin) * SLO``,
    default 0.05), ``window`` (5), ``prior_error`` (0.5), and ``objective``, ``quality_budget`` and
    ``level_floor`` (`kvcast.policies.planning.objective`); a bare number sets the margin.
    """

    name = "hybrid"
    supports_objective: ClassVar[bool] = True
    """Takes ``objective=...`` spec arguments (``kvcast simulate --objective`` adds them)."""

    def __init__(self, options: str | None = None, *, slo_margin: float = DEFAULT_SLO_MARGIN, window: int = 5,
                 prior_error: float = DEFAULT_PRIOR_ERROR) -> None:
        self.objective, opts = parse_planner_options(
            options, {"margin": slo_margin, "window": window, "prior_error": prior_error}, "hybrid")
        self.slo_margin = opts["margin"]
        self.window = int(opts["window"])
        self.prior_error = opts["prior_error"]
        if not 0 <= self.slo_margin < 1:
            raise ValueError(f"hybrid: margin must be in [0, 1), got {self.slo_margin}")
        if self.window < 1 or self.window != opts["window"]:
            raise ValueError(f"hybrid: window must be an integer >= 1, got {opts['window']}")
        if not self.prior_error >= 0:
            raise ValueError(f"hybrid: prior_error must be >= 0, got {self.prior_error}")

    def reset(self, session: Session) -> None:
        super().reset(session)
        self.objective.check_menus(session.menus, "hybrid")
        self._estimator = RobustThroughputEstimator(self.window, session.rtt_s, session.prior_throughput_bps,
                                                    self.prior_error)
        self._slo = session.slo_s * (1.0 - self.slo_margin)
        self._link_order: list[int] = []
        self._decided_at: dict[int, float] = {}
        self.last_plan: FamilyPlan | None = None
        """The plan behind the latest decision, for inspection."""

    def decide(self, obs: Observation) -> Decision | None:
        self._estimator.observe(obs.samples)
        pending = obs.pending
        if not pending:
            return None
        front = pending[0]  # every chunk below it is decided
        bps = self._estimator.predict_bps()
        if bps is None:
            if obs.compute_idle:
                return Decision(front, TEXT)
            if obs.link_idle and len(pending) > 1:  # the smallest level: menus are not ordered by size
                level = probe_level(obs, pending[-1], self.objective)
                if level is not None:
                    return self._load(obs, pending[-1], level, None)
            return None
        throughput = ConstantThroughput(bps, self.session.rtt_s)
        state = PlanState.from_observation(obs, throughput, self._link_order, self._decided_at).resolved()
        plan = plan_cake(state, throughput, self._slo, objective=self.objective)
        self.last_plan = plan
        actions = dict(plan.actions)
        if obs.compute_idle and actions[front] == TEXT:
            return Decision(front, TEXT, predicted_bps=bps)
        if obs.link_idle and plan.load_order:
            chunk = plan.load_order[0]
            return self._load(obs, chunk, actions[chunk], bps)
        return None

    def _load(self, obs: Observation, chunk: int, level: str, bps: float | None) -> Decision:
        self._link_order.append(chunk)
        self._decided_at[chunk] = obs.now_s
        return Decision(chunk, level, predicted_bps=bps)
