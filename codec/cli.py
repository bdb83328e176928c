"""`kvcast bench codec`, `kvcast eval codec` and `kvcast demo`; `kvcast.cli` calls `register`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer, bench: typer.Typer, evaluate: typer.Typer) -> None:
    """Add the codec's commands to the `kvcast` CLI."""

    @bench.command("codec")
    def bench_codec(
        tokens: int = typer.Option(2048, help="Tokens per object."),
        levels: str = typer.Option("", help="Comma-separated levels (default: all)."),
        repeats: int = typer.Option(5, help="Timed repetitions per level (median reported)."),
        workers: int = typer.Option(0, help="Coder processes (0: one per core)."),
        source: str = typer.Option("synthetic", help="'synthetic' (SmolLM2-shaped random KV) or 'smollm2'."),
        out: Optional[Path] = typer.Option(None, help="Also write the JSON here."),
    ) -> None:
        """Encode/decode speed per level: Msymbols/s and MB/s of fp16 in/out."""
        from codec.bench import run_codec_bench

        run_codec_bench(tokens=tokens, levels=levels, repeats=repeats, workers=workers, source=source, out=out)
