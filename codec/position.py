"""`kvcast eval position`: the quality loss of each codec level by the position of the lossy chunk.

A context of ``chunks x chunk_tokens`` tokens (SmolLM2's 8K window by default: 8 x 1,000 tokens, then 128
continuation tokens, 8,128 positions of its 8,192) is prefilled once per document; its exact KV and the exact
continuation logits are kept. Then, per chunk i and per lossy level L, only chunk i is encoded as its own object
(``token_start`` = its first token, ``context_end`` = the context's end, so the ``kvcast-*`` levels spend bits by
distance from the end exactly as in a chunked stream), decoded and put back between the exact chunks; the next
``continuation_tokens`` tokens are fed on top (teacher-forced) and scored against the exact cache's logits
(`kvcast.codec.evaluate.QualitySums`: KL per token, top-1 agreement). Only that continuation is re-run: the exact
prefix is computed once per document.

Two more measurements check the additive per-chunk model the simulator uses:

* **plans** (``kind: "plan"``): mixed plans (alternating levels, lossy front + exact back, ...) decoded
  together; their measured KL is compared with the sum of the single-chunk KLs of the same document (``sum``)
  and with the cross-document mean curve (``model``, what a profile predicts);
* **text over a lossy prefix** (``kind: "text"``): chunks ``0..i-1`` decoded from level L, chunk i (or a tail of
  chunks) *recomputed from its text* by the model attending to that lossy prefix, the rest exact; compared with
  the same lossy prefix and an exact chunk i. ``penalty = (KL_text - KL_prefix) / KL_prefix`` is the extra loss
  a recomputed chunk inherits, relative to the loss of the prefix itself.

Documents: ``wikitext_documents`` passages of WikiText-2 test (`kvcast.codec.evaluate.passages_from_text`) and
``longchat_documents`` prompts of CacheGen's LongChat set (``cachegen-longchat/longchat.jsonl``, the first prompts
long enough, cut to the needed tokens), or passages of ``text_file``.

Every measurement is one JSON line in ``positions.jsonl`` in the output folder, written as soon as it is made
and keyed by the settings and the document's tokens: a run that stops is continued by running it again (rows
already there are not measured again). The key does not see the codec's code: after a codec change, use a fresh
output folder. `summarise` turns the rows into means per (level, chunk) with 95%
t-intervals over documents, the plan check, the text penalty and the ``position_quality`` entry of a
``kvcast-profile/1`` file (see `kvcast.streamer.profile`): per level, points ``(distance_tokens,
quality_loss, kl_per_token, top1_agreement)`` where ``distance_tokens`` is the distance of the chunk's centre from
the context's end and ``quality_loss = kl_per_token x context_tokens / chunk_tokens x sqrt(additivity_factor)``
is the whole-context equivalent (the simulator's token-weighted mean of these over a plan's chunks is the sum of
the single-chunk KLs times that square root). ``additivity_factor`` is the level's measured whole-context KL over
the sum of its single-chunk KLs: about 1 for int8 and the CacheGen levels, 1.3-15 for the ``kvcast-*`` levels,
whose errors add up faster than linearly. No per-chunk number fits both a lone lossy chunk (factor 1) and a whole
context at one level (the full factor); the square root errs by at most its value either way. The first chunk
(it holds the attention sinks) is kept apart as ``first_chunk`` and the points come from the others.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kvcast import codec
from kvcast.benchmark import finite
from kvcast.codec.evaluate import (
    QualitySums,
    continuation_logits,
    corpus_path,
    find_datasets_dir,
    passages_from_text,
    plan_levels,
    read_text,
)
from kvcast.codec.hf import KV, cache_from_kv, fingerprint_from_config, kv_from_cache, slice_kv
from kvcast.codec.model import load_model
from kvcast.codec.settings import EvalError, EvalSettings, PositionSettings

__all__ = ["POSITION_FORMAT", "Document", "PositionSettings", "load_documents", "markdown_table", "merge_profile",
           "plan_specs", "plot_positions", "profile_entry", "run_position_eval", "summarise", "write_outputs"]

POSITION_FORMAT = "kvcast-eval-position/1"
LONGCHAT_FILE = "cachegen-longchat/longchat.jsonl"
EXACT = "exact"
TEXT = "text"
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


# ----------------------------------------------------------------------------------------------- documents


@dataclass(frozen=True)
class Document:
    """One measured text: `token_ids` ``[1, context + continuation + 1]`` and where they came from."""

    name: str
    token_ids: torch.Tensor

    @property
    def digest(self) -> str:
        """A short hash of the tokens (part of every row's key)."""
        return hashlib.sha256(self.token_ids.numpy().astype("int64").tobytes()).hexdigest()[:16]


def load_documents(settings: PositionSettings, tokenizer: Any) -> list[Document]:
    """The documents of `settings`, each exactly ``context + continuation + 1`` tokens."""
    need = settings.context_tokens + settings.continuation_tokens + 1
    docs: list[Document] = []
    if settings.wikitext_documents:
        source = corpus_path(EvalSettings(split="test", datasets=settings.datasets, text_file=settings.text_file))
        for p in passages_from_text(read_text(source), tokenizer, settings.wikitext_documents, need,
                                    source=str(source)):
            label = "text" if settings.text_file is not None else "wikitext"
            docs.append(Document(f"{label}@{p.char_offset}", p.token_ids))
    if settings.longchat_documents:
        path = find_datasets_dir(settings.datasets) / LONGCHAT_FILE
        if not path.is_file():
            raise EvalError(f"{path} is missing from the datasets folder (see its README.md)")
        encode = _encoder(tokenizer)
        for line in read_text(path).splitlines():
            if len(docs) >= settings.wikitext_documents + settings.longchat_documents:
                break
            case = json.loads(line)
            ids = encode(case["prompt"])
            if len(ids) >= need:
                docs.append(Document(f"longchat#{case['test_id']}", torch.tensor([ids[:need]], dtype=torch.long)))
        if len(docs) < settings.wikitext_documents + settings.longchat_documents:
            raise EvalError(f"{path} has fewer than {settings.longchat_documents} prompts of {need} tokens")
    return docs


def _encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda s: backend.encode(s, add_special_tokens=False).ids
    return lambda s: tokenizer(s, add_special_tokens=False, verbose=False)["input_ids"]


# ----------------------------------------------------------------------------------------------- plans


def plan_specs(chunks: int, a: str, b: str) -> dict[str, tuple[str, ...]]:
    """The mixed plans of the check: per chunk a level name or ``exact``, built from levels `a` and `b`."""
    half, third = chunks // 2, max(1, chunks // 3)
    return {
        f"alternate {a}/exact": tuple(a if i % 2 == 0 else EXACT for i in range(chunks)),
        f"alternate {b}/{a}": tuple(b if i % 2 == 0 else a for i in range(chunks)),
        f"front {b}, back exact": tuple(b if i < half else EXACT for i in range(chunks)),
        f"front exact, back {a}": tuple(EXACT if i < half else a for i in range(chunks)),
        f"ramp {b}, {a}, exact": tuple(b if i < third else a if i < chunks - third else EXACT
                                       for i in range(chunks)),
        f"all {a}": (a,) * chunks,
        f"all {b}": (b,) * chunks,
    }


def text_cases(chunks: int) -> dict[str, tuple[int, int]]:
    """Text-over-lossy-prefix cases: name -> (first text chunk, text chunks); the chunks before it are lossy, the
    ones after it exact."""
    return {"last chunk text": (chunks - 1, 1), "middle chunk text": (chunks // 2, 1)}


# ----------------------------------------------------------------------------------------------- the run


class _Rows:
    """The JSONL cache: rows already measured under the same key are returned instead of measured again."""

    def __init__(self, path: Path, run_key: str) -> None:
        self.path, self.run_key = path, run_key
        self.rows: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interrupted run
                if row.get("run_key") == run_key:
                    self.rows[row["key"]] = row

    def get(self, key: str) -> dict[str, Any] | None:
        return self.rows.get(key)

    def put(self, key: str, row: dict[str, Any]) -> dict[str, Any]:
        row = {"run_key": self.run_key, "key": key, **row}
        self.rows[key] = row
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(finite(row)) + "\n")
        return row


def _assemble(parts: Sequence[KV]) -> KV:
    """The chunks' KV joined along the tokens."""
    return [(torch.cat([p[layer][0] for p in parts], dim=2), torch.cat([p[layer][1] for p in parts], dim=2))
            for layer in range(len(parts[0]))]


class _DocumentRun:
    """One document's exact prefix (computed once, on first use) and the measurements made over it."""

    def __init__(self, doc: Document, settings: PositionSettings, model: Any, fingerprint: Any, plan: Any,
                 keep_levels: Sequence[str], say: Callable[[str], None]) -> None:
        self.doc, self.settings, self.model, self.fingerprint, self.plan = doc, settings, model, fingerprint, plan
        self.keep_levels, self.say = set(keep_levels), say
        ctx, cont = settings.context_tokens, settings.continuation_tokens
        self.fed = doc.token_ids[:, ctx:ctx + cont]
        self.targets = doc.token_ids[0, ctx + 1:ctx + cont + 1]
        self._kv: KV | None = None
        self._exact: torch.Tensor | None = None
        self._decoded: dict[tuple[int, str], tuple[KV, int]] = {}

    def kv(self) -> KV:
        """The exact KV of the context (prefilled on first use)."""
        if self._kv is None:
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = self.model(self.doc.token_ids[:, :self.settings.context_tokens], use_cache=True,
                                 logits_to_keep=1)
            self._kv = [(k.clone(), v.clone()) for k, v in kv_from_cache(out.cache)]
            self._exact = continuation_logits(self.model, self._kv, self.fed)
            self.say(f"{self.doc.name}: exact prefill of {self.settings.context_tokens} tokens in "
                     f"{time.perf_counter() - t0:.0f} s")
        return self._kv

    def exact_chunk(self, i: int) -> KV:
        n = self.settings.chunk_tokens
        return slice_kv(self.kv(), i * n, (i + 1) * n)

    def chunk(self, i: int, level: str) -> tuple[KV, int]:
        """Chunk i encoded as its own object at `level` (its place in the context given), decoded; and the
        object's bytes. The plan levels' chunks are kept for the plans and text cases."""
        if (i, level) in self._decoded:
            return self._decoded[(i, level)]
        n = self.settings.chunk_tokens
        data = codec.encode(self.exact_chunk(i), level, model=self.fingerprint, token_start=i * n,
                            context_end=self.settings.context_tokens, sensitivity=self.plan.sensitivity(level))
        out = (codec.decode(data, dtype=torch.float32, expect_model=self.fingerprint,
                            sensitivity=self.plan.sensitivity(level)), len(data))
        if level in self.keep_levels:
            self._decoded[(i, level)] = out
        return out

    def score(self, kv: KV) -> dict[str, float]:
        """KL, top-1 and perplexity change of the continuation over `kv` against the exact cache."""
        self.kv()
        sums = QualitySums()
        sums.add(self._exact, continuation_logits(self.model, kv, self.fed), self.targets)
        return sums.summary()

    def single(self, i: int, level: str) -> dict[str, Any]:
        """Only chunk i lossy."""
        n, ctx = self.settings.chunk_tokens, self.settings.context_tokens
        part, nbytes = self.chunk(i, level)
        kv = _assemble([part if j == i else self.exact_chunk(j) for j in range(self.settings.chunks)])
        values = sum(k.numel() + v.numel() for k, v in part)
        return {"kind": "chunk", "level": level, "chunk": i, "token_start": i * n, "tokens": n,
                "distance_tokens": ctx - (i * n + n / 2), "bits_per_value": 8 * nbytes / values, **self.score(kv)}

    def mixed(self, name: str, actions: Sequence[str]) -> dict[str, Any]:
        """Every chunk at its action's level (``exact``: as prefilled)."""
        kv = _assemble([self.exact_chunk(i) if act == EXACT else self.chunk(i, act)[0]
                        for i, act in enumerate(actions)])
        return {"kind": "plan", "plan": name, "actions": list(actions), **self.score(kv)}

    def text(self, name: str, level: str, first: int, count: int) -> dict[str, Any]:
        """Chunks ``0..first-1`` at `level`, chunks ``first..first+count-1`` recomputed from their text over that
        lossy prefix, the rest exact; and the same with those chunks exact."""
        n = self.settings.chunk_tokens
        prefix = [self.chunk(i, level)[0] for i in range(first)]
        tail = [self.exact_chunk(i) for i in range(first + count, self.settings.chunks)]
        with_exact = self.score(_assemble(prefix + [self.exact_chunk(i) for i in range(first, first + count)] + tail))
        start, stop = first * n, (first + count) * n
        cache = cache_from_kv(_assemble(prefix), self.model.config, dtype=self.model.dtype)
        with torch.inference_mode():
            out = self.model(self.doc.token_ids[:, start:stop], cache=cache, use_cache=True, logits_to_keep=1)
        recomputed = slice_kv(kv_from_cache(out.cache), start, stop)
        with_text = self.score(_assemble(prefix + [recomputed] + tail))
        kl_p, kl_t = with_exact["kl_per_token"], with_text["kl_per_token"]
        return {"kind": "text", "case": name, "level": level, "text_chunk": first, "text_chunks": count,
                "prefix": with_exact, **with_text, "penalty": (kl_t - kl_p) / kl_p if kl_p > 0 else math.nan}


def run_position_eval(settings: PositionSettings, out_dir: Path, *, model: Any = None, tokenizer: Any = None,
                      model_name: str | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure `settings` (rows cached in ``out_dir/positions.jsonl``); returns the `summarise` dict.

    `model`/`tokenizer` default to the model `settings.model` names (SmolLM2-135M-Instruct). `log` gets one line
    per measurement (default: stderr)."""
    started = time.perf_counter()
    say = log if log is not None else (lambda m: print(m, file=sys.stderr, flush=True))
    if model is not None and tokenizer is None:
        raise EvalError("pass the model's tokenizer along with the model")
    model_arg = None
    if model is None:
        loaded = load_model(settings.model, progress=False)
        model, tokenizer, model_name, model_arg = loaded.model, loaded.tokenizer, loaded.name, settings.model
    limit = getattr(model.config, "max_position_embeddings", None)
    positions = settings.context_tokens + settings.continuation_tokens
    if limit is not None and positions > limit:
        raise EvalError(f"{settings.chunks} x {settings.chunk_tokens} context + {settings.continuation_tokens} "
                        f"continuation tokens = {positions} positions; the model has {limit}")
    fingerprint = fingerprint_from_config(model.config, name=model_name, dtype=model.dtype)
    lossy = settings.levels if settings.levels is not None else tuple(lv for lv in codec.levels() if lv != "raw")
    plan = plan_levels(lossy, fingerprint, settings.tables, model_arg=model_arg)
    levels = tuple(plan.levels)
    if not levels:
        raise EvalError(f"no level left to measure ({plan.note()})")
    if plan.skipped:
        say(plan.note() or "")
    a, b = (lv if lv in levels else levels[min(i, len(levels) - 1)] for i, lv in enumerate(settings.plan_levels))
    plans = plan_specs(settings.chunks, a, b) if settings.plans else {}
    if settings.plans:  # the whole context at each level: the additivity factor of its curve
        plans.update({f"all {lv}": (lv,) * settings.chunks for lv in levels})
    cases = text_cases(settings.chunks) if settings.text_penalty else {}
    measured = settings.measured_chunks()
    docs = load_documents(settings, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_key = hashlib.sha256(json.dumps([fingerprint.name, settings.chunk_tokens, settings.chunks,
                                         settings.continuation_tokens], sort_keys=True).encode()).hexdigest()[:12]
    rows = _Rows(out_dir / "positions.jsonl", run_key)
    total = len(docs) * (len(levels) * len(measured) + len(plans) + len(cases) * len({a, b}))
    done = 0
    for d_index, doc in enumerate(docs):
        run = _DocumentRun(doc, settings, model, fingerprint, plan, (a, b), say)
        jobs: list[tuple[str, str, Callable[..., dict[str, Any]], tuple[Any, ...]]] = []
        for level in levels:
            for i in measured:
                jobs.append((f"chunk/{i}/{level}", f"chunk {i} {level}", run.single, (i, level)))
        for name, actions in plans.items():
            jobs.append((f"plan/{'|'.join(actions)}", f"plan {name}", run.mixed, (name, actions)))
        for level in dict.fromkeys((a, b)) if cases else ():
            for name, (first, count) in cases.items():
                jobs.append((f"text/{first}/{count}/{level}", f"text {name} over {level}", run.text,
                             (name, level, first, count)))
        for key, what, measure, args in jobs:
            key = f"{doc.digest}/{key}"
            row = rows.get(key)
            note = "cached"
            if row is None:
                row = rows.put(key, {"doc": doc.name, "doc_index": d_index, "doc_digest": doc.digest,
                                     **measure(*args)})
                note = f"{time.perf_counter() - started:6.0f} s"
            done += 1
            say(f"[{done}/{total}] {doc.name} {what}: KL {row['kl_per_token']:.3g}, top-1 {row['top1_agreement']:.3f} "
                f"({note})")
    digests = {d.digest for d in docs}
    results = summarise([r for r in rows.rows.values() if r["doc_digest"] in digests], settings, levels,
                        model_name=fingerprint.name)
    results["elapsed_s"] = time.perf_counter() - started
    if plan.skipped:
        results["skipped_levels"] = dict(plan.skipped)
    return results


# ----------------------------------------------------------------------------------------------- summary


def _mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and its 95% t-interval (the mean twice for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    df = len(values) - 1
    t = _T975[max(k for k in _T975 if k <= df)]
    half = t * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def _interpolate(points: Sequence[tuple[float, float]], distance: float) -> float:
    """Linear in distance between `points` ``(distance, value)`` sorted by distance; the nearest value outside
    (the rule of `kvcast.streamer.profile.PositionCurve`)."""
    if distance <= points[0][0]:
        return points[0][1]
    for (d0, v0), (d1, v1) in zip(points, points[1:]):
        if distance <= d1:
            return v0 + (distance - d0) / (d1 - d0) * (v1 - v0)
    return points[-1][1]


def _predict(kl: dict[int, float], chunk: int, settings: PositionSettings) -> float:
    """The single-chunk KL of `chunk` from the measured ones `kl` (chunk -> KL): measured, else the first chunk
    is only itself, and the others are interpolated by distance between the measured chunks other than 0."""
    if chunk in kl:
        return kl[chunk]
    n, ctx = settings.chunk_tokens, settings.context_tokens
    points = sorted((ctx - (i * n + n / 2), v) for i, v in kl.items() if i != 0 or len(kl) == 1)
    return _interpolate(points, ctx - (chunk * n + n / 2))


def summarise(rows: Sequence[dict[str, Any]], settings: PositionSettings, levels: Sequence[str], *,
              model_name: str = "") -> dict[str, Any]:
    """Means over documents per (level, chunk), the plan check, the text penalty and the profile entry."""
    measured = set(settings.measured_chunks())
    chunk_rows = [r for r in rows if r["kind"] == "chunk" and r["chunk"] in measured and r["level"] in levels]
    docs = sorted({r["doc"] for r in rows})
    by_level: dict[str, list[dict[str, Any]]] = {}
    mean_kl: dict[str, dict[int, float]] = {}
    for level in levels:
        points = []
        for i in sorted(measured):
            got = [r for r in chunk_rows if r["level"] == level and r["chunk"] == i]
            if not got:
                continue
            kl, lo, hi = _mean_ci([r["kl_per_token"] for r in got])
            mean_kl.setdefault(level, {})[i] = kl
            points.append({"chunk": i, "distance_tokens": got[0]["distance_tokens"], "documents": len(got),
                           "kl_per_token": kl, "kl_ci95": [lo, hi],
                           "top1_agreement": statistics.fmean(r["top1_agreement"] for r in got),
                           "ppl_change": statistics.fmean(r["ppl_change"] for r in got),
                           "bits_per_value": statistics.fmean(r["bits_per_value"] for r in got)})
        if points:
            by_level[level] = points
    plans = []
    for r in (r for r in rows if r["kind"] == "plan"):
        lossy = [(i, act) for i, act in enumerate(r["actions"]) if act != EXACT]
        same_doc: dict[str, dict[int, float]] = {}
        for x in chunk_rows:
            if x["doc"] == r["doc"]:
                same_doc.setdefault(x["level"], {})[x["chunk"]] = x["kl_per_token"]
        if not all(act in same_doc and act in mean_kl for _, act in lossy):
            continue
        plans.append({"doc": r["doc"], "plan": r["plan"], "actions": r["actions"], "measured": r["kl_per_token"],
                      "top1_agreement": r["top1_agreement"],
                      "sum_same_doc": sum(_predict(same_doc[act], i, settings) for i, act in lossy),
                      "sum_mean_curve": sum(_predict(mean_kl[act], i, settings) for i, act in lossy)})
    factors: dict[str, float] = {}
    for level in mean_kl:  # measured whole-context KL / sum of the single-chunk KLs (mean curve)
        whole = [p for p in plans if p["actions"] == [level] * settings.chunks]
        if whole and sum(p["sum_mean_curve"] for p in whole) > 0:
            factors[level] = sum(p["measured"] for p in whole) / sum(p["sum_mean_curve"] for p in whole)
    for p in plans:  # what the profile predicts: the mean curve scaled by the square root of each level's factor
        p["profile_model"] = sum(math.sqrt(factors.get(act, 1.0)) * _predict(mean_kl[act], i, settings)
                                 for i, act in enumerate(p["actions"]) if act != EXACT)
    plan_table = []
    for name in dict.fromkeys(p["plan"] for p in plans):
        got = [p for p in plans if p["plan"] == name]
        measured_kl = statistics.fmean(p["measured"] for p in got)
        summed = statistics.fmean(p["sum_same_doc"] for p in got)
        curve = statistics.fmean(p["sum_mean_curve"] for p in got)
        model = statistics.fmean(p["profile_model"] for p in got)
        plan_table.append({"plan": name, "documents": len(got), "measured": measured_kl, "sum_same_doc": summed,
                           "sum_mean_curve": curve, "profile_model": model,
                           "error_same_doc": summed / measured_kl - 1 if measured_kl else math.nan,
                           "error_mean_curve": curve / measured_kl - 1 if measured_kl else math.nan,
                           "error_profile_model": model / measured_kl - 1 if measured_kl else math.nan,
                           "per_doc_error_same_doc": [p["sum_same_doc"] / p["measured"] - 1 for p in got
                                                      if p["measured"] > 0]})
    text_rows = [r for r in rows if r["kind"] == "text"]
    text_table = []
    for name, level in dict.fromkeys((r["case"], r["level"]) for r in text_rows):
        got = [r for r in text_rows if r["case"] == name and r["level"] == level]
        prefix = statistics.fmean(r["prefix"]["kl_per_token"] for r in got)
        text = statistics.fmean(r["kl_per_token"] for r in got)
        text_table.append({"case": name, "level": level, "documents": len(got), "text_chunks": got[0]["text_chunks"],
                           "kl_prefix": prefix, "kl_text": text,
                           "penalty": (text - prefix) / prefix if prefix > 0 else math.nan,
                           "per_doc_penalty": [r["penalty"] for r in got]})
    per_chunk = [t["penalty"] / t["text_chunks"] for t in text_table if math.isfinite(t["penalty"])]
    penalty = max(0.0, statistics.fmean(per_chunk)) if per_chunk else None
    results: dict[str, Any] = {
        "format": POSITION_FORMAT,
        "model": model_name,
        "settings": {**asdict(settings), "datasets": str(settings.datasets) if settings.datasets else None,
                     "text_file": str(settings.text_file) if settings.text_file else None,
                     "context_tokens": settings.context_tokens, "torch": torch.__version__,
                     "torch_threads": torch.get_num_threads()},
        "documents": docs,
        "levels": by_level,
        "additivity_factors": factors,
        "plans": plan_table,
        "plans_per_doc": plans,
        "text": text_table,
        "text_over_lossy_prefix_penalty": penalty,
    }
    results["position_quality"] = profile_entry(results, settings)
    return results


def profile_entry(results: dict[str, Any], settings: PositionSettings) -> dict[str, Any]:
    """The ``position_quality`` object of a ``kvcast-profile/1`` file (`kvcast.streamer.profile`)."""
    levels = {}
    for level, points in results["levels"].items():
        entry: dict[str, Any] = {}
        factor = results.get("additivity_factors", {}).get(level)
        scale = settings.context_tokens / settings.chunk_tokens * math.sqrt(factor if factor is not None else 1.0)
        for p in points:
            point = {"distance_tokens": p["distance_tokens"], "quality_loss": p["kl_per_token"] * scale,
                     "kl_per_token": p["kl_per_token"], "top1_agreement": p["top1_agreement"]}
            if p["chunk"] == 0 and len(points) > 1:
                entry["first_chunk"] = point
            else:
                entry.setdefault("points", []).append(point)
        entry["points"] = sorted(entry.get("points", []), key=lambda q: q["distance_tokens"])
        if factor is not None:
            entry["additivity_factor"] = factor
        levels[level] = entry
    return {"context_tokens": settings.context_tokens, "chunk_tokens": settings.chunk_tokens,
            "continuation_tokens": settings.continuation_tokens, "documents": len(results["documents"]),
            "levels": levels}


def merge_profile(profile: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """`profile` (a parsed ``kvcast-profile/1`` dict) with this run's ``position_quality`` and
    ``text_over_lossy_prefix_penalty`` (kept from `profile` when this run measured none)."""
    merged = dict(profile)
    merged["position_quality"] = results["position_quality"]
    if results.get("text_over_lossy_prefix_penalty") is not None:
        merged["text_over_lossy_prefix_penalty"] = results["text_over_lossy_prefix_penalty"]
    return merged


# ----------------------------------------------------------------------------------------------- outputs


def markdown_table(results: dict[str, Any]) -> str:
    """KL per token by level (rows) and chunk distance (columns), then the plan check and the text penalty."""
    s = results["settings"]
    levels = results["levels"]
    chunks = sorted({p["chunk"] for pts in levels.values() for p in pts})
    dist = {p["chunk"]: p["distance_tokens"] for pts in levels.values() for p in pts}
    lines = ["| level | " + " | ".join(f"chunk {c} (d={dist[c]:g})" for c in chunks) + " | sum | top-1 min |",
             "|---|" + "---|" * (len(chunks) + 2)]
    for level, points in levels.items():
        by_chunk = {p["chunk"]: p for p in points}
        cells = [_kl(by_chunk[c]["kl_per_token"]) if c in by_chunk else "—" for c in chunks]
        lines.append(f"| {level} | " + " | ".join(cells) + f" | {_kl(sum(p['kl_per_token'] for p in points))} | "
                     f"{100 * min(p['top1_agreement'] for p in points):.1f}% |")
    lines += ["", f"KL(exact || only this chunk lossy) per continuation token, nats; mean of "
              f"{len(results['documents'])} documents ({', '.join(results['documents'])}); {s['chunks']} chunks x "
              f"{s['chunk_tokens']} tokens, next {s['continuation_tokens']} tokens teacher-forced; d = tokens from "
              "the chunk's centre to the context's end.", ""]
    if results["plans"]:
        lines += ["| plan | measured KL | sum of single-chunk KLs (same doc) | error | sum (mean curve) | error | "
                  "profile model | error |", "|---|---|---|---|---|---|---|---|"]
        for p in results["plans"]:
            lines.append(f"| {p['plan']} | {_kl(p['measured'])} | {_kl(p['sum_same_doc'])} | "
                         f"{100 * p['error_same_doc']:+.0f}% | {_kl(p['sum_mean_curve'])} | "
                         f"{100 * p['error_mean_curve']:+.0f}% | {_kl(p['profile_model'])} | "
                         f"{100 * p['error_profile_model']:+.0f}% |")
        factors = results.get("additivity_factors") or {}
        lines += ["", "Additivity factor (measured whole-context KL / sum of the single-chunk KLs): " +
                  ", ".join(f"{lv} {f:.2f}" for lv, f in factors.items()), ""]
    if results["text"]:
        lines += ["| text case | prefix level | KL, prefix lossy + chunk exact | KL, chunk recomputed from text | "
                  "penalty |", "|---|---|---|---|---|"]
        for t in results["text"]:
            lines.append(f"| {t['case']} | {t['level']} | {_kl(t['kl_prefix'])} | {_kl(t['kl_text'])} | "
                         f"{t['penalty']:+.3f} |")
        value = results.get("text_over_lossy_prefix_penalty")
        lines += ["", f"text_over_lossy_prefix_penalty (mean penalty per text chunk): "
                  f"{'—' if value is None else f'{value:.3f}'}"]
    return "\n".join(lines) + "\n"


def plot_positions(results: dict[str, Any], path: Path) -> None:
    """KL per token (log) and top-1 agreement vs distance of the lossy chunk from the context's end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_top) = plt.subplots(1, 2, figsize=(13, 5.2))
    for level, points in results["levels"].items():
        xs = [p["distance_tokens"] for p in points]
        style = "--" if level.startswith("cachegen-delta") else ":" if level == "int8" else "-"
        ax_kl.plot(xs, [max(p["kl_per_token"], 1e-7) for p in points], style, marker="o", label=level)
        ax_top.plot(xs, [100 * p["top1_agreement"] for p in points], style, marker="o", label=level)
    ax_kl.set_yscale("log")
    ax_kl.set_ylabel("KL(exact || one chunk lossy) per token, nats")
    ax_top.set_ylabel("top-1 agreement with the exact cache (%)")
    s = results["settings"]
    for ax in (ax_kl, ax_top):
        ax.set_xlabel(f"distance of the {s['chunk_tokens']}-token chunk's centre from the context's end (tokens)")
        ax.grid(True, alpha=0.3)
    ax_kl.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{results['model']}: loss of one lossy chunk by position, {len(results['documents'])} documents, "
                 f"{s['chunks']} x {s['chunk_tokens']} tokens, next {s['continuation_tokens']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict[str, Any], out_dir: Path, profile: Path | None = None) -> dict[str, Path]:
    """``summary.json``, ``table.md``, ``position.png`` (and ``profile.json``: `profile` with this run merged in)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "summary.json", "markdown": out_dir / "table.md", "plot": out_dir / "position.png"}
    paths["json"].write_text(json.dumps(finite(results), indent=2, default=str) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown_table(results), encoding="utf-8")
    plot_positions(results, paths["plot"])
    if profile is not None:
        try:
            base = json.loads(Path(profile).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise EvalError(f"cannot read the profile {profile}: {exc}") from None
        paths["profile"] = out_dir / "profile.json"
        paths["profile"].write_text(json.dumps(finite(merge_profile(base, results)), indent=2) + "\n",
                                    encoding="utf-8")
    return paths


def _kl(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.4f}" if value >= 1e-3 else f"{value:.2e}"
