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
already there are not measured again). `summarise` turns the rows into means per (level, chunk) with 95%
t-intervals over documents, the plan check, the text penalty and the ``position_quality`` entry of a
``kvcast-profile/1`` file (see `kvcast.streamer.profile`): per level, points ``(distance_tokens,
quality_loss, kl_per_token, top1_agreement)`` where ``distance_tokens`` is the distance of the chunk's centre from
the context's end and ``quality_loss = kl_per_token x context_tokens / chunk_tokens`` is the whole-context
equivalent (the loss if every chunk lost what this one does; the simulator's token-weighted mean of these over a
plan's chunks is then the sum of the single-chunk KLs). The first chunk (it holds the attention sinks) is kept
apart as ``first_chunk`` and the points come from the others.
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
    """Text-over-lossy-prefix cases: name -> (first text chunk, text chunks); the chunks before it are lossy."""
    cases = {"last chunk text": (chunks - 1, 1), "middle chunk text": (chunks // 2, 1)}
    if chunks >= 3:
        cases["last two chunks text"] = (chunks - 2, 2)
    return cases


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
    cases = text_cases(settings.chunks) if settings.text_penalty else {}
    docs = load_documents(settings, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_key = hashlib.sha256(json.dumps([fingerprint.name, settings.chunk_tokens, settings.chunks,
                                         settings.continuation_tokens], sort_keys=True).encode()).hexdigest()[:12]
    rows = _Rows(out_dir / "positions.jsonl", run_key)
    n_chunk = settings.chunk_tokens
    ctx = settings.context_tokens
    total = len(docs) * (len(levels) * settings.chunks + len(plans) + len(cases) * len({a, b}))
    done = [0]

    def progress(doc: Document, what: str, row: dict[str, Any], cached: bool) -> None:
        done[0] += 1
        note = "cached" if cached else f"{time.perf_counter() - started:6.0f} s"
        say(f"[{done[0]}/{total}] {doc.name} {what}: KL {row['kl_per_token']:.3g}, top-1 "
            f"{row['top1_agreement']:.3f} ({note})")

    for d_index, doc in enumerate(docs):
        ctx_ids = doc.token_ids[:, :ctx]
        fed = doc.token_ids[:, ctx:ctx + settings.continuation_tokens]
        targets = doc.token_ids[0, ctx + 1:ctx + settings.continuation_tokens + 1]
        state: dict[str, Any] = {}
        decoded: dict[tuple[int, str], KV] = {}

        def exact_state() -> dict[str, Any]:
            if not state:
                t0 = time.perf_counter()
                with torch.inference_mode():
                    kv = kv_from_cache(model(ctx_ids, use_cache=True, logits_to_keep=1).cache)
                state["kv"] = [(k.clone(), v.clone()) for k, v in kv]
                state["exact"] = continuation_logits(model, state["kv"], fed)
                say(f"{doc.name}: exact prefill of {ctx} tokens in {time.perf_counter() - t0:.0f} s")
            return state

        def chunk_kv(i: int, level: str) -> tuple[KV, int]:
            """Chunk i decoded from `level` (and its object's bytes)."""
            if (i, level) in decoded:
                return decoded[(i, level)], state["bytes"][(i, level)]
            part = slice_kv(exact_state()["kv"], i * n_chunk, (i + 1) * n_chunk)
            data = codec.encode(part, level, model=fingerprint, token_start=i * n_chunk, context_end=ctx,
                                sensitivity=plan.sensitivity(level))
            out = codec.decode(data, dtype=torch.float32, expect_model=fingerprint)
            if level in (a, b):  # reused by the plans and text cases
                decoded[(i, level)] = out
                state.setdefault("bytes", {})[(i, level)] = len(data)
            return out, len(data)

        def score(kv: KV) -> dict[str, float]:
            sums = QualitySums()
            sums.add(exact_state()["exact"], continuation_logits(model, kv, fed), targets)
            return sums.summary()

        def assemble(parts: Sequence[KV]) -> KV:
            return [(torch.cat([p[layer][0] for p in parts], dim=2), torch.cat([p[layer][1] for p in parts], dim=2))
                    for layer in range(len(parts[0]))]

        def exact_chunk(i: int) -> KV:
            return slice_kv(exact_state()["kv"], i * n_chunk, (i + 1) * n_chunk)

        base = {"doc": doc.name, "doc_index": d_index, "doc_digest": doc.digest}
        for level in levels:
            for i in range(settings.chunks):
                key = f"{doc.digest}/chunk/{i}/{level}"
                row = rows.get(key)
                if row is None:
                    part, nbytes = chunk_kv(i, level)
                    kv = assemble([part if j == i else exact_chunk(j) for j in range(settings.chunks)])
                    values = sum(k.numel() + v.numel() for k, v in part)
                    row = rows.put(key, {**base, "kind": "chunk", "level": level, "chunk": i,
                                         "token_start": i * n_chunk, "tokens": n_chunk,
                                         "distance_tokens": ctx - (i * n_chunk + n_chunk / 2),
                                         "bits_per_value": 8 * nbytes / values, **score(kv)})
                    progress(doc, f"chunk {i} {level}", row, False)
                else:
                    progress(doc, f"chunk {i} {level}", row, True)
        for name, actions in plans.items():
            key = f"{doc.digest}/plan/{'|'.join(actions)}"
            row = rows.get(key)
            cached = row is not None
            if row is None:
                kv = assemble([exact_chunk(i) if act == EXACT else chunk_kv(i, act)[0]
                               for i, act in enumerate(actions)])
                row = rows.put(key, {**base, "kind": "plan", "plan": name, "actions": list(actions), **score(kv)})
            progress(doc, f"plan {name}", row, cached)
        for level in dict.fromkeys((a, b)) if cases else ():
            for name, (first, count) in cases.items():
                key = f"{doc.digest}/text/{first}/{count}/{level}"
                row = rows.get(key)
                cached = row is not None
                if row is None:
                    prefix = [chunk_kv(i, level)[0] for i in range(first)]
                    tail = [exact_chunk(i) for i in range(first + count, settings.chunks)]
                    with_exact = score(assemble(prefix + [exact_chunk(i) for i in range(first, first + count)]
                                                + tail))
                    start, stop = first * n_chunk, (first + count) * n_chunk
                    cache = cache_from_kv(assemble(prefix), model.config, dtype=model.dtype)
                    with torch.inference_mode():
                        out = model(doc.token_ids[:, start:stop], cache=cache, use_cache=True, logits_to_keep=1)
                    recomputed = slice_kv(kv_from_cache(out.cache), start, stop)
                    with_text = score(assemble(prefix + [recomputed] + tail))
                    kl_p, kl_t = with_exact["kl_per_token"], with_text["kl_per_token"]
                    row = rows.put(key, {**base, "kind": "text", "case": name, "level": level, "text_chunk": first,
                                         "text_chunks": count, "prefix": with_exact, **with_text,
                                         "penalty": (kl_t - kl_p) / kl_p if kl_p > 0 else math.nan})
                progress(doc, f"text {name} over {level}", row, cached)
        decoded.clear()
        state.clear()
    results = summarise([r for r in rows.rows.values() if r["doc_digest"] in {d.digest for d in docs}], settings,
                        levels, model_name=fingerprint.name)
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


def summarise(rows: Sequence[dict[str, Any]], settings: PositionSettings, levels: Sequence[str], *,
              model_name: str = "") -> dict[str, Any]:
    """Means over documents per (level, chunk), the plan check, the text penalty and the profile entry."""
    chunk_rows = [r for r in rows if r["kind"] == "chunk"]
    docs = sorted({r["doc"] for r in rows})
    by_level: dict[str, list[dict[str, Any]]] = {}
    mean_kl: dict[tuple[int, str], float] = {}
    for level in levels:
        points = []
        for i in range(settings.chunks):
            got = [r for r in chunk_rows if r["level"] == level and r["chunk"] == i]
            if not got:
                continue
            kl, lo, hi = _mean_ci([r["kl_per_token"] for r in got])
            mean_kl[(i, level)] = kl
            points.append({"chunk": i, "distance_tokens": got[0]["distance_tokens"], "documents": len(got),
                           "kl_per_token": kl, "kl_ci95": [lo, hi],
                           "top1_agreement": statistics.fmean(r["top1_agreement"] for r in got),
                           "ppl_change": statistics.fmean(r["ppl_change"] for r in got),
                           "bits_per_value": statistics.fmean(r["bits_per_value"] for r in got)})
        if points:
            by_level[level] = points
    plans = []
    for r in (r for r in rows if r["kind"] == "plan"):
        singles = [(i, act) for i, act in enumerate(r["actions"]) if act != EXACT]
        same_doc = {(x["chunk"], x["level"]): x["kl_per_token"] for x in chunk_rows if x["doc"] == r["doc"]}
        if not all(s in same_doc and s in mean_kl for s in singles):
            continue
        plans.append({"doc": r["doc"], "plan": r["plan"], "actions": r["actions"], "measured": r["kl_per_token"],
                      "top1_agreement": r["top1_agreement"], "sum_same_doc": sum(same_doc[s] for s in singles),
                      "sum_mean_curve": sum(mean_kl[s] for s in singles)})
    plan_table = []
    for name in dict.fromkeys(p["plan"] for p in plans):
        got = [p for p in plans if p["plan"] == name]
        measured = statistics.fmean(p["measured"] for p in got)
        summed = statistics.fmean(p["sum_same_doc"] for p in got)
        curve = statistics.fmean(p["sum_mean_curve"] for p in got)
        plan_table.append({"plan": name, "documents": len(got), "measured": measured, "sum_same_doc": summed,
                           "sum_mean_curve": curve, "error_same_doc": summed / measured - 1 if measured else math.nan,
                           "error_mean_curve": curve / measured - 1 if measured else math.nan,
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
    penalty = statistics.fmean(per_chunk) if per_chunk else None
    results: dict[str, Any] = {
        "format": POSITION_FORMAT,
        "model": model_name,
        "settings": {**asdict(settings), "datasets": str(settings.datasets) if settings.datasets else None,
                     "text_file": str(settings.text_file) if settings.text_file else None,
                     "context_tokens": settings.context_tokens, "torch": torch.__version__,
                     "torch_threads": torch.get_num_threads()},
        "documents": docs,
        "levels": by_level,
        "plans": plan_table,
        "plans_per_doc": plans,
        "text": text_table,
        "text_over_lossy_prefix_penalty": penalty,
    }
    results["position_quality"] = profile_entry(results, settings)
    return results


def profile_entry(results: dict[str, Any], settings: PositionSettings) -> dict[str, Any]:
    """The ``position_quality`` object of a ``kvcast-profile/1`` file (`kvcast.streamer.profile`)."""
    scale = settings.context_tokens / settings.chunk_tokens
    levels = {}
    for level, points in results["levels"].items():
        entry: dict[str, Any] = {}
        for p in points:
            point = {"distance_tokens": p["distance_tokens"], "quality_loss": p["kl_per_token"] * scale,
                     "kl_per_token": p["kl_per_token"], "top1_agreement": p["top1_agreement"]}
            if p["chunk"] == 0 and len(points) > 1:
                entry["first_chunk"] = point
            else:
                entry.setdefault("points", []).append(point)
        entry["points"] = sorted(entry.get("points", []), key=lambda q: q["distance_tokens"])
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
        lines += ["| plan | measured KL | sum of single-chunk KLs (same doc) | error | sum (mean curve) | error |",
                  "|---|---|---|---|---|---|"]
        for p in results["plans"]:
            lines.append(f"| {p['plan']} | {_kl(p['measured'])} | {_kl(p['sum_same_doc'])} | "
                         f"{100 * p['error_same_doc']:+.0f}% | {_kl(p['sum_mean_curve'])} | "
                         f"{100 * p['error_mean_curve']:+.0f}% |")
        lines.append("")
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
    paths["json"].write_text(json.dumps(finite(results), indent=2) + "\n", encoding="utf-8")
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
