"""The regime map a deployer needs: time to first token of recomputing the context from text, of fetching it
at ``int8``, and of the best plan at (near-)equal quality, per link bandwidth and GPU cost model
(``kvcast sweep --regime-map``).

Each cell is one session on a constant-bandwidth trace with the sweep's model shape, chunking, RTT,
efficiency, request overhead and GPU share, and the shipped recompute cost of ``gpu/model``:

* ``text``: every chunk recomputed (lossless).
* ``int8``: every chunk fetched at ``int8`` (quality loss `int8`'s).
* ``lossless``: the fastest plan over text and the *near-lossless* levels, those whose measured quality loss
  is at most ``int8``'s (``raw``, ``int8`` and ``kvcast-4`` in the shipped profile; ``raw`` alone if the
  profile has no ``int8``). It is the ``oracle``'s plan (exact over in-order and Cake plans with the link's
  future, which a constant trace makes trivial) for an SLO it cannot meet, so it minimises TTFT.
* ``exact``: the same over text and ``raw`` only (bit-exact KV; no codec at all).
* ``hybrid``: the ``hybrid`` controller at the base SLO on every level of the menu (its quality loss too).

Where ``lossless`` is not faster than ``text`` the link is too slow for loading to pay at equal quality.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from kvcast.streamer.config import SimulationConfig
from kvcast.streamer.menus import build_menus, recompute_cost, resolve_levels, with_recompute_scale
from kvcast.streamer.simulate import simulate_session
from kvcast.streamer.sweep_config import RegimeSettings
from kvcast.traces.synthetic import constant
from kvcast.traces.trace import Trace

__all__ = ["lossless_levels", "regime_map"]

_MIN_TTFT_SLO_S = 1e-6
"""An SLO no plan meets: the oracle then minimises the overrun, i.e. TTFT."""


def lossless_levels(profile: Any, levels: Any = None) -> tuple[str, ...]:
    """The menu's levels whose quality loss is at most ``int8``'s (``raw`` alone without ``int8``)."""
    names = resolve_levels(profile, levels)
    if "int8" not in profile.level_names:
        return tuple(n for n in names if n == "raw")
    bound = profile.level("int8").quality_loss
    return tuple(n for n in names if profile.level(n).quality_loss <= bound)


def _plan_text(chunks: Any) -> str:
    """``"text x4, kvcast-4 x7"``: the actions of a session's chunks, by count (in first-use order)."""
    counts = Counter(c.action for c in chunks)
    return ", ".join(f"{action} x{n}" for action, n in counts.items())


def regime_map(settings: RegimeSettings, config: SimulationConfig) -> list[dict[str, Any]]:
    """One row per (GPU, bandwidth): the TTFTs and quality losses above, and the speed-ups over ``text``."""
    from kvcast.policies.registry import default_registry

    registry = default_registry()
    profile = config.load_profile()
    shape = config.shape()
    lossless = lossless_levels(profile, config.levels)
    if not lossless:
        raise ValueError("the menu has no near-lossless level (raw, or a level at most as lossy as int8)")
    has_int8 = "int8" in resolve_levels(profile, config.levels)
    rows = []
    for gpu in settings.gpus:
        cost = recompute_cost(f"{gpu}/{config.model}")

        def menus_of(levels: Any, cost: Any = cost) -> Any:
            menus = build_menus(profile, shape, settings.context_tokens, config.chunk_tokens, cost, levels=levels)
            return menus if config.gpu_share == 1.0 else with_recompute_scale(menus, 1.0 / config.gpu_share)

        every, near = menus_of(config.levels), menus_of(lossless)
        exact_menus = menus_of(("raw",)) if "raw" in lossless else None
        for gbps in settings.bandwidths_gbps:
            trace = constant(gbps * 1e9)

            def play(spec: str, menus: Any, slo_s: float, trace: Trace = trace) -> Any:
                return simulate_session(registry.create(spec), menus, trace, slo_s=slo_s, rtt_s=config.rtt_s,
                                        efficiency=config.efficiency, overhead_bytes=config.overhead_bytes,
                                        prior_throughput_bps=trace.mean_bps, query_prefill_s=config.query_prefill_s)

            text = play("text", every, config.slo_s)
            best = play("oracle", near, _MIN_TTFT_SLO_S)
            exact = None if exact_menus is None else play("oracle", exact_menus, _MIN_TTFT_SLO_S)
            hybrid = play("hybrid", every, config.slo_s)
            int8 = play("fixed:int8", every, config.slo_s) if has_int8 else None
            rows.append({
                "gpu": gpu, "recompute_cost": cost.name, "provisional_cost": cost.provisional,
                "bandwidth_gbps": gbps, "context_tokens": settings.context_tokens,
                "text_ttft_s": text.ttft_s,
                "int8_ttft_s": None if int8 is None else int8.ttft_s,
                "int8_quality_loss": None if int8 is None else int8.quality_loss,
                "lossless_ttft_s": best.ttft_s, "lossless_quality_loss": best.quality_loss,
                "lossless_plan": _plan_text(best.chunks),
                "lossless_speedup": text.ttft_s / best.ttft_s,
                "exact_ttft_s": None if exact is None else exact.ttft_s,
                "hybrid_slo_s": config.slo_s, "hybrid_ttft_s": hybrid.ttft_s,
                "hybrid_quality_loss": hybrid.quality_loss, "hybrid_speedup": text.ttft_s / hybrid.ttft_s,
            })
    return rows
