"""The targets ``kvcast demo``'s report checks, with the measured numbers, and whether each is met.

1. **Size.** kvcast's best level (the smallest ``kvcast-*`` level whose measured perplexity increase is at most
   1%) at least 4.3x smaller than 8-bit quantization (``int8``) (CacheGen reports 3.5-4.3x for its own), in objects
   of the deployment's chunk size (this run's payload as measured, each object's header and side information spread
   over the deployment's chunk: it is per channel, not per token); the ratio in the run's own chunks is reported
   beside it.
2. **TTFT.** The best kvcast controller (``mpc``, ``hybrid``, ``hybrid`` near-lossless: the least TTFT) at least
   3.2x faster than text recompute and than fetching 8-bit KV, at the headline bandwidth (about 3 Gbps) on the
   scaled Mistral-7B-sized deployment, on each GPU cost model.
3. **SLO.** Fewer SLO violations than ``cachegen`` and than ``cake`` at equal quality over the traces: for each
   baseline, the kvcast controller with the fewest violations among those whose mean quality loss is at most the
   baseline's plus the 8-bit baseline's loss (both near-lossless count as equal), significantly fewer (the paired
   95% CI of the difference in violation rate below 0). The target names real traces: on kvcast's synthetic set
   it is reported but marked so.

Each entry: ``id``, ``target``, ``result`` (a sentence with the numbers), ``met`` (True, False, or None when the
run could not check it) and ``details``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvcast.streamer.demo_config import NEAR_LOSSLESS
from kvcast.streamer.demo_headline import HeadlineRow
from kvcast.streamer.demo_simulation import BASELINE_CONTROLLERS, KVCAST_CONTROLLERS, TraceSimulation

__all__ = ["PPL_LIMIT", "SIZE_TARGET_X", "TTFT_TARGET_X", "evaluate_targets", "size_target", "slo_target",
           "ttft_target"]

SIZE_TARGET_X = 4.3
PPL_LIMIT = 0.01
TTFT_TARGET_X = 3.2
_CONTROLLERS = ("mpc", "hybrid", NEAR_LOSSLESS)


def size_target(levels: Sequence[dict[str, Any]], chunk_tokens: int, scaled_chunk_tokens: int,
                real_text: bool = True) -> dict[str, Any]:
    """Target 1 from the run's per-level rows (``level``, ``bits_per_value``, ``bits_per_value_scaled``,
    ``ppl_change``): decided on objects of the deployment's `scaled_chunk_tokens` tokens, the run's own
    `chunk_tokens`-token objects reported beside. Without `real_text` (kvcast's generated corpus, whose templated
    sentences the model predicts far better than real prose) the result says the target is not established."""
    by_level = {r["level"]: r for r in levels}
    target = (f"kvcast's best level >= {SIZE_TARGET_X}x smaller than 8-bit (int8) at <= {PPL_LIMIT:.0%} perplexity "
              "increase")
    if "int8" not in by_level:
        return {"id": "size", "target": target, "result": "int8 was not measured", "met": None, "details": {}}

    def ratio(r: dict[str, Any], key: str = "bits_per_value_scaled") -> float:
        return by_level["int8"][key] / r[key]

    within = [r for r in levels if r.get("ppl_change") is not None and r["ppl_change"] <= PPL_LIMIT]
    candidates = [r for r in within if r["level"].startswith("kvcast-")]
    cg = max((r for r in within if r["level"].startswith("cachegen-")), key=ratio, default=None)
    cg_text = (f"; CacheGen's best such level, {cg['level']}, is {ratio(cg):.2f}x ({ratio(cg, 'bits_per_value'):.2f}x "
               f"in {chunk_tokens}-token chunks) at {cg['ppl_change']:+.2%}" if cg else
               "; no CacheGen level stays within it")
    if not candidates:
        if not any(r["level"].startswith("kvcast-") and r.get("ppl_change") is not None for r in levels):
            return {"id": "size", "target": target, "result": "no kvcast level's perplexity was measured (no text "
                    "context)", "met": None, "details": {}}
        return {"id": "size", "target": target, "met": False, "details": {},
                "result": f"no kvcast level stays within {PPL_LIMIT:.0%} perplexity increase on this run" + cg_text}
    best = max(candidates, key=ratio)
    x = ratio(best)
    caveat = "" if real_text else (" (on kvcast's generated corpus, templated text the model predicts far better "
                                   "than real prose: not established for real text)")
    return {"id": "size", "target": target, "met": x >= SIZE_TARGET_X, "real_text": real_text,
            "result": f"{best['level']}: {x:.2f}x smaller than int8 in {scaled_chunk_tokens:,}-token objects "
                      f"({ratio(best, 'bits_per_value'):.2f}x in this run's {chunk_tokens}-token chunks) at "
                      f"{best['ppl_change']:+.2%} perplexity" + cg_text + caveat,
            "details": {"level": best["level"], "x_smaller_than_int8": x,
                        "x_smaller_than_int8_run_chunks": ratio(best, "bits_per_value"),
                        "ppl_change": best["ppl_change"], "cachegen_level": cg["level"] if cg else None,
                        "cachegen_x_smaller_than_int8": ratio(cg) if cg else None}}


def ttft_target(tables: dict[str, list[HeadlineRow]], gbps: float) -> dict[str, Any]:
    """Target 2 from the scaled tables (GPU -> rows)."""
    target = (f"best kvcast controller's TTFT >= {TTFT_TARGET_X}x lower than text recompute and than int8 fetch at "
              f"{gbps:g} Gbps on the Mistral-7B-sized deployment")
    parts, details, verdicts = [], {}, []
    for gpu, rows in tables.items():
        by_spec = {r.spec: r for r in rows}
        found = [by_spec[s] for s in _CONTROLLERS if s in by_spec]
        if not found or "text" not in by_spec or "fixed:int8" not in by_spec:
            parts.append(f"{gpu}: not measured (the table needs text, int8 and a kvcast controller)")
            continue
        best = min(found, key=lambda r: r.ttft_s)
        met = (best.ttft_vs_text_x or 0) >= TTFT_TARGET_X and (best.ttft_vs_int8_x or 0) >= TTFT_TARGET_X
        verdicts.append(met)
        details[gpu] = {"policy": best.spec, "ttft_s": best.ttft_s, "text_ttft_s": by_spec["text"].ttft_s,
                        "int8_ttft_s": by_spec["fixed:int8"].ttft_s, "vs_text_x": best.ttft_vs_text_x,
                        "vs_int8_x": best.ttft_vs_int8_x, "met": met}
        ppl = best.quality.get("ppl_change")
        at = "" if ppl is None else f" at {ppl:+.2%} perplexity"
        parts.append(f"{gpu}: {best.label} {best.ttft_s:.3f} s{at}, {best.ttft_vs_text_x:.2f}x vs text "
                     f"({by_spec['text'].ttft_s:.3f} s) and {best.ttft_vs_int8_x:.2f}x vs int8 "
                     f"({by_spec['fixed:int8'].ttft_s:.3f} s): {'met' if met else 'missed'}")
    return {"id": "ttft", "target": target, "result": "; ".join(parts),
            "met": None if not verdicts else all(verdicts), "details": details}


def slo_target(simulation: TraceSimulation, near_lossless_loss: float | None, real_traces: bool) -> dict[str, Any]:
    """Target 3 from the simulation's summary and paired comparisons."""
    target = "fewer SLO violations than cachegen and than cake at equal quality on real traces"
    tolerance = near_lossless_loss or 0.0
    summary = {s["policy"]: s for s in simulation.summary}
    parts, details, verdicts = [], {}, []
    for reference in BASELINE_CONTROLLERS:
        pairs = [p for p in simulation.paired if p["reference"] == reference and p["policy"] in KVCAST_CONTROLLERS]
        equal = [p for p in pairs if p["quality_loss"]["mean"] <= tolerance]
        if not pairs:
            parts.append(f"vs {reference}: not simulated")
            continue
        if not equal:
            parts.append(f"vs {reference}: no kvcast controller matched its quality (mean loss "
                         f"{summary[reference]['quality_loss_mean']:.4f})")
            verdicts.append(False)
            continue
        best = min(equal, key=lambda p: (summary[p["policy"]]["slo_violation_rate"], p["policy"]))
        v = best["violations"]
        met = v["ci95"][1] < 0
        verdicts.append(met)
        details[reference] = {"policy": best["policy"], "violation_difference": v["mean"], "ci95": v["ci95"],
                              "quality_loss_difference": best["quality_loss"]["mean"],
                              "policy_violations": summary[best["policy"]]["slo_violation_rate"],
                              "reference_violations": summary[reference]["slo_violation_rate"], "met": met}
        parts.append(f"vs {reference}: {best['policy']} {summary[best['policy']]['slo_violation_rate']:.1%} vs "
                     f"{summary[reference]['slo_violation_rate']:.1%} violations (paired difference "
                     f"{v['mean']:+.1%}, 95% CI [{v['ci95'][0]:+.1%}, {v['ci95'][1]:+.1%}]; quality loss "
                     f"{best['quality_loss']['mean']:+.2g}): {'met' if met else 'missed'}")
    result = "; ".join(parts) + ("" if real_traces else " (on kvcast's synthetic traces: not the real traces the "
                                                          "target names)")
    return {"id": "slo", "target": target, "result": result, "met": None if not verdicts else all(verdicts),
            "real_traces": real_traces, "details": details}


def evaluate_targets(levels: Sequence[dict[str, Any]], scaled: dict[str, list[HeadlineRow]], gbps: float,
                     simulation: TraceSimulation, near_lossless_loss: float | None, real_traces: bool, *,
                     chunk_tokens: int, scaled_chunk_tokens: int, real_text: bool = True) -> list[dict[str, Any]]:
    return [size_target(levels, chunk_tokens, scaled_chunk_tokens, real_text), ttft_target(scaled, gbps),
            slo_target(simulation, near_lossless_loss, real_traces)]
