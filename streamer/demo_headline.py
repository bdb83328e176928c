"""The headline comparison of ``kvcast demo``, after CacheGen's paper: per method (text recompute, 8-bit
quantization, CacheGen's levels and controller, Cake, kvcast's levels and controllers) the KV size against 8-bit
quantization, the TTFT against text recompute and against fetching 8-bit KV on the same link, and the quality
against the exact cache, side by side.

Two tables, both on a constant link of `DemoConfig.headline_gbps`:

* **measured**: this host and model (SmolLM2-135M on this machine's CPU): every context of the run with its stored
  objects' real sizes and this host's measured decode and prefill costs (`kvcast.streamer.live.live_menus`), one
  simulated session per method and context;
* **scaled**: a Mistral-7B-sized deployment (`DemoConfig.scaled_model`, `scaled_context_tokens` in 1,536-token
  chunks) on each GPU cost model of `scaled_gpus`: sizes from this run's measured bits per value, GPU decode speeds
  from ``streamer/gpu_bench_h100.json``, recompute from ``recompute_costs.json`` (`kvcast.streamer.menus`).

Quality is always measured on the real model: each session's actions are applied to the run's contexts
(`kvcast.streamer.demo_measure.ContextMeasurer.score_plan`); a scaled session's actions are mapped onto each
context's chunks by relative position (`map_actions`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kvcast.codec.evaluate import QualitySums
from kvcast.policies.registry import PolicyRegistry
from kvcast.streamer.config import SimulationConfig
from kvcast.streamer.demo_config import HEADLINE_ROWS, NEAR_LOSSLESS, DemoConfig
from kvcast.streamer.demo_measure import ContextMeasurer, MeasuredContext, PlanQuality
from kvcast.streamer.engine import SessionResult
from kvcast.streamer.host import HostProfile
from kvcast.streamer.live import live_menus
from kvcast.streamer.menus import ModelShape, build_menus, recompute_cost
from kvcast.streamer.profile import Profile
from kvcast.streamer.simulate import simulate_session
from kvcast.traces.synthetic import constant

__all__ = ["HeadlineRow", "headline_specs", "host_table", "map_actions", "plan_text", "resolve_spec",
           "scaled_table"]


@dataclass
class HeadlineRow:
    """One method of a headline table."""

    spec: str
    label: str
    family: str
    ttft_s: float
    bytes: float
    """Bytes loaded (summed over the contexts of the measured table)."""
    sim_quality_loss: float
    """The simulator's predicted quality loss of the session(s) (KL per token, the profile's metric)."""
    text_chunk_share: float
    quality: dict[str, Any]
    """Measured on the real model: kl_per_token, top1_agreement, ppl_change (text contexts), qa_accuracy,
    qa_same_as_exact (questions), and the number of each."""
    actions: list[list[str]]
    ttft_vs_text_x: float | None = None
    ttft_vs_int8_x: float | None = None
    size_vs_int8_x: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


def resolve_spec(spec: str, profile: Profile) -> str | None:
    """The policy spec a headline or simulation name stands for: `NEAR_LOSSLESS` becomes ``hybrid`` with the TTFT
    objective and the ``int8`` level's quality loss as its budget (None without ``int8`` on the profile)."""
    if spec != NEAR_LOSSLESS:
        return spec
    if "int8" not in profile.level_names:
        return None
    return f"hybrid:objective=ttft+quality_budget={profile.level('int8').quality_loss:.6g}"


def headline_specs(levels: Sequence[str]) -> list[tuple[str, str, str]]:
    """The rows of `HEADLINE_ROWS` whose fixed level (if any) is among `levels`."""
    return [row for row in HEADLINE_ROWS if not row[0].startswith("fixed:") or row[0].split(":", 1)[1] in levels]


def map_actions(scaled_actions: Sequence[str], scaled_tokens: int, scaled_chunk_tokens: int,
                chunk_starts: Sequence[int], chunk_tokens: Sequence[int]) -> list[str]:
    """The actions of a plan over a `scaled_tokens` context (chunks of `scaled_chunk_tokens`) carried onto a
    shorter context's chunks (`chunk_starts`, `chunk_tokens`): each chunk takes the action of the scaled chunk at
    the same relative position as its centre.

    >>> map_actions(["text", "text", "int8", "kvcast-2"], 4000, 1000, [0, 100, 200, 300], [100, 100, 100, 100])
    ['text', 'text', 'int8', 'kvcast-2']
    >>> map_actions(["text", "int8"], 2000, 1000, [0, 128, 256], [128, 128, 128])
    ['text', 'int8', 'int8']
    """
    total = chunk_starts[-1] + chunk_tokens[-1]
    out = []
    for start, tokens in zip(chunk_starts, chunk_tokens):
        at = (start + tokens / 2) / total * scaled_tokens
        out.append(scaled_actions[min(int(at // scaled_chunk_tokens), len(scaled_actions) - 1)])
    return out


def _quality(parts: Sequence[tuple[MeasuredContext, PlanQuality]]) -> dict[str, Any]:
    """Pooled quality of one method over the contexts: text metrics token-weighted, answers counted."""
    sums = QualitySums()
    texts = answers = correct = same = 0
    for measured, quality in parts:
        if measured.context.kind == "text" and quality.sums is not None:
            sums.merge(quality.sums)
            texts += 1
        elif measured.context.kind == "qa":
            answers += 1
            correct += bool(quality.correct)
            same += bool(quality.same_as_exact)
    summary = sums.summary() if texts else {}
    return {"kl_per_token": summary.get("kl_per_token"), "top1_agreement": summary.get("top1_agreement"),
            "ppl_change": summary.get("ppl_change"), "text_contexts": texts,
            "qa_accuracy": correct / answers if answers else None,
            "qa_same_as_exact": same / answers if answers else None, "questions": answers}


def _ratios(rows: list[HeadlineRow]) -> list[HeadlineRow]:
    by_spec = {r.spec: r for r in rows}
    text, int8 = by_spec.get("text"), by_spec.get("fixed:int8")
    for row in rows:
        if text is not None and row.ttft_s > 0:
            row.ttft_vs_text_x = text.ttft_s / row.ttft_s
        if int8 is not None and row.ttft_s > 0:
            row.ttft_vs_int8_x = int8.ttft_s / row.ttft_s
        if int8 is not None and row.bytes > 0:
            row.size_vs_int8_x = int8.bytes / row.bytes
    return rows


def _session_summary(sessions: Sequence[SessionResult]) -> tuple[float, float, float, float]:
    """Mean TTFT, total bytes, mean predicted loss, text-chunk share."""
    chunks = sum(len(s.chunks) for s in sessions)
    return (sum(s.ttft_s for s in sessions) / len(sessions), float(sum(s.bytes_loaded for s in sessions)),
            sum(s.quality_loss for s in sessions) / len(sessions),
            sum(s.text_chunks for s in sessions) / chunks if chunks else 0.0)


def _runnable_specs(profile: Profile, on_row: Any = None) -> Iterator[tuple[str, str, str, str]]:
    """(spec, label, family, the spec to create) of each headline method `profile` can run, calling
    `on_row(label)` before each."""
    for spec, label, family in headline_specs(profile.level_names):
        policy_spec = resolve_spec(spec, profile)
        if policy_spec is None:
            continue
        if on_row is not None:
            on_row(label)
        yield spec, label, family, policy_spec


def host_table(measured: Sequence[MeasuredContext], host: HostProfile, profile: Profile, config: DemoConfig,
               registry: PolicyRegistry, measurer: ContextMeasurer, on_row: Any = None) -> list[HeadlineRow]:
    """The measured table: per method, one session per context on this host's menus at the headline bandwidth,
    its quality measured by applying its actions to that context."""
    trace = constant(config.headline_gbps * 1e9)
    menus = {m.context_id: live_menus(m.manifest, host) for m in measured}
    rows = []
    for spec, label, family, policy_spec in _runnable_specs(profile, on_row):
        sessions, parts = [], []
        for m in measured:
            session = simulate_session(registry.create(policy_spec), menus[m.context_id], trace,
                                       slo_s=config.host_slo_s, rtt_s=config.live_rtt_ms / 1e3,
                                       prior_throughput_bps=trace.mean_bps, label=spec)
            sessions.append(session)
            parts.append((m, measurer.score_plan(m, [c.action for c in session.chunks])))
        ttft, nbytes, loss, share = _session_summary(sessions)
        rows.append(HeadlineRow(spec, label, family, ttft, nbytes, loss, share, _quality(parts),
                                [[c.action for c in s.chunks] for s in sessions]))
    return _ratios(rows)


def scaled_table(measured: Sequence[MeasuredContext], profile: Profile, config: DemoConfig, gpu: str,
                 registry: PolicyRegistry, measurer: ContextMeasurer, on_row: Any = None) -> list[HeadlineRow]:
    """The scaled table on `gpu`'s cost model: per method one session over the scaled context at the headline
    bandwidth (the simulator's link model and defaults: RTT, efficiency, request overhead, the profile's
    text-over-lossy-prefix penalty), its actions applied to every context of the run for the measured quality."""
    sim = SimulationConfig()
    shape = ModelShape.parse(config.scaled_model)
    menus = build_menus(profile, shape, config.scaled_context_tokens, sim.chunk_tokens,
                        recompute_cost(f"{gpu}/{config.scaled_model}"))
    trace = constant(config.headline_gbps * 1e9)
    ratio = sim.resolved_lossy_prefix_ratio(profile)
    rows = []
    for spec, label, family, policy_spec in _runnable_specs(profile, on_row):
        session = simulate_session(registry.create(policy_spec), menus, trace, slo_s=config.slo_s, rtt_s=sim.rtt_s,
                                   efficiency=sim.efficiency, overhead_bytes=sim.overhead_bytes,
                                   prior_throughput_bps=trace.mean_bps, label=spec, lossy_prefix_ratio=ratio)
        actions = [c.action for c in session.chunks]
        parts = []
        for m in measured:
            chunks = m.manifest.chunks
            mapped = map_actions(actions, config.scaled_context_tokens, sim.chunk_tokens,
                                 [c.start_token for c in chunks], [c.tokens for c in chunks])
            parts.append((m, measurer.score_plan(m, mapped)))
        ttft, nbytes, loss, share = _session_summary([session])
        rows.append(HeadlineRow(spec, label, family, ttft, nbytes, loss, share, _quality(parts), [actions]))
    return _ratios(rows)


def plan_text(actions: Sequence[str]) -> str:
    """``"text x4, kvcast-4 x7"``: a plan's actions by count, in first-use order.

    >>> plan_text(["text", "text", "int8"])
    'text x2, int8 x1'
    """
    counts: dict[str, int] = {}
    for action in actions:
        counts[action] = counts.get(action, 0) + 1
    return ", ".join(f"{a} x{n}" for a, n in counts.items())

