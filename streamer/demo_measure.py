"""``kvcast demo``'s measurements on the real model: each context prefilled once and stored (every chunk at every
level, `kvcast.streamer.ingest.put_context`), then the quality of a cache built from the stored objects.

`ContextMeasurer.measure` prefills a context (the exact cache), stores it, and scores every stored level: the
chunks' objects are read back from the store and decoded as a live session would, and the continuation of a
``text`` context (teacher-forced, against the exact cache: KL per token, top-1 agreement, perplexity change,
`kvcast.codec.evaluate.QualitySums`) or the answer of a ``qa`` context (exact match with the expected number, and
whether it is the exact cache's answer) is measured on the result. Token-eviction baselines score the exact cache
with tokens dropped (``text`` contexts).

`ContextMeasurer.score_plan` scores any plan (one action per chunk: a level, or ``text``): loaded chunks decoded
from the store, text chunks recomputed by the model over the chunks before them (lossy ones included,
`kvcast.streamer.live.prefill_chunk`), exactly as a live session builds its cache.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from kvcast import codec
from kvcast.codec.evaluate import QualitySums, continuation_logits, parse_baseline
from kvcast.codec.hf import KV, kv_from_cache, slice_kv
from kvcast.policies.base import TEXT
from kvcast.streamer.demo_data import DemoContext, parse_answer
from kvcast.streamer.ingest import put_context
from kvcast.streamer.live import ContextAssembly, answer, prefill_chunk
from kvcast.streamer.profile import Profile
from kvcast.streamer.store import Manifest, Store

__all__ = ["ContextMeasurer", "MeasuredContext", "PlanQuality", "profile_with_measured_sizes"]


@dataclass
class PlanQuality:
    """The quality of one cache of one context against the exact cache: `sums` for a ``text`` context (mergeable
    over contexts), the answer for a ``qa`` context."""

    sums: QualitySums | None = None
    answer: str | None = None
    correct: bool | None = None
    same_as_exact: bool | None = None


@dataclass
class MeasuredContext:
    """A stored context, its exact cache, and each level's size, decode time and quality on it."""

    context: DemoContext
    manifest: Manifest
    exact_kv: KV
    exact: PlanQuality
    """The exact cache's own answer (``qa``); for ``text`` the exact logits are in `exact_logits`."""
    values: int
    prefill_s: float
    store_s: float
    levels: dict[str, PlanQuality] = field(default_factory=dict)
    decode_s: dict[str, float] = field(default_factory=dict)
    side_bytes: dict[str, int] = field(default_factory=dict)
    """Per level, the header and side-information bytes of its objects (the rest is payload)."""
    baselines: dict[str, tuple[float, PlanQuality]] = field(default_factory=dict)
    """Baseline name -> (bits per value, quality)."""
    skipped_levels: dict[str, str] = field(default_factory=dict)
    exact_logits: Any = None

    @property
    def context_id(self) -> str:
        return self.context.context_id

    def level_bytes(self, level: str) -> int:
        return sum(c.objects[level].nbytes for c in self.manifest.chunks)

    def chunk_bits_per_value(self, level: str) -> list[float]:
        """Bits per value of each chunk's object at `level`, in chunk order."""
        per_token = self.values // self.manifest.tokens
        return [8 * c.objects[level].nbytes / (c.tokens * per_token) for c in self.manifest.chunks]


class ContextMeasurer:
    """Measures contexts on one loaded model (`kvcast.codec.model.LoadedModel`) into one store."""

    def __init__(self, lm: Any, store: Store, *, chunk_tokens: int, levels: Sequence[str] | None = None,
                 baselines: Sequence[str] = (), answer_tokens: int = 8) -> None:
        self.lm = lm
        self.store = store
        self.chunk_tokens = chunk_tokens
        self.levels = None if levels is None else list(levels)
        self.baselines = [parse_baseline(b) for b in baselines]
        self.answer_tokens = answer_tokens
        self.fingerprint = lm.fingerprint()
        self._plans: dict[tuple[str, tuple[str, ...]], PlanQuality] = {}

    # ------------------------------------------------------------------------------------------- per context

    def measure(self, context: DemoContext, on_step: Any = None) -> MeasuredContext:
        """Prefill, store and score `context` at every level (`on_step(text)` is told each step)."""
        say = on_step or (lambda _text: None)
        model = self.lm.model
        say(f"{context.context_id}: prefill {len(context.token_ids):,} tokens")
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(torch.tensor([context.token_ids], dtype=torch.long), use_cache=True, logits_to_keep=1)
        exact_kv = kv_from_cache(out.cache)
        prefill_s = time.perf_counter() - t0
        say(f"{context.context_id}: encode and store every chunk at every level")
        t0 = time.perf_counter()
        put = put_context(self.store, context.context_id, list(context.token_ids), model=self.lm, levels=self.levels,
                          chunk_tokens=self.chunk_tokens, kv=exact_kv)
        store_s = time.perf_counter() - t0
        values = sum(k.numel() + v.numel() for k, v in exact_kv)
        measured = MeasuredContext(context=context, manifest=put.manifest, exact_kv=exact_kv, exact=PlanQuality(),
                                   values=values, prefill_s=prefill_s, store_s=store_s,
                                   skipped_levels=dict(put.skipped))
        if context.kind == "text":
            measured.exact_logits = continuation_logits(model, exact_kv, self._fed(context))
        else:
            text, _ = self._answer(exact_kv, context)
            measured.exact = PlanQuality(answer=text, correct=parse_answer(text) == context.expected_answer,
                                         same_as_exact=True)
        for level in put.manifest.levels:
            say(f"{context.context_id}: decode and score {level}")
            kv = self._decode_level(measured, level)
            quality = self._score(measured, kv)
            measured.levels[level] = quality
            self._plans[context.context_id, (level,) * len(put.manifest.chunks)] = quality
        if context.kind == "text":
            for baseline in self.baselines:
                say(f"{context.context_id}: baseline {baseline.name}")
                kept = baseline.apply(exact_kv)
                sums = QualitySums()
                sums.add(measured.exact_logits, continuation_logits(model, kept, self._fed(context),
                                                                     position=len(context.token_ids)),
                         self._targets(context))
                measured.baselines[baseline.name] = (baseline.bits_per_value(exact_kv), PlanQuality(sums=sums))
        return measured

    def score_plan(self, measured: MeasuredContext, actions: Sequence[str]) -> PlanQuality:
        """The quality of the cache a session with these actions (one per chunk) builds (memoized)."""
        key = (measured.context_id, tuple(actions))
        if len(key[1]) != len(measured.manifest.chunks):
            raise ValueError(f"{measured.context_id}: {len(key[1])} actions for {len(measured.manifest.chunks)} chunks")
        if key not in self._plans:
            if all(a == TEXT for a in key[1]):  # every chunk recomputed from the exact prefix: the exact cache
                exact = measured.exact
                self._plans[key] = PlanQuality(sums=self._exact_sums(measured), answer=exact.answer,
                                               correct=exact.correct, same_as_exact=exact.same_as_exact)
            else:
                self._plans[key] = self._score(measured, self._assemble(measured, key[1]))
        return self._plans[key]

    # ------------------------------------------------------------------------------------------- helpers

    def _fed(self, context: DemoContext) -> torch.Tensor:
        return torch.tensor([context.continuation_ids[:-1]], dtype=torch.long)

    def _targets(self, context: DemoContext) -> torch.Tensor:
        return torch.tensor(context.continuation_ids[1:], dtype=torch.long)

    def _answer(self, kv: KV, context: DemoContext) -> tuple[str, list[int]]:
        ids, _, _ = answer(self.lm.model, kv, context.question_ids, max_new_tokens=self.answer_tokens)
        return self.lm.tokenizer.decode(ids, skip_special_tokens=True), ids

    def _exact_sums(self, measured: MeasuredContext) -> QualitySums | None:
        if measured.context.kind != "text":
            return None
        sums = QualitySums()
        sums.add(measured.exact_logits, measured.exact_logits, self._targets(measured.context))
        return sums

    def _decode_level(self, measured: MeasuredContext, level: str) -> KV:
        """The cache with every chunk at `level`, decoded from the store (timed), and the level's side bytes."""
        chunks = measured.manifest.chunks
        assembly = ContextAssembly([c.tokens for c in chunks])
        side = 0
        elapsed = 0.0
        for chunk in chunks:
            data = self.store.get_object(chunk.objects[level].key)
            sizes = codec.inspect(data)["sizes"]
            side += int(sizes["header"]) + int(sizes["side"])
            t0 = time.perf_counter()
            assembly.put(chunk.index, codec.decode(data, dtype=torch.float32, expect_model=self.fingerprint))
            elapsed += time.perf_counter() - t0
        measured.decode_s[level] = elapsed
        measured.side_bytes[level] = side
        return assembly.complete()

    def _assemble(self, measured: MeasuredContext, actions: Sequence[str]) -> KV:
        """The cache of a plan: each chunk decoded from its stored object, or recomputed over the chunks before it
        (the exact cache's slice while every chunk before it is text)."""
        chunks = measured.manifest.chunks
        assembly = ContextAssembly([c.tokens for c in chunks])
        exact_prefix = True
        for chunk, action in zip(chunks, actions):
            start, stop = chunk.start_token, chunk.start_token + chunk.tokens
            if action == TEXT:
                if exact_prefix:
                    assembly.put(chunk.index, slice_kv(measured.exact_kv, start, stop))
                else:
                    ids = measured.context.token_ids[start:stop]
                    assembly.put(chunk.index, prefill_chunk(self.lm.model, ids, assembly.prefix(chunk.index)))
            else:
                data = self.store.get_object(chunk.objects[action].key)
                assembly.put(chunk.index, codec.decode(data, dtype=torch.float32, expect_model=self.fingerprint))
                exact_prefix = False
        return assembly.complete()

    def _score(self, measured: MeasuredContext, kv: KV) -> PlanQuality:
        context = measured.context
        if context.kind == "text":
            sums = QualitySums()
            sums.add(measured.exact_logits, continuation_logits(self.lm.model, kv, self._fed(context)),
                     self._targets(context))
            return PlanQuality(sums=sums)
        text, _ = self._answer(kv, context)
        exact_answer = measured.exact.answer or ""
        got, want = parse_answer(text), parse_answer(exact_answer)
        return PlanQuality(answer=text, correct=got == context.expected_answer,
                           same_as_exact=(got == want) if want else text == exact_answer)


def profile_with_measured_sizes(profile: Profile, bits_per_value: dict[str, float], note: str) -> Profile:
    """`profile` restricted to the levels of `bits_per_value`, each level's ``bits_per_value`` replaced by the
    measured one (sizes from this run, quality and speeds from `profile`); `note` is appended to its note."""
    rows = tuple(replace(row, bits_per_value=bits_per_value[row.level], bits_per_value_payload=None)
                 for row in profile.levels if row.level in bits_per_value)
    names = {r.level for r in rows}
    position = profile.position_quality
    if position is not None:
        curves = tuple((name, curve) for name, curve in position.curves if name in names)
        position = replace(position, curves=curves) if curves else None
    return replace(profile, levels=rows, position_quality=position, note=(profile.note + " " + note).strip(),
                   source="kvcast demo")
