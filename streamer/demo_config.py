"""`DemoConfig`: every setting of ``kvcast demo`` and its default, written once (the standard library only, so the
CLI reads the defaults without importing torch or numpy).

The demo (`kvcast.streamer.demo.run_demo`) prefills real contexts on SmolLM2-135M, stores every chunk at every
level, measures sizes and quality, simulates every built-in policy over traces, streams one context live through
``kvcast serve`` and writes a report. `DemoConfig()` is the full run (about six minutes on two shared cores);
`DemoConfig.quick()` the small one CI runs end to end (a few minutes).

>>> DemoConfig().text_contexts, DemoConfig.quick().text_contexts
(3, 1)
>>> DemoConfig(headline_gbps=0)
Traceback (most recent call last):
ValueError: headline_gbps must be finite and > 0, got 0
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from kvcast.codec.settings import DEFAULT_BASELINES, DEFAULT_MODEL, baseline_percent
from kvcast.streamer.config import SimulationConfig

__all__ = ["DEMO_POLICIES", "HEADLINE_ROWS", "NEAR_LOSSLESS", "DemoConfig"]

NEAR_LOSSLESS = "hybrid:near-lossless"
"""The demo's name for ``hybrid`` with the TTFT objective and a quality budget of the 8-bit baseline's measured loss
(``hybrid:objective=ttft+quality_budget=<int8's loss>``, filled in from the profile at run time): kvcast's
controller at the quality of a near-lossless cache, the comparison with lossless baselines such as ``cake``."""

DEMO_POLICIES: tuple[str, ...] = (
    "text", "raw", "fixed:int8", "cachegen", "cachegen-code", "cake", "cake-cachegen", "rate", "slack", "learned",
    "mpc", "hybrid", NEAR_LOSSLESS, "oracle",
)
"""Every built-in policy (``fixed`` as the 8-bit baseline ``fixed:int8``), plus `NEAR_LOSSLESS`."""

HEADLINE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("text", "text recompute", "reference"),
    ("fixed:int8", "8-bit quantization (int8)", "reference"),
    ("fixed:cachegen-3", "cachegen-3 level", "CacheGen"),
    ("fixed:cachegen-2", "cachegen-2 level", "CacheGen"),
    ("fixed:cachegen-1", "cachegen-1 level", "CacheGen"),
    ("cachegen", "CacheGen controller", "CacheGen"),
    ("cake", "Cake (raw KV)", "Cake"),
    ("cake-cachegen", "Cake + CacheGen levels", "Cake"),
    ("fixed:kvcast-4", "kvcast-4 level", "kvcast"),
    ("fixed:kvcast-3", "kvcast-3 level", "kvcast"),
    ("fixed:kvcast-2", "kvcast-2 level", "kvcast"),
    ("fixed:kvcast-1", "kvcast-1 level", "kvcast"),
    ("fixed:kvcast-basis-3", "kvcast-basis-3 level", "kvcast"),
    ("fixed:kvcast-basis-2", "kvcast-basis-2 level", "kvcast"),
    ("fixed:kvcast-basis-1", "kvcast-basis-1 level", "kvcast"),
    ("mpc", "mpc controller", "kvcast"),
    ("hybrid", "hybrid controller", "kvcast"),
    (NEAR_LOSSLESS, "hybrid, near-lossless budget", "kvcast"),
)
"""The rows of the headline tables: policy spec, label, family (CacheGen's paper compares its levels and
controller with text recompute and 8-bit quantization; Cake and kvcast sit beside them)."""


@dataclass(frozen=True)
class DemoConfig:
    """What ``kvcast demo`` runs. Every field has a documented default; `quick` is the small preset."""

    out: Path = Path("out")
    """Folder of ``report.md``, ``report.html``, ``report.json``, the PNGs and the run's data (``data/``)."""
    datasets: Path | None = None
    """Datasets folder (WikiText-2 and LongChat lines). None: ``../shared/datasets`` when present, else kvcast's
    generated corpus (`kvcast.codec.corpus`)."""
    traces: tuple[Path, ...] | None = None
    """Trace files or folders. None: ``../shared/traces`` when present, else kvcast's shipped synthetic traces."""
    model: str = DEFAULT_MODEL
    """The model the contexts are prefilled on (``smollm2``: SmolLM2-135M-Instruct)."""
    threads: int = 1
    """torch threads (0: torch's default). One leaves a core to the coder processes and the server."""
    text_contexts: int = 3
    """Passages whose continuation is scored (perplexity change, top-1 agreement, KL); at least one."""
    context_tokens: int = 2048
    """Tokens of each passage's context."""
    next_tokens: int = 128
    """Continuation tokens scored on each passage's (decoded) cache, teacher-forced."""
    qa_contexts: int = 4
    """Line-retrieval cases (LongChat's ``lines`` task) answered on each cache (0: none; the live run then continues
    a passage)."""
    qa_lines: int = 40
    """Lines of each line-retrieval record (LongChat's 200-line records are cut to this many around the asked
    line)."""
    answer_tokens: int = 8
    """Answer tokens generated (greedy) for each question."""
    chunk_tokens: int = 256
    """Tokens per stored chunk."""
    levels: tuple[str, ...] | None = None
    """Codec levels stored and measured (None: every level; ``raw`` is always stored)."""
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    """Token-eviction baselines of the rate-distortion plot (`kvcast.codec.evaluate.parse_baseline`)."""
    policies: tuple[str, ...] = DEMO_POLICIES
    """Policies simulated over the traces."""
    slo_s: float = SimulationConfig.slo_s
    """TTFT target of the scaled deployment (simulation over the traces and the scaled headline table)."""
    contexts_per_trace: int = 10
    """Contexts per trace in the simulation."""
    max_traces: int = 80
    """Traces simulated at most (taken in turn from each source folder)."""
    headline_gbps: float = 3.0
    """Bandwidth of the headline tables (a constant link), where TTFTs are compared."""
    scaled_model: str = SimulationConfig.model
    """Model shape of the scaled deployment (`kvcast.streamer.menus.MODEL_SHAPES`)."""
    scaled_gpus: tuple[str, ...] = ("h100", "a100")
    """Recompute cost models of the scaled headline table (``recompute_costs.json``; H100 measured)."""
    scaled_context_tokens: int = 16384
    """Context of the scaled headline table."""
    host_slo_s: float = 2.0
    """TTFT target of this host's sessions: the live run and the measured headline table."""
    live_policy: str = "hybrid"
    """Policy of the live run."""
    live_mean_mbps: float = 200.0
    """Mean of the live run's trace (the first trace, scaled), in Mbps: a link this CPU host's decoder keeps up
    with."""
    live_rtt_ms: float = 10.0
    """Round-trip time the server adds per request in the live run (and this host's headline sessions)."""
    host_positions: int = 4
    """Prefix lengths (0, one chunk, ...) at which this host's prefill cost is timed (`kvcast calibrate host`)."""
    host_repeats: int = 2
    """Timed repeats of this host's measurements."""
    seed: int = 0
    workers: int = 0
    """Simulation worker processes (0: one per CPU)."""

    def __post_init__(self) -> None:
        if self.text_contexts < 1:
            raise ValueError(f"text_contexts must be >= 1 (perplexity and the rate-distortion plot need a passage), "
                             f"got {self.text_contexts}")
        if self.qa_contexts < 0:
            raise ValueError(f"qa_contexts must be >= 0, got {self.qa_contexts}")
        for key in ("context_tokens", "next_tokens", "qa_lines", "answer_tokens", "chunk_tokens",
                    "contexts_per_trace", "max_traces", "scaled_context_tokens", "host_repeats"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an int >= 1, got {value!r}")
        if self.host_positions < 2:
            raise ValueError(f"host_positions must be >= 2 (the prefill fit needs two), got {self.host_positions}")
        if self.threads < 0 or self.workers < 0:
            raise ValueError("threads and workers must be >= 0")
        for key in ("slo_s", "headline_gbps", "host_slo_s", "live_mean_mbps"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{key} must be finite and > 0, got {value}")
        if not (math.isfinite(self.live_rtt_ms) and self.live_rtt_ms >= 0):
            raise ValueError(f"live_rtt_ms must be finite and >= 0, got {self.live_rtt_ms}")
        if not self.policies or not self.scaled_gpus:
            raise ValueError("policies and scaled_gpus must not be empty")
        for name in self.baselines:
            baseline_percent(name)  # EvalError (a ValueError) for an unknown baseline

    @classmethod
    def quick(cls, **changes: Any) -> DemoConfig:
        """The small preset (``kvcast demo --quick``): one 512-token passage and one 20-line question in 128-token
        chunks, 32 scored tokens, 8 traces x 4 contexts, quicker host timings; `changes` override it."""
        small = dict(text_contexts=1, context_tokens=512, next_tokens=32, qa_contexts=1, qa_lines=20,
                     chunk_tokens=128, contexts_per_trace=4, max_traces=8, host_repeats=1)
        return replace(cls(), **{**small, **changes})

    @property
    def total_contexts(self) -> int:
        return self.text_contexts + self.qa_contexts

    def to_json_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["out"] = str(self.out)
        doc["datasets"] = None if self.datasets is None else str(self.datasets)
        doc["traces"] = None if self.traces is None else [str(p) for p in self.traces]
        return doc
