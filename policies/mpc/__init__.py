"""``mpc``: RobustMPC (Yin et al., SIGCOMM 2015; Pensieve's ``robust_mpc_server.py``) for KV streaming.

Plans. At every decision the controller plans the next ``H = 5`` undecided chunks in index order (the
*horizon*), each a codec level or `TEXT`, and applies the first action (receding horizon). The undecided
chunks after the horizon (the *tail*) are modelled as Cake runs them: the tail's first ``s`` chunks are
recomputed from the front and the others loaded from the back at the level of the horizon's last action (at
a level fixed per decision when that action is text), with the best split ``s``. So every plan
is judged on the whole session.

Levels. The actions are the menu's levels that no other level beats on size, decode time and quality loss
at once (`kvcast.policies.base.undominated_levels`; every step of the model is monotone in those three, so the
dropped levels can only tie), in menu order. Nothing assumes that order is monotone in size or quality:
codec profiles list levels in `kvcast.codec.levels()` order, where a kvcast level may be smaller *and* better
than the CacheGen level before it.

Prediction (`kvcast.policies.estimate.RobustThroughputEstimator`): harmonic mean of the last 5 throughputs
divided by ``1 + max`` relative prediction error of the last 5 (``1 + prior_error`` on the prior before the
first sample); the RTT is paid once per request.

Objective (minimised; RobustMPC's "quality minus rebuffering penalty", with TTFT overrun for rebuffering)::

    cost(plan) = Q(plan) + mu * max(0, TTFT(plan) - (1 - margin) * SLO),
    mu = weight * q_span / ((1 - margin) * SLO)

``Q`` is the session's token-weighted mean quality loss (text is lossless) and ``q_span`` the largest
quality loss on the menu, so the default ``weight = 20`` makes an overrun of 5% of the SLO cost as much as
streaming the whole context at the worst level instead of losslessly: violations are avoided first, quality
is maximised second (Pensieve's linear QoE weighs one second of rebuffering like one chunk at the top bitrate;
here the deadline is the primary metric). ``margin = 0.05`` is a safety factor, like sabre's 0.9. There is
no switching term: a KV context has no playback, so level changes between chunks cost nothing.

Second objective (``mpc:objective=ttft+quality_budget=B`` and/or ``+level_floor=X``;
`kvcast.policies.planning.objective`): the cost is the key ``(max(0, Q - B), TTFT, Q)``, compared
lexicographically: the least predicted TTFT among the plans whose session mean loss (decided chunks
included) is within ``B``, ties broken by loss, else the least loss. Levels below the floor are left out of
the chunks' rows like levels a chunk lacks. ``weight`` and ``margin`` play no part. After an all-text horizon
the tail loads at the fastest level whose whole-tail loss fits the budget. The search below stays exact
within the horizon: `search_plan` returns the plan (and key) of `enumerate_plan`.

Execution. Each action is taken as late as possible, with the latest measurement (`MpcPolicy`).

Search. Full enumeration costs ``(L + 1) ** 5`` plan evaluations per decision (16,807 for six levels plus
text), each trying every tail split (`enumerate_plan`). `search_plan` finds the *same* plan, exactly, by
branch-and-bound with bounds that hold in floating point and enumeration-order tie-breaking.

Modules:

* `kvcast.policies.mpc.problem`: `MpcProblem`, `SessionTables`, `build_problem` (a decision as tables);
* `kvcast.policies.mpc.cost`: the cost model (`plan_cost`, the tail's split), shared by both searches;
* `kvcast.policies.mpc.enumeration`: `enumerate_plan`, the reference (RobustMPC's full enumeration);
* `kvcast.policies.mpc.search`: `search_plan`, the exact branch-and-bound;
* `kvcast.policies.mpc.policy`: `MpcPolicy`, the controller (prediction, execution).

Every name below is importable from ``kvcast.policies.mpc``.
"""

from __future__ import annotations

from kvcast.policies.mpc.cost import plan_cost, plan_tail_level, plan_tail_split, tail_split
from kvcast.policies.mpc.enumeration import action_order, enumerate_plan
from kvcast.policies.mpc.policy import MpcPolicy
from kvcast.policies.mpc.problem import (
                                         DEFAULT_HORIZON,
                                         DEFAULT_OVERRUN_WEIGHT,
                                         MpcProblem,
                                         SessionTables,
                                         build_problem,
)
from kvcast.policies.mpc.search import search_plan
from kvcast.policies.planning import DEFAULT_SLO_MARGIN

__all__ = ["MpcPolicy", "MpcProblem", "build_problem", "plan_cost", "enumerate_plan", "search_plan",
           "SessionTables", "DEFAULT_HORIZON", "DEFAULT_OVERRUN_WEIGHT", "DEFAULT_SLO_MARGIN", "tail_split",
           "plan_tail_split", "plan_tail_level", "action_order"]
