"""`MpcPolicy`, the ``mpc`` controller: predicts, plans (`kvcast.policies.mpc.search`) and acts.

Prediction (`kvcast.policies.estimate.RobustThroughputEstimator`): harmonic mean of the last 5 throughputs
divided by ``1 + max`` relative prediction error of the last 5 (``1 + prior_error`` on the prior before the
first sample); the RTT is paid once per request. With neither a prior nor a sample, it probes the link with
the smallest level of the lowest undecided chunk.

Execution. Each action is taken as late as possible, with the latest measurement: text for the lowest
undecided chunk when the compute unit runs dry; when the link runs dry, the plan's lowest loaded horizon
chunk, else the highest tail chunk it loads. Loads are issued one at a time.
"""

from __future__ import annotations

from typing import ClassVar

from kvcast.policies.base import TEXT, Decision, Observation, Policy, Session
from kvcast.policies.estimate import DEFAULT_PRIOR_ERROR, RobustThroughputEstimator
from kvcast.policies.mpc.cost import plan_tail_level, plan_tail_split
from kvcast.policies.mpc.enumeration import enumerate_plan
from kvcast.policies.mpc.problem import (
    DEFAULT_HORIZON,
    DEFAULT_OVERRUN_WEIGHT,
    MpcProblem,
    SessionTables,
    build_problem,
)
from kvcast.policies.mpc.search import search_plan
from kvcast.policies.planning import (
    DEFAULT_SLO_MARGIN,
    ConstantThroughput,
    PlanState,
    parse_planner_options,
    probe_level,
)

__all__ = ["MpcPolicy"]


class MpcPolicy(Policy):
    """RobustMPC with text as an extra action; see `kvcast.policies.mpc`.

    Spec ``mpc`` or ``mpc:key=value+...`` with keys ``weight`` (overrun weight, default 20), ``margin``
    (plan for ``(1 - margin) * SLO``, default 0.05), ``horizon`` (5), ``window`` (5), ``prior_error``
    (0.5), and ``objective``, ``quality_budget`` and ``level_floor`` (`kvcast.policies.planning.objective`;
    ``weight`` and ``margin`` then play no part); a bare number sets the weight.
    """

    name = "mpc"
    supports_objective: ClassVar[bool] = True
    """Takes ``objective=...`` spec arguments (``kvcast simulate --objective`` adds them)."""

    def __init__(self, options: str | None = None, *, overrun_weight: float = DEFAULT_OVERRUN_WEIGHT,
                 horizon: int = DEFAULT_HORIZON, window: int = 5, slo_margin: float = DEFAULT_SLO_MARGIN,
                 prior_error: float = DEFAULT_PRIOR_ERROR, exhaustive: bool = False) -> None:
        self.objective, opts = parse_planner_options(
            options, {"weight": overrun_weight, "margin": slo_margin, "horizon": horizon, "window": window,
                      "prior_error": prior_error}, "mpc")
        self.overrun_weight = opts["weight"]
        self.slo_margin = opts["margin"]
        self.horizon = int(opts["horizon"])
        self.window = int(opts["window"])
        self.prior_error = opts["prior_error"]
        if not self.overrun_weight > 0:
            raise ValueError(f"mpc: weight must be > 0, got {self.overrun_weight}")
        if not 0 <= self.slo_margin < 1:
            raise ValueError(f"mpc: margin must be in [0, 1), got {self.slo_margin}")
        if self.horizon < 1 or self.window < 1 or self.horizon != opts["horizon"]:
            raise ValueError(f"mpc: horizon and window must be integers >= 1, got {opts}")
        if not self.prior_error >= 0:
            raise ValueError(f"mpc: prior_error must be >= 0, got {self.prior_error}")
        self.exhaustive = exhaustive
        """Use full enumeration instead of branch-and-bound (same decisions; for benchmarks)."""
        self.record: list[tuple[MpcProblem, tuple[tuple[int, ...], ...]]] | None = None
        """If a list, every decision's problem and search hints are appended to it (benchmarks, tests)."""

    def reset(self, session: Session) -> None:
        super().reset(session)
        self.objective.check_menus(session.menus, "mpc")
        self._tables = SessionTables.of(session, objective=self.objective)
        self._levels = self._tables.names
        self._text = len(self._levels)
        self._estimator = RobustThroughputEstimator(self.window, session.rtt_s, session.prior_throughput_bps,
                                                    self.prior_error)
        self._slo = session.slo_s * (1.0 - self.slo_margin)
        self._link_order: list[int] = []
        self._decided_at: dict[int, float] = {}
        self._prev_plan: tuple[int, ...] = ()
        self.last_plan: tuple[tuple[int, str], ...] = ()
        """The plan behind the latest decision (horizon chunks and actions), for inspection."""

    def predicted_bps(self) -> float | None:
        return self._estimator.predict_bps()

    def decide(self, obs: Observation) -> Decision | None:
        self._estimator.observe(obs.samples)
        pending = obs.pending
        if not pending:
            return None
        bps = self._estimator.predict_bps()
        if bps is None:
            # No prior and no sample yet: probe the link with the smallest level (not the menu's last: menus
            # are not ordered by size).
            if not obs.link_idle:
                return None
            level = probe_level(obs, pending[0], self.objective, self._levels)
            if level is None:  # objective=ttft: no level fits the budget or floor; recompute instead
                return Decision(pending[0], TEXT) if obs.compute_idle else None
            return self._load(obs, pending[0], level)
        throughput = ConstantThroughput(bps, self.session.rtt_s)
        state = PlanState.from_observation(obs, throughput, self._link_order, self._decided_at).resolved()
        problem = build_problem(self._tables, pending, state, throughput, self._slo,
                                self.overrun_weight, self.horizon, self.objective)
        prev = self._prev_plan
        hints = ((prev[1:] + prev[-1:])[:problem.horizon], prev[:problem.horizon]) if prev else ()
        if self.record is not None:
            self.record.append((problem, hints))
        plan, _ = enumerate_plan(problem) if self.exhaustive else search_plan(problem, hints)
        self._prev_plan = plan
        names = self._levels + (TEXT,)
        self.last_plan = tuple((c, names[a]) for c, a in zip(problem.chunks, plan))
        # Act as late as possible, so every action uses the latest measurements: text for the lowest
        # undecided chunk when the compute unit runs dry (it would wait for the chunks below it anyway);
        # when the link runs dry, the plan's lowest loaded horizon chunk, else the highest tail chunk the
        # plan loads (the tail is recomputed from its front and loaded from its back, as in Cake).
        if plan[0] == self._text and obs.compute_idle:
            return Decision(pending[0], TEXT, predicted_bps=bps)
        if obs.link_idle:
            for chunk, a in zip(problem.chunks, plan):
                if a != self._text:
                    return self._load(obs, chunk, names[a], bps)
            tail = problem.tail_chunks
            if tail and plan_tail_split(problem, plan) < len(tail):
                return self._load(obs, tail[-1], names[plan_tail_level(problem, plan)], bps)
        return None

    def _load(self, obs: Observation, chunk: int, level: str, bps: float | None = None) -> Decision:
        self._link_order.append(chunk)
        self._decided_at[chunk] = obs.now_s
        return Decision(chunk, level, predicted_bps=bps)
