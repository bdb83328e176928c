"""`cake-cachegen`: Cake's two-pointer split with CacheGen's greedy level rule for the loaded chunks.

The baseline that isolates what planning adds: it takes Cake's idea (``reference/streaming-and-policies.md``
section 2.2; `kvcast.policies.cake`) and CacheGen's level rule (section 1.1; `kvcast.policies.cachegen`) with
RobustMPC's throughput estimate (section 3.1), and nothing else: no search over plans.

* **Split, as Cake.** Whenever the compute unit is idle, the lowest undecided chunk is recomputed from text;
  whenever the link is idle, the highest undecided chunk is loaded; the two meet where their speeds balance.
* **Level, as CacheGen.** The loaded chunk's level is the highest-quality level (least loss) whose predicted
  time lets *the remaining loaded chunks* finish within *the remaining SLO*. If none does, CacheGen recomputes
  the chunk from text; in Cake's split that means leaving the chunk to the compute unit, which is then
  behind anyway, so the chunk becomes text only where the GPU would have it ready first (after every
  undecided chunk before it), and is otherwise loaded at the most compressed level (the fewest bytes).

  The remaining loaded chunks are the undecided ones the compute unit cannot reach by the SLO: starting when
  the compute unit is free, the front chunks' recompute times are added until the next would end after the
  SLO; the link must load the rest (at least the chunk being decided). At level ``l``, with ``L`` those
  chunks, ``tput`` the estimate and ``rtt`` the link's round trip::

      now + sum_{j in L} (rtt + bytes_j(l) * 8 / tput) + decode_s(l) of the last of them  <=  SLO

* **Estimate, as RobustMPC.** Harmonic mean of the last 5 payload throughputs (RTT taken out) over ``1 + max``
  of the last 5 relative prediction errors (`kvcast.policies.estimate.RobustThroughputEstimator`); the
  session's prior, discounted by ``1 + prior_error``, before the first transfer; the smallest level with
  neither.

One load request in flight at a time (as CacheGen streams, and so that each throughput sample measures the
whole link). Levels as `cachegen`'s: CacheGen's own levels of the menu (``cachegen-3..1``), or the whole menu
if it has none of them (``--levels kvcast``) or with ``levels=menu``.

Arguments: ``cake-cachegen:key=value+...`` with ``window`` (5), ``prior_error`` (0.5) and ``levels``
(``cachegen`` or ``menu``).
"""

from __future__ import annotations

from kvcast.policies.base import TEXT, Decision, Observation, Policy, Session, smallest
from kvcast.policies.cachegen import cachegen_levels
from kvcast.policies.estimate import DEFAULT_PRIOR_ERROR, RobustThroughputEstimator

__all__ = ["CakeCacheGenPolicy", "compute_reach"]


def compute_reach(obs: Observation, deadline_s: float) -> int:
    """How many of the undecided chunks, from the front, the compute unit recomputes by `deadline_s` (starting
    when it is free); never all of them: the link always has the last one to load."""
    pending = obs.pending
    menus = obs.menus
    t = max(obs.now_s, obs.compute_free_at_s)
    k = 0
    while k < len(pending) - 1:
        t += menus[pending[k]].recompute_s
        if t > deadline_s:
            break
        k += 1
    return k


class CakeCacheGenPolicy(Policy):
    """Cake's front/back split; each loaded chunk at CacheGen's greedy level under a RobustMPC estimate."""

    name = "cake-cachegen"

    def __init__(self, options: str | None = None, *, window: int = 5,
                 prior_error: float = DEFAULT_PRIOR_ERROR, levels: str = "cachegen") -> None:
        for part in (options.split("+") if options else ()):
            key, _, value = part.partition("=")
            try:
                if key == "window":
                    window = int(value)
                elif key == "prior_error":
                    prior_error = float(value)
                elif key == "levels":
                    levels = value
                else:
                    raise ValueError(f"unknown option {key!r}; known: window, prior_error, levels")
            except ValueError as exc:
                raise ValueError(f"cake-cachegen: {part!r}: {exc}") from None
        if window < 1 or not prior_error >= 0:
            raise ValueError(f"cake-cachegen: window must be >= 1 and prior_error >= 0, got {window}, "
                             f"{prior_error}")
        if levels not in ("cachegen", "menu"):
            raise ValueError(f"cake-cachegen: levels must be 'cachegen' or 'menu', got {levels!r}")
        self.window, self.prior_error, self.levels_mode = window, prior_error, levels

    def reset(self, session: Session) -> None:
        super().reset(session)
        self.tried = cachegen_levels(session.menus, self.levels_mode)
        """The levels tried, best quality first."""
        self._estimator = RobustThroughputEstimator(self.window, session.rtt_s, session.prior_throughput_bps,
                                                    self.prior_error)

    def decide(self, obs: Observation) -> Decision | None:
        pending = obs.pending
        if obs.compute_idle:
            return Decision(pending[0], TEXT)
        if not obs.link_idle:
            return None
        chunk = pending[-1]
        menus = obs.menus
        self._estimator.observe(obs.samples)
        tput = self._estimator.predict_bps()
        if tput is None or tput <= 0.0:
            return Decision(chunk, smallest(menus, chunk, self.tried), predicted_bps=tput)
        slo = obs.slo_s
        loaded = pending[compute_reach(obs, slo):]
        start = max(obs.now_s, obs.link_busy_until_s) + self.session.rtt_s * len(loaded)
        for level in self.tried:
            bits = 0.0
            for j in loaded:
                bits += menus[j].option(level).nbytes
            if start + bits * 8.0 / tput + menus[loaded[0]].option(level).decode_s <= slo:
                return Decision(chunk, level, predicted_bps=tput)
        low = menus[chunk].option(smallest(menus, chunk, self.tried))
        link_ready = max(obs.now_s, obs.link_busy_until_s) + self.session.rtt_s + low.nbytes * 8.0 / tput
        link_ready = max(link_ready, obs.decoder_free_at_s) + low.decode_s
        text_ready = max(obs.now_s, obs.compute_free_at_s) + sum(menus[j].recompute_s for j in pending)
        if text_ready <= link_ready:
            return Decision(chunk, TEXT, predicted_bps=tput)
        return Decision(chunk, low.level, predicted_bps=tput)
