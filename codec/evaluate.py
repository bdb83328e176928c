"""`kvcast eval codec`: rate and quality of every codec level on a real model and real text.

For each of N passages (deterministic, distinct offsets, each starting at a line) of a WikiText-2 split, the
model prefills `context_tokens` tokens once; that exact KV is then, per level, encoded (as one whole-context
object, and again as `chunk_tokens`-token objects for the small-object rate), decoded, put back into a cache,
and the next `continuation_tokens` tokens are fed on top (teacher-forced). Compared with the exact cache's
logits on the same tokens:

* ``kl_per_token``   mean KL(exact || decoded) of the next-token distributions (nats),
* ``top1_agreement`` fraction of positions whose argmax matches the exact cache's,
* ``ppl_change``     perplexity of the true next tokens, decoded / exact - 1.

Rate is bits per KV value, ``8 * bytes / values`` with every byte of the object (header and side information)
and payload only. Speed is Msymbols/s (values/s / 1e6) and MB/s of fp16 (2 bytes a value), median over
passages. Baselines that are not codec levels (token eviction, no context) are scored the same way.

Outputs (`write_outputs`): ``eval.json``, ``table.md``, ``rate_distortion.png`` and ``profile.json`` (the
``kvcast-profile/1`` file the simulator reads).

The model is SmolLM2-135M-Instruct unless `EvalSettings.model` names another causal LM
(`kvcast.codec.model.load_model`). The ``kvcast-*`` levels need the model's sensitivity table (`plan_levels`:
the folder `EvalSettings.tables`, then the shipped ones); for a model without one they are skipped and listed
under ``skipped_levels`` (absent when nothing is skipped).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvcast import codec
from kvcast.benchmark import finite
from kvcast.codec.corpus import encyclopedia_text
from kvcast.codec.hf import (
    KV,
    cache_from_kv,
    fingerprint_from_config,
    kv_from_cache,
    kv_tokens,
    kv_values,
    slice_kv,
)
from kvcast.codec.model import kvcast_cache_dir, load_model
from kvcast.codec.sensitivity import TABLES_DIR, SensitivityTable, TableRegistry
from kvcast.codec.settings import (  # light; re-exported
    DEFAULT_BASELINES,
    SPLITS,
    EvalError,
    EvalSettings,
    baseline_percent,
)

EVAL_FORMAT = "kvcast-eval-codec/1"
PROFILE_FORMAT = "kvcast-profile/1"
SINK_TOKENS = 4


# ----------------------------------------------------------------------------------------------- text


def find_datasets_dir(explicit: Path | None = None) -> Path:
    """The shared datasets folder: `explicit`, else ``../shared/datasets`` from the working directory or the
    repository root. Raises `EvalError` naming the places looked at."""
    if explicit is not None:
        if not explicit.is_dir():
            raise EvalError(f"datasets folder {explicit} does not exist")
        return explicit
    repo = Path(__file__).resolve().parents[1]
    candidates = [Path.cwd() / ".." / "shared" / "datasets", repo / ".." / "shared" / "datasets"]
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    looked = ", ".join(str(p.resolve()) for p in candidates)
    raise EvalError(f"datasets folder not found (looked in {looked}); pass --datasets DIR or --text-file FILE")


def synthetic_corpus_file(split: str) -> Path:
    """kvcast's generated corpus of `split` (`kvcast.codec.corpus.encyclopedia_text`) as a file in the cache
    folder (written atomically on first use)."""
    path = kvcast_cache_dir() / "corpus" / f"kvcast-synthetic-{split}.txt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(encyclopedia_text(split), encoding="utf-8")
        os.replace(tmp, path)
    return path


def read_text(path: Path) -> str:
    """A UTF-8 text file with CRLF line ends turned into LF (WikiText raw uses CRLF)."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            return handle.read().replace("\r\n", "\n")
    except FileNotFoundError:
        raise EvalError(f"text file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise EvalError(f"{path}:{line}: not UTF-8 text ({exc.reason})") from None


def corpus_path(settings: EvalSettings) -> Path:
    """The text file `settings` evaluates on: `settings.text_file`, else the split of WikiText-2 in the datasets
    folder (`find_datasets_dir`), else, when no datasets folder was given or found, kvcast's own generated
    corpus (`kvcast.codec.corpus`, written once to the cache folder as ``kvcast-synthetic-<split>.txt``)."""
    if settings.text_file is not None:
        return settings.text_file
    try:
        folder = find_datasets_dir(settings.datasets)
    except EvalError:
        if settings.datasets is not None:
            raise
        return synthetic_corpus_file(settings.split)
    path = folder / SPLITS[settings.split]
    if not path.is_file():
        raise EvalError(f"{path} is missing from the datasets folder (see its README.md)")
    return path


@dataclass(frozen=True)
class Passage:
    """`tokens` token ids of the text starting at character `char_offset` (a line start)."""

    char_offset: int
    token_ids: torch.Tensor  # [1, tokens]


def passages_from_text(text: str, tokenizer: Any, count: int, tokens: int, *, source: str = "text") -> list[Passage]:
    """`count` passages of exactly `tokens` tokens at evenly spaced, distinct, non-overlapping line starts."""
    encode = _encoder(tokenizer)
    window = max(64, tokens * 6)  # characters; WikiText averages ~4 characters a token
    usable = len(text) - window
    if usable < 0 or (count > 1 and usable // (count - 1) < window):
        needed = window * count
        raise EvalError(f"{source} has {len(text):,} characters; {count} passages of {tokens} tokens need about "
                        f"{needed:,}")
    passages: list[Passage] = []
    for i in range(count):
        offset = round(i * usable / max(count - 1, 1)) if count > 1 else 0
        if offset > 0:  # start at the next line, so every passage begins at a paragraph or heading
            nl = text.find("\n", offset, offset + window // 2)
            offset = nl + 1 if nl >= 0 else offset
        span = window
        while True:
            ids = encode(text[offset:offset + span])
            if len(ids) > tokens or offset + span >= len(text):
                break
            span *= 2
        if len(ids) < tokens:
            raise EvalError(f"{source}: the passage at character {offset} has only {len(ids)} of {tokens} tokens")
        passages.append(Passage(char_offset=offset, token_ids=torch.tensor([ids[:tokens]], dtype=torch.long)))
    return passages


def _encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizer: no length warnings, no special tokens
        return lambda s: backend.encode(s, add_special_tokens=False).ids
    return lambda s: tokenizer(s, add_special_tokens=False, verbose=False)["input_ids"]


# ----------------------------------------------------------------------------------------------- levels


@dataclass(frozen=True)
class LevelPlan:
    """The levels a run measures, the sensitivity table of its ``kvcast-*`` levels, and those it skips."""

    levels: list[str]
    table: SensitivityTable | None = None
    """The model's table (None when no kvcast-* level runs); passed to `codec.encode` as ``sensitivity``."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Level -> why it is skipped (no sensitivity table fits the model)."""

    def sensitivity(self, level: str) -> SensitivityTable | None:
        """The ``sensitivity`` of `codec.encode` for `level`: the table for a ``kvcast-*`` level, else None."""
        return _sensitivity(level, self.table)

    def note(self) -> str | None:
        """One line naming the skipped levels and why (None when none is skipped)."""
        if not self.skipped:
            return None
        reasons = list(dict.fromkeys(self.skipped.values()))
        return f"skipped {', '.join(self.skipped)}: {'; '.join(reasons)}"


def plan_levels(levels: Sequence[str] | None, fingerprint: Any, tables: Path | None = None, *,
                model_arg: str | None = None) -> LevelPlan:
    """Check `levels` (None: every codec level) and find the sensitivity table of the ``kvcast-*`` ones for
    `fingerprint` in `tables` (searched first) and the shipped tables; without one those levels are skipped.
    `model_arg` (the ``--model`` given) goes into the hint of the skip reason. `EvalError` for an unknown
    level, a missing `tables` folder or a bad table file in it."""
    known = codec.levels()
    chosen = list(levels) if levels is not None else known
    unknown = [lv for lv in chosen if lv not in known]
    if unknown:
        raise EvalError(f"unknown level(s) {', '.join(unknown)}; the codec has {', '.join(known)}")
    if tables is not None and not Path(tables).is_dir():
        raise EvalError(f"tables folder {tables} does not exist")
    grid = [lv for lv in chosen if codec.describe(lv)["quantizer"] == "grid"]
    if not grid:
        return LevelPlan(chosen)
    folders = [Path(tables), TABLES_DIR] if tables is not None else [TABLES_DIR]
    try:
        found = TableRegistry(folders).tables()
    except codec.CodecError as exc:  # a file in the folder that is not a sensitivity table
        raise EvalError(str(exc).splitlines()[0]) from None
    table = next((t for t in found if t.matches(fingerprint)), None)  # TableRegistry.find's choice
    if table is None:
        signature = getattr(fingerprint, "kv_signature", None)
        where = " or ".join(str(f) for f in folders)
        make = f"kvcast calibrate --model {model_arg} --out-dir DIR" if model_arg else "kvcast calibrate --model M " \
            "--out-dir DIR"
        reason = (f"no sensitivity table fits model {fingerprint.name!r} (KV signature "
                  f"{signature if signature is not None else 'none'}) in {where}; make one with `{make}` and "
                  "pass --tables DIR")
        return LevelPlan([lv for lv in chosen if lv not in grid], None, {lv: reason for lv in grid})
    return LevelPlan(chosen, table)


# ----------------------------------------------------------------------------------------------- scoring


def continuation_logits(model: Any, kv: KV | None, token_ids: torch.Tensor, *, position: int | None = None
                        ) -> torch.Tensor:
    """Logits ``[tokens, vocab]`` of `model` on `token_ids` fed after the cache `kv` (a fresh cache each call).

    `position` is the RoPE position of the first fed token when it differs from ``kv_tokens(kv)`` (evicted
    caches keep their tokens' original positions); with `kv` None the tokens are fed with no cache.
    """
    kept = kv_tokens(kv) if kv else 0
    n = token_ids.shape[1]
    kwargs: dict[str, Any] = {}
    if position is not None and position != kept:
        kwargs["position_ids"] = torch.arange(position, position + n).unsqueeze(0)
        kwargs["cache_position"] = torch.arange(kept, kept + n)
    cache = cache_from_kv(kv, model.config, dtype=model.dtype) if kv else None
    with torch.inference_mode():
        out = model(token_ids, cache=cache, use_cache=cache is not None, **kwargs)
    return out.logits[0].float()


@dataclass
class QualitySums:
    """Running sums over scored positions; `summary` turns them into per-token means."""

    tokens: int = 0
    kl: float = 0.0
    top1: int = 0
    nll: float = 0.0
    nll_exact: float = 0.0

    def add(self, exact_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Score `logits` against `exact_logits` (both ``[tokens, vocab]``) and the true next `targets`."""
        p_log = torch.log_softmax(exact_logits.double(), dim=-1)
        q_log = torch.log_softmax(logits.double(), dim=-1)
        kl = (p_log.exp() * (p_log - q_log)).sum(-1).clamp_min(0.0)
        self.tokens += int(targets.numel())
        self.kl += float(kl.sum())
        self.top1 += int((exact_logits.argmax(-1) == logits.argmax(-1)).sum())
        self.nll += float(-q_log.gather(-1, targets.view(-1, 1)).sum())
        self.nll_exact += float(-p_log.gather(-1, targets.view(-1, 1)).sum())

    def merge(self, other: QualitySums) -> None:
        self.tokens += other.tokens
        self.kl += other.kl
        self.top1 += other.top1
        self.nll += other.nll
        self.nll_exact += other.nll_exact

    def summary(self) -> dict[str, float]:
        if self.tokens == 0:
            return {"kl_per_token": math.nan, "top1_agreement": math.nan, "ppl": math.nan, "ppl_exact": math.nan,
                    "ppl_change": math.nan}
        ppl = math.exp(self.nll / self.tokens)
        ppl_exact = math.exp(self.nll_exact / self.tokens)
        return {"kl_per_token": self.kl / self.tokens, "top1_agreement": self.top1 / self.tokens, "ppl": ppl,
                "ppl_exact": ppl_exact, "ppl_change": ppl / ppl_exact - 1.0}


# ----------------------------------------------------------------------------------------------- baselines


@dataclass(frozen=True)
class Baseline:
    """A lossy KV treatment that is not a codec level, at an analytically known rate."""

    name: str
    keep_fraction: float  # of the context's tokens, kept at fp16 (sink + most recent tokens)
    description: str

    def apply(self, kv: KV) -> KV | None:
        """The kept tokens of `kv` (None: nothing kept)."""
        tokens = kv_tokens(kv)
        keep = int(round(self.keep_fraction * tokens))
        if keep <= 0:
            return None
        sink = min(SINK_TOKENS, keep)
        index = torch.cat([torch.arange(sink), torch.arange(tokens - (keep - sink), tokens)])
        return [(k[:, :, index].half().to(k.dtype), v[:, :, index].half().to(v.dtype)) for k, v in kv]

    def bits_per_value(self, kv: KV) -> float:
        """fp16 bits of the kept tokens per value of the whole context (kept positions are implicit)."""
        tokens = kv_tokens(kv)
        return 16.0 * int(round(self.keep_fraction * tokens)) / tokens


def parse_baseline(name: str) -> Baseline:
    """``recent-P%`` (keep the first 4 and the latest tokens, P% of the context, at fp16) or ``no-context``."""
    pct = baseline_percent(name)  # EvalError for an unknown name
    if pct is None:
        return Baseline(name, 0.0, "no KV at all: the continuation is scored without the context")
    return Baseline(name, pct / 100.0, f"token eviction: first {SINK_TOKENS} + most recent tokens, {pct:g}% "
                    "of the context, at fp16 (StreamingLLM-style)")


# ----------------------------------------------------------------------------------------------- the run


@dataclass
class _Row:
    name: str
    kind: str  # "level" or "baseline"
    quality: QualitySums = field(default_factory=QualitySums)
    whole_bytes: dict[str, int] = field(default_factory=lambda: {"header": 0, "side": 0, "payload": 0, "total": 0})
    chunk_bytes: dict[str, int] = field(default_factory=lambda: {"header": 0, "side": 0, "payload": 0, "total": 0})
    whole_values: int = 0
    chunk_values: int = 0
    bits_baseline: list[float] = field(default_factory=list)
    encode_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    values: list[int] = field(default_factory=list)
    per_passage: list[dict[str, Any]] = field(default_factory=list)


def run_codec_eval(settings: EvalSettings, *, model: Any = None, tokenizer: Any = None, model_name: str | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Measure every level and baseline of `settings`; returns the ``kvcast-eval-codec/1`` results dict.

    `model`/`tokenizer` default to the model `settings.model` names (`kvcast.codec.model.load_model`: SmolLM2-
    135M-Instruct by default), which raises `kvcast.codec.model.ModelUnavailable` when it cannot be loaded.
    ``kvcast-*`` levels without a sensitivity table for the model are skipped (`plan_levels`).
    """
    started = time.perf_counter()
    known = codec.levels()
    for level in settings.levels or ():
        if level not in known:
            raise EvalError(f"unknown level {level!r}; the codec has {', '.join(known)}")
    if settings.tables is not None and not settings.tables.is_dir():
        raise EvalError(f"tables folder {settings.tables} does not exist")
    baselines = [parse_baseline(b) for b in settings.baselines]
    source = corpus_path(settings)
    text = read_text(source)
    if model is not None and tokenizer is None:
        raise EvalError("pass the model's tokenizer along with the model")
    model_arg = None  # for the hint of a skipped level: the --model that loaded it
    if model is None:
        loaded = load_model(settings.model, progress=progress)
        model, tokenizer, model_name, model_arg = loaded.model, loaded.tokenizer, loaded.name, settings.model
    fingerprint = fingerprint_from_config(model.config, name=model_name, dtype=model.dtype)
    plan = plan_levels(settings.levels, fingerprint, settings.tables, model_arg=model_arg)
    levels = plan.levels
    if not levels and not baselines:
        raise EvalError(f"nothing left to evaluate ({plan.note()})")
    need = settings.context_tokens + settings.continuation_tokens + 1
    passages = passages_from_text(text, tokenizer, settings.passages, need, source=str(source))

    rows = [_Row(level, "level") for level in levels] + [_Row(b.name, "baseline") for b in baselines]
    steps = len(passages) * (1 + len(rows))
    with _progress(progress, steps) as advance:
        for index, passage in enumerate(passages):
            advance(f"passage {index + 1}/{len(passages)}: exact prefill")
            ctx = passage.token_ids[:, :settings.context_tokens]
            fed = passage.token_ids[:, settings.context_tokens:need - 1]
            targets = passage.token_ids[0, settings.context_tokens + 1:need]
            with torch.inference_mode():
                kv = kv_from_cache(model(ctx, use_cache=True, logits_to_keep=1).cache)
            exact = continuation_logits(model, kv, fed)
            if index == 0:
                warm_up_levels(levels, kv, fingerprint, plan.table)
            for row in rows[:len(levels)]:
                advance(f"passage {index + 1}/{len(passages)}: {row.name}")
                _score_level(row, kv, fed, targets, exact, model, fingerprint, settings, plan.table)
            for row, baseline in zip(rows[len(levels):], baselines):
                advance(f"passage {index + 1}/{len(passages)}: {row.name}")
                sums = QualitySums()
                kept = baseline.apply(kv)
                sums.add(exact, continuation_logits(model, kept, fed, position=settings.context_tokens), targets)
                row.quality.merge(sums)
                row.bits_baseline.append(baseline.bits_per_value(kv))
                row.per_passage.append({"passage": index, **sums.summary()})

    exact_ppl = next((r.quality.summary()["ppl_exact"] for r in rows), math.nan)
    results = {
        "format": EVAL_FORMAT,
        "model": {"name": fingerprint.name, "layers": fingerprint.layers, "kv_heads": fingerprint.kv_heads,
                  "head_dim": fingerprint.head_dim, "dtype": fingerprint.dtype, "rope": fingerprint.rope},
        "settings": {
            "context_tokens": settings.context_tokens, "continuation_tokens": settings.continuation_tokens,
            "passages": settings.passages, "chunk_tokens": settings.chunk_tokens, "split": settings.split
            if settings.text_file is None else None, "source": str(source),
            "char_offsets": [p.char_offset for p in passages], "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "exact": {"ppl": exact_ppl},
        "rows": [_row_result(row, {b.name: b for b in baselines}) for row in rows],
        "elapsed_s": time.perf_counter() - started,
    }
    if plan.skipped:  # only then, so a run that skips nothing writes what it always did
        results["skipped_levels"] = dict(plan.skipped)
    return results


def _score_level(row: _Row, kv: KV, fed: torch.Tensor, targets: torch.Tensor, exact: torch.Tensor, model: Any,
                 fingerprint: Any, settings: EvalSettings, table: SensitivityTable | None = None) -> None:
    sensitivity = _sensitivity(row.name, table)
    t0 = time.perf_counter()
    data = codec.encode(kv, row.name, model=fingerprint, sensitivity=sensitivity)
    t1 = time.perf_counter()
    decoded = codec.decode(data, dtype=torch.float32, expect_model=fingerprint, sensitivity=sensitivity)
    t2 = time.perf_counter()
    info = codec.inspect(data)
    values = int(info["values"])
    if values != kv_values(kv):
        raise EvalError(f"level {row.name}: the object holds {values} values, the KV {kv_values(kv)}")
    for role in row.whole_bytes:
        row.whole_bytes[role] += int(info["sizes"][role])
    row.whole_values += values
    row.encode_s.append(t1 - t0)
    row.decode_s.append(t2 - t1)
    row.values.append(values)
    tokens = kv_tokens(kv)
    for start in range(0, tokens, settings.chunk_tokens):  # small objects: rate only
        stop = min(start + settings.chunk_tokens, tokens)
        part = slice_kv(kv, start, stop)
        chunk_info = codec.inspect(codec.encode(part, row.name, model=fingerprint, token_start=start,
                                                context_end=tokens, sensitivity=sensitivity))
        for role in row.chunk_bytes:
            row.chunk_bytes[role] += int(chunk_info["sizes"][role])
        row.chunk_values += int(chunk_info["values"])
    sums = QualitySums()
    sums.add(exact, continuation_logits(model, decoded, fed), targets)
    row.quality.merge(sums)
    row.per_passage.append({"passage": len(row.per_passage), "bits_per_value": 8 * info["sizes"]["total"] / values,
                            "encode_s": t1 - t0, "decode_s": t2 - t1, **sums.summary()})


def warm_up_levels(levels: Sequence[str], kv: KV, fingerprint: Any, table: SensitivityTable | None = None) -> None:
    """Start the coder processes and run one small encode/decode per level, so one-time set-up (extension
    build, worker start, table load) is not timed. `table`: the ``kvcast-*`` levels' table (None: the codec
    finds one by `fingerprint`)."""
    codec.default_codec().pool.warm_up()
    part = slice_kv(kv, 0, min(16, kv_tokens(kv)))
    for level in levels:
        sensitivity = _sensitivity(level, table)
        codec.decode(codec.encode(part, level, model=fingerprint, sensitivity=sensitivity), sensitivity=sensitivity)


def _sensitivity(level: str, table: SensitivityTable | None) -> SensitivityTable | None:
    """`table` for a grid level, None for the others (they take none)."""
    return table if table is not None and codec.describe(level)["quantizer"] == "grid" else None


def _row_result(row: _Row, baselines: dict[str, Baseline]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": row.name, "kind": row.kind}
    if row.kind == "level":
        encode_rate = [v / s for v, s in zip(row.values, row.encode_s) if s > 0]
        decode_rate = [v / s for v, s in zip(row.values, row.decode_s) if s > 0]
        out.update({
            "bits_per_value": 8 * row.whole_bytes["total"] / row.whole_values,
            "bits_per_value_payload": 8 * row.whole_bytes["payload"] / row.whole_values,
            "bits_per_value_chunk": 8 * row.chunk_bytes["total"] / row.chunk_values,
            "bits_per_value_payload_chunk": 8 * row.chunk_bytes["payload"] / row.chunk_values,
            "bytes_whole_mean": row.whole_bytes["total"] / len(row.values),
            "bytes_by_role_whole": dict(row.whole_bytes),
            "bytes_by_role_chunk": dict(row.chunk_bytes),
            "encode_msym_per_s": statistics.median(encode_rate) / 1e6 if encode_rate else math.nan,
            "decode_msym_per_s": statistics.median(decode_rate) / 1e6 if decode_rate else math.nan,
            "encode_mb_per_s": 2 * statistics.median(encode_rate) / 1e6 if encode_rate else math.nan,
            "decode_mb_per_s": 2 * statistics.median(decode_rate) / 1e6 if decode_rate else math.nan,
        })
    else:
        bits = statistics.mean(row.bits_baseline)
        out.update({"description": baselines[row.name].description, "bits_per_value": bits,
                    "bits_per_value_payload": bits, "bits_per_value_chunk": None,
                    "bits_per_value_payload_chunk": None, "encode_msym_per_s": None, "decode_msym_per_s": None,
                    "encode_mb_per_s": None, "decode_mb_per_s": None})
    out.update(row.quality.summary())
    out["per_passage"] = row.per_passage
    return out


class _progress:
    """A rich progress bar (or nothing) whose `advance(description)` moves one step."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self.bar = None

    def __enter__(self) -> Callable[[str], None]:
        if not self.enabled:
            return lambda description: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), transient=False)
        self.bar.__enter__()
        task = self.bar.add_task("eval codec", total=self.total)
        started = [False]

        def advance(description: str) -> None:
            if started[0]:
                self.bar.advance(task)
            started[0] = True
            self.bar.update(task, description=description)

        self._finish = lambda: self.bar.update(task, completed=self.total, description="eval codec: done")
        return advance

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            if exc[0] is None:
                self._finish()
            self.bar.__exit__(*exc)


# ----------------------------------------------------------------------------------------------- outputs


def profile_from_results(results: dict[str, Any]) -> dict[str, Any]:
    """The ``kvcast-profile/1`` dict the simulator reads: every codec level, best quality first."""
    model = results["model"]
    levels = [{
        "level": r["name"], "bits_per_value": r["bits_per_value"],
        "bits_per_value_payload": r["bits_per_value_payload"], "quality_loss": r["kl_per_token"],
        "top1_agreement": r["top1_agreement"], "kl_per_token": r["kl_per_token"], "ppl_change": r["ppl_change"],
        "encode_msym_per_s": r["encode_msym_per_s"], "decode_msym_per_s": r["decode_msym_per_s"],
    } for r in results["rows"] if r["kind"] == "level"]
    return {"format": PROFILE_FORMAT,
            "model": {k: model[k] for k in ("name", "layers", "kv_heads", "head_dim")},
            "object_tokens": results["settings"]["context_tokens"], "quality_metric": "kl_per_token",
            "levels": levels}


def markdown_table(results: dict[str, Any]) -> str:
    """The results as a markdown table (one row per level, then baselines)."""
    s = results["settings"]
    whole, chunk = s["context_tokens"], s["chunk_tokens"]
    head = (f"| level | bits/value ({whole}-tok, all) | payload | bits/value ({chunk}-tok, all) | payload | "
            f"KL/token | top-1 | ΔPPL | encode Msym/s | decode Msym/s | encode MB/s | decode MB/s |")
    lines = [head, "|" + "---|" * 12]
    for r in results["rows"]:
        lines.append("| " + " | ".join([
            r["name"] if r["kind"] == "level" else f"*{r['name']}* (baseline)",
            _fmt(r["bits_per_value"], 2), _fmt(r["bits_per_value_payload"], 2), _fmt(r["bits_per_value_chunk"], 2),
            _fmt(r["bits_per_value_payload_chunk"], 2), _fmt_kl(r["kl_per_token"]),
            _fmt(100 * r["top1_agreement"], 1) + "%", _fmt(100 * r["ppl_change"], 2, signed=True) + "%",
            _fmt(r["encode_msym_per_s"], 1), _fmt(r["decode_msym_per_s"], 1), _fmt(r["encode_mb_per_s"], 1),
            _fmt(r["decode_mb_per_s"], 1)]) + " |")
    m = results["model"]
    lines.append("")
    lines.append(f"{m['name']} ({m['layers']} layers, {m['kv_heads']} KV heads x {m['head_dim']}), "
                 f"{s['passages']} passages of {s['source']} ({s['split'] or 'text file'}), {whole}-token contexts, "
                 f"next {s['continuation_tokens']} tokens teacher-forced; exact PPL {results['exact']['ppl']:.3f}. "
                 f"KL(exact || decoded) in nats per token; ΔPPL relative; speed = median over passages of "
                 f"{whole}-token objects, {s['torch_threads']} torch threads.")
    if results.get("skipped_levels"):
        skipped = results["skipped_levels"]
        lines.append("")
        lines.append(f"Skipped {', '.join(skipped)}: {next(iter(skipped.values()))}.")
    return "\n".join(lines) + "\n"


def rich_table(results: dict[str, Any]):
    """The main columns as a `rich.table.Table`."""
    from rich.table import Table

    s = results["settings"]
    table = Table(title=f"kvcast eval codec — {results['model']['name']}, {s['passages']} x {s['context_tokens']} "
                        f"tokens, next {s['continuation_tokens']}")
    for col in ("level", f"bits/val {s['context_tokens']}", "payload", f"bits/val {s['chunk_tokens']}", "KL/token",
                "top-1", "ΔPPL", "enc Msym/s", "dec Msym/s"):
        table.add_column(col, justify="left" if col == "level" else "right")
    for r in results["rows"]:
        table.add_row(r["name"] if r["kind"] == "level" else f"[dim]{r['name']}[/dim]", _fmt(r["bits_per_value"], 2),
                      _fmt(r["bits_per_value_payload"], 2), _fmt(r["bits_per_value_chunk"], 2),
                      _fmt_kl(r["kl_per_token"]), _fmt(100 * r["top1_agreement"], 1) + "%",
                      _fmt(100 * r["ppl_change"], 2, signed=True) + "%", _fmt(r["encode_msym_per_s"], 1),
                      _fmt(r["decode_msym_per_s"], 1))
    return table


def plot_rate_distortion(results: dict[str, Any], path: Path) -> None:
    """Two panels, bits/value (whole objects, all side information) vs KL/token and vs top-1 agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    kl_floor = 1e-8
    fig, (ax_kl, ax_top) = plt.subplots(1, 2, figsize=(13, 5.2))
    families: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        family = "baseline" if r["kind"] == "baseline" else re.sub(r"-\d+$", "", r["name"])
        families.setdefault(family, []).append(r)
    label_offsets = [((5, 4), "left"), ((-5, -11), "right")]  # alternate sides so neighbouring labels part
    for number, (family, members) in enumerate(families.items()):
        offset, align = label_offsets[number % 2]
        members = sorted(members, key=lambda r: r["bits_per_value"])
        xs = [r["bits_per_value"] for r in members]
        kls = [max(r["kl_per_token"], kl_floor) for r in members]
        tops = [100 * r["top1_agreement"] for r in members]
        style = dict(marker="s", linestyle="none", color="grey") if family == "baseline" else dict(marker="o")
        ax_kl.plot(xs, kls, label=family, **style)
        ax_top.plot(xs, tops, label=family, **style)
        for r, x, k, t in zip(members, xs, kls, tops):
            ax_kl.annotate(r["name"], (x, k), textcoords="offset points", xytext=offset, ha=align, fontsize=7)
            ax_top.annotate(r["name"], (x, t), textcoords="offset points", xytext=offset, ha=align, fontsize=7)
    s = results["settings"]
    ax_kl.set_yscale("log")
    ax_kl.set_ylabel(f"KL(exact || decoded) per token, nats (floor {kl_floor:g})")
    ax_top.set_ylabel("top-1 agreement with the exact cache (%)")
    for ax in (ax_kl, ax_top):
        ax.set_xlabel(f"bits per KV value ({s['context_tokens']}-token objects, all side information)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['model']['name']}: rate vs distortion, {s['passages']} passages, next "
                 f"{s['continuation_tokens']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``eval.json``, ``table.md``, ``rate_distortion.png`` and ``profile.json`` into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "eval.json", "markdown": out_dir / "table.md",
             "plot": out_dir / "rate_distortion.png", "profile": out_dir / "profile.json"}
    paths["json"].write_text(json.dumps(finite(results), indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown_table(results), encoding="utf-8")
    plot_rate_distortion(results, paths["plot"])
    paths["profile"].write_text(json.dumps(finite(profile_from_results(results)), indent=2) + "\n",
                                encoding="utf-8")
    return paths


def _fmt(value: Any, digits: int, *, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _fmt_kl(value: float) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:.4f}" if value >= 1e-3 else f"{value:.2e}"


__all__ = ["DEFAULT_BASELINES", "EvalError", "EvalSettings", "LevelPlan", "Passage", "QualitySums",
           "continuation_logits", "find_datasets_dir", "markdown_table", "parse_baseline", "passages_from_text",
           "plan_levels", "plot_rate_distortion", "profile_from_results", "read_text", "rich_table", "run_codec_eval",
           "write_outputs"]
