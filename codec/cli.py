"""`kvcast bench codec`, `kvcast eval codec` and `kvcast demo`; `kvcast.cli` calls `register`."""

from __future__ import annotations

import sys
from pathlib import Path

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
        out: Path | None = typer.Option(None, help="Also write the JSON here."),
    ) -> None:
        """Encode/decode speed per level: Msymbols/s and MB/s of fp16 in/out."""
        from kvcast.codec.bench import run_codec_bench

        run_codec_bench(tokens=tokens, levels=levels, repeats=repeats, workers=workers, source=source, out=out)

    @evaluate.command("codec")
    def eval_codec(
        out: Path = typer.Option(Path("out/eval-codec"), help="Output folder (eval.json, table.md, "
                                 "rate_distortion.png, profile.json)."),
        passages: int = typer.Option(6, help="Passages (distinct, evenly spaced, deterministic)."),
        context_tokens: int = typer.Option(2048, "--context-tokens", help="Context tokens per passage (one object)."),
        continuation_tokens: int = typer.Option(256, "--continuation-tokens",
                                                help="Next tokens scored on top of the decoded cache."),
        chunk_tokens: int = typer.Option(256, "--chunk-tokens", help="Small-object size for the second rate."),
        levels: str = typer.Option("", help="Comma-separated levels (default: all codec levels)."),
        baselines: str = typer.Option("recent-25%,recent-12.5%,no-context",
                                      help="Comma-separated baselines: 'recent-P%' token eviction, 'no-context'; "
                                      "'' for none."),
        split: str = typer.Option("test", help="'test' (wikitext-2-raw/wiki.test.raw, for reporting) or 'valid' "
                                  "(wikitext-2/valid.txt, for tuning)."),
        datasets: Path | None = typer.Option(None, help="Datasets folder (default: ../shared/datasets)."),
        text_file: Path | None = typer.Option(None, "--text-file", help="Evaluate on this UTF-8 text instead."),
        threads: int = typer.Option(2, help="torch threads (0: torch's default)."),
    ) -> None:
        """Rate (bits/value) vs quality (KL, top-1, ΔPPL) of every level on SmolLM2-135M and WikiText-2."""
        import torch
        from rich.console import Console

        from kvcast.codec.evaluate import EvalError, EvalSettings, rich_table, run_codec_eval, write_outputs
        from kvcast.codec.model import ModelUnavailable

        if threads:
            torch.set_num_threads(threads)
        console = Console() if sys.stdout.isatty() else Console(width=160)
        try:
            settings = EvalSettings(
                context_tokens=context_tokens, continuation_tokens=continuation_tokens, passages=passages,
                chunk_tokens=chunk_tokens, levels=tuple(x.strip() for x in levels.split(",") if x.strip()) or None,
                baselines=tuple(x.strip() for x in baselines.split(",") if x.strip()), split=split,
                datasets=datasets, text_file=text_file)
            results = run_codec_eval(settings)
        except (EvalError, ModelUnavailable) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
        paths = write_outputs(results, out)
        console.print(rich_table(results))
        console.print(f"{results['elapsed_s']:.0f} s; wrote " + ", ".join(str(p) for p in paths.values()))

    @app.command("demo")
    def demo(
        out: Path = typer.Option(Path("out/demo"), help="Output folder."),
        tokens: int = typer.Option(1536, help="Context tokens."),
        next_tokens: int = typer.Option(128, "--next-tokens", help="Next tokens scored on the decoded cache."),
        levels: str = typer.Option("", help="Comma-separated levels (default: all)."),
        text_file: Path | None = typer.Option(None, "--text-file", help="Use this UTF-8 text file."),
        datasets: Path | None = typer.Option(None, help="Datasets folder (default: ../shared/datasets)."),
        save_bitstreams: bool = typer.Option(False, "--save-bitstreams", help="Also write each level's object."),
        threads: int = typer.Option(2, help="torch threads (0: torch's default)."),
    ) -> None:
        """The main job on embedded defaults: a real passage's KV through every codec level on SmolLM2-135M."""
        from rich.console import Console

        from kvcast.codec.demo import run_demo
        from kvcast.codec.evaluate import EvalError
        from kvcast.codec.model import ModelUnavailable

        console = Console() if sys.stdout.isatty() else Console(width=160)
        try:
            run_demo(out=out, context_tokens=tokens, next_tokens=next_tokens,
                     levels=[x.strip() for x in levels.split(",") if x.strip()] or None, text_file=text_file,
                     datasets=datasets, threads=threads or None, save_bitstreams=save_bitstreams, console=console)
        except (EvalError, ModelUnavailable) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None

    @app.command("calibrate")
    def calibrate_cmd(
        out_dir: Path = typer.Option(Path("codec/tables"), "--out-dir",
                                     help="Folder for the table (codec/tables is what the codec ships and finds)."),
        split: str = typer.Option("valid", help="'valid' (tuning split, the default) or 'test'."),
        passages: int = typer.Option(8, help="Passages of context + continuation tokens."),
        trim: float = typer.Option(0.01, help="Fraction of each passage's most sensitive tokens left out of the "
                                   "per-channel means (secondary sinks)."),
        context_tokens: int = typer.Option(2048, "--context-tokens"),
        continuation_tokens: int = typer.Option(256, "--continuation-tokens"),
        datasets: Path | None = typer.Option(None, help="Datasets folder (default: ../shared/datasets)."),
        text_file: Path | None = typer.Option(None, "--text-file", help="Calibrate on this UTF-8 text instead."),
        threads: int = typer.Option(2, help="torch threads (0: torch's default)."),
    ) -> None:
        """Measure SmolLM2-135M's KV sensitivity (Fisher) table from real text, for the kvcast-* levels."""
        import json

        import torch

        from kvcast.codec.calibrate import calibrate_smollm2, table_summary
        from kvcast.codec.errors import CodecError
        from kvcast.codec.evaluate import EvalError
        from kvcast.codec.model import ModelUnavailable
        from kvcast.codec.sensitivity import SensitivityTable

        if threads:
            torch.set_num_threads(threads)
        try:
            path = calibrate_smollm2(split=split, passages=passages, context_tokens=context_tokens,
                                     continuation_tokens=continuation_tokens, trim=trim, out_dir=out_dir, datasets=datasets,
                                     text_file=text_file)
        except (EvalError, ModelUnavailable, CodecError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        summary = table_summary(SensitivityTable.load(path))
        typer.echo(json.dumps({"table": str(path), "meta": summary["meta"],
                               "distance_profile": [round(x, 3) for x in summary["distance_profile"]],
                               "score_edges": [round(x, 3) for x in summary["score_edges"] or []],
                               "score_profile": [round(x, 3) for x in summary["score_profile"] or []]}))
