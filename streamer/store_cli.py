"""`kvcast store put|ls|rm|du|gc`: contexts in a KV store; `kvcast.cli` calls `register`.

The commands live here, beside `kvcast.streamer.ingest` (what ``put`` runs) rather than inside the
`kvcast.streamer.store` package, so that the store stays free of the model and no import cycle joins the two.
Defaults come from `kvcast.streamer.ingest.PutSettings`; conventions: `kvcast.clitools` (bad input, including
an unknown store scheme or an unreachable Redis, exits 2 with the store unchanged; a failed run exits 1).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from kvcast.clitools import FAILED, comma_list, fail
from kvcast.streamer.ingest import PutSettings

__all__ = ["STORE_ENV", "register"]

STORE_ENV = "KVCAST_STORE"
_PUT = PutSettings
_STORE_HELP = "The store: a folder (dir://PATH) or redis://HOST:PORT/DB[?prefix=NAME&timeout_s=SECONDS]."
StoreOption = Annotated[str, typer.Option("--store", envvar=STORE_ENV, help=_STORE_HELP)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a table.")]


def _console() -> Any:
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def _open(spec: str) -> Any:
    """The store at `spec`; a bad URL or an unreachable backend is bad input (exit 2)."""
    from kvcast.streamer.store import StoreError, open_store

    try:
        return open_store(spec)
    except StoreError as exc:
        fail(str(exc))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _freed(n: int) -> str:
    return f"{n:,} bytes freed" + (f" ({_size(n)})" if n >= 1024 else "")


def register(app: typer.Typer, bench: typer.Typer, evaluate: typer.Typer) -> None:
    """Add ``kvcast store`` and its commands to the `kvcast` CLI."""
    store_app = typer.Typer(help="Stored contexts: each chunk's KV at every level, content-addressed, in a folder "
                                 "or Redis.", no_args_is_help=True)
    app.add_typer(store_app, name="store")

    @store_app.command("put")
    def put(
        file: Annotated[Path, typer.Argument(help="The context: a UTF-8 text file.")],
        store: StoreOption = _PUT.store,
        context_id: Annotated[str | None, typer.Option(
            "--context-id", help="The context's id (1-128 of A-Z a-z 0-9 . _ -); default: the file's name "
                                 "without its suffix.")] = None,
        levels: Annotated[str, typer.Option(
            help="Comma-separated levels (default: all; raw is always stored; kvcast-* levels only for a model "
                 "with a sensitivity table).")] = "",
        chunk_tokens: Annotated[int, typer.Option(help="Tokens per chunk.")] = _PUT.chunk_tokens,
        model: Annotated[str, typer.Option(
            help="smollm2 (SmolLM2-135M-Instruct), or a transformers causal-LM folder or hub id on this machine "
                 "(never downloaded).")] = _PUT.model,
        threads: Annotated[int, typer.Option(help="torch threads (0: torch's default).")] = _PUT.threads,
        progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
    ) -> None:
        """Prefill FILE once on the model and store its KV: every chunk at every level, then the manifest."""
        from kvcast.streamer.ingest import IngestError, put_context, resolve_levels
        from kvcast.streamer.store import StoreError, check_context_id

        context_id = context_id if context_id is not None else file.stem
        try:
            check_context_id(context_id)
        except StoreError as exc:
            fail(str(exc) + ("" if context_id != file.stem else " (from the file's name: give one with --context-id)"))
        if chunk_tokens < 1:
            fail(f"--chunk-tokens must be >= 1, got {chunk_tokens}")
        try:
            text = file.read_bytes().decode("utf-8")
        except FileNotFoundError:
            fail(f"{file} does not exist")
        except IsADirectoryError:
            fail(f"{file} is a folder, not a text file")
        except UnicodeDecodeError as exc:
            line = file.read_bytes()[:exc.start].count(b"\n") + 1
            fail(f"{file}:{line}: not UTF-8 ({exc.reason})")
        except OSError as exc:
            fail(f"cannot read {file}: {exc}")
        try:
            wanted = resolve_levels(comma_list(levels) or None)
        except IngestError as exc:
            fail(str(exc))
        from kvcast.codec import CodecError
        from kvcast.codec.model import ModelUnavailable

        with _open(store) as target:
            try:
                result = put_context(target, context_id, text, model=model or None, levels=wanted,
                                     chunk_tokens=chunk_tokens, progress=progress, threads=threads or None)
            except IngestError as exc:
                fail(str(exc))
            except ModelUnavailable as exc:  # a model the user named is bad input; the default missing is not
                fail(str(exc), FAILED if model == _PUT.model else 2)
            except (StoreError, CodecError) as exc:
                fail(f"put {context_id!r} failed: {exc}", FAILED)
        m = result.manifest
        console = _console()
        console.print(f"stored {m.context_id!r} in {target.url}: {m.tokens:,} tokens, {len(m.chunks)} chunks x "
                      f"{len(m.levels)} levels ({', '.join(m.levels)}), {_size(m.nbytes)}; {result.written} "
                      f"objects written ({_size(result.bytes_written)}), {result.reused} re-used; "
                      f"{result.elapsed_s:.1f} s", highlight=False, soft_wrap=True)
        for level, reason in result.skipped.items():
            console.print(f"skipped {level}: {reason}", highlight=False, soft_wrap=True, markup=False)

    @store_app.command("ls")
    def ls(store: StoreOption = _PUT.store, as_json: JsonOption = False) -> None:
        """The stored contexts: tokens, chunks, levels, bytes (a broken manifest is listed with its error)."""
        from kvcast.streamer.store import NotFound, StoreError

        rows: list[dict[str, Any]] = []
        with _open(store) as target:
            try:
                for context in target.contexts():
                    try:
                        m = target.get_manifest(context)
                    except NotFound:
                        continue
                    except StoreError as exc:
                        rows.append({"context_id": context, "error": str(exc)})
                        continue
                    rows.append({"context_id": m.context_id, "tokens": m.tokens, "chunks": len(m.chunks),
                                 "chunk_tokens": m.chunk_tokens, "levels": list(m.levels), "bytes": m.nbytes,
                                 "model": m.model.get("name"), "created_s": m.created_s})
            except StoreError as exc:
                fail(str(exc), FAILED)
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        from rich.table import Table

        table = Table(title=f"{len(rows)} context(s) in {target.url}")
        for column in ("context", "tokens", "chunks", "levels", "bytes", "model"):
            table.add_column(column, justify="right" if column in ("tokens", "chunks", "bytes") else "left")
        for r in rows:
            if "error" in r:
                table.add_row(r["context_id"], "", "", f"[red]{r['error']}[/red]", "", "")
            else:
                table.add_row(r["context_id"], f"{r['tokens']:,}", str(r["chunks"]), ",".join(r["levels"]),
                              _size(r["bytes"]), str(r["model"]))
        _console().print(table)

    @store_app.command("rm")
    def rm(
        context_ids: Annotated[list[str], typer.Argument(help="Ids of the contexts to remove.", show_default=False)],
        store: StoreOption = _PUT.store,
    ) -> None:
        """Remove contexts: their manifests, then the objects no other context names."""
        from kvcast.streamer.store import NotFound, StoreError, check_context_id

        for context_id in context_ids:
            try:
                check_context_id(context_id)
            except StoreError as exc:
                fail(str(exc))
        with _open(store) as target:
            try:
                present = set(target.contexts())
            except StoreError as exc:
                fail(str(exc), FAILED)
            missing = [c for c in context_ids if c not in present]
            if missing:
                fail(f"no context {', '.join(map(repr, missing))} in {target.url}; nothing removed")
            console = _console()
            for context_id in dict.fromkeys(context_ids):
                try:
                    try:
                        target.get_manifest(context_id)
                        readable = True
                    except NotFound:  # removed meanwhile
                        continue
                    except StoreError:  # a malformed manifest: remove it (its objects go at the next gc)
                        readable = False
                    freed = target.delete_context(context_id) if readable else 0
                    if not readable:
                        target.delete_manifest(context_id)
                except StoreError as exc:
                    fail(f"removing {context_id!r} failed: {exc}", FAILED)
                console.print(f"removed {context_id!r}: {_freed(freed)}", highlight=False)

    @store_app.command("du")
    def du(store: StoreOption = _PUT.store, as_json: JsonOption = False) -> None:
        """Size accounting: contexts, distinct objects and their bytes, unreferenced objects."""
        from kvcast.streamer.store import StoreError

        with _open(store) as target:
            try:
                usage = target.usage()
            except StoreError as exc:
                fail(str(exc), FAILED)
        doc = {"store": target.url, **asdict(usage)}
        if as_json:
            typer.echo(json.dumps(doc, indent=2))
            return
        _console().print(f"{target.url}: {usage.contexts} contexts, {usage.objects} objects, "
                         f"{_size(usage.object_bytes)}; {usage.unreferenced_objects} unreferenced objects "
                         "(kvcast store gc removes them)", highlight=False, soft_wrap=True)

    @store_app.command("gc")
    def gc(store: StoreOption = _PUT.store) -> None:
        """Remove the objects no manifest names (left by interrupted puts) and stale temporary files."""
        from kvcast.streamer.store import StoreError

        with _open(store) as target:
            try:
                freed = target.collect_garbage()
            except StoreError as exc:
                fail(str(exc), FAILED)
        _console().print(f"{target.url}: {_freed(freed)}", highlight=False)
