"""`kvcast bench codec`, `kvcast eval codec`, `kvcast eval demo`, `kvcast calibrate`; `kvcast.cli` calls
`register`.

Every default comes from `kvcast.codec.settings` or `kvcast.codec.bench.CodecBenchSettings`; conventions:
`kvcast.clitools`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from kvcast.clitools import BAD_INPUT, FAILED, comma_list, emit_benchmark, fail
from kvcast.codec.bench import CodecBenchSettings
from kvcast.codec.gpubench import GpuBenchSettings
from kvcast.codec.settings import DEFAULT_THREADS, CalibrateSettings, DemoSettings, EvalSettings, PositionSettings

_THREADS_HELP = "torch threads (0: torch's default)."
_DATASETS_HELP = "Datasets folder (default: ../shared/datasets)."
_MODEL_HELP = ("smollm2 (SmolLM2-135M-Instruct), or a transformers causal-LM folder or hub id already on this "
               "machine (never downloaded).")
_TABLES_HELP = ("Folder of sensitivity tables (kvcast calibrate --out-dir) searched before the shipped ones; "
                "kvcast-* levels are skipped when no table fits the model.")


def _console() -> Any:
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def _set_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _model_failed(exc: Exception, model: str) -> NoReturn:
    """A model the user named that cannot be loaded is bad input (2); SmolLM2, the default, not installed is a
    failed run (1)."""
    from kvcast.codec.model import SMOLLM2_ALIASES

    fail(str(exc), FAILED if model.strip().lower() in SMOLLM2_ALIASES else BAD_INPUT)


def register(app: typer.Typer, bench: typer.Typer, evaluate: typer.Typer) -> dict[str, typer.Typer]:
    """Add the codec's commands to the `kvcast` CLI; returns its groups other parts add to (``calibrate``)."""

    _bench = CodecBenchSettings

    @bench.command("codec")
    def bench_codec(
        tokens: Annotated[int, typer.Option(help="Tokens per object.")] = _bench.tokens,
        levels: Annotated[str, typer.Option(help="Comma-separated levels (default: all).")] = "",
        repeats: Annotated[int, typer.Option(help="Timed repetitions per level (the median is reported).")]
        = _bench.repeats,
        workers: Annotated[int, typer.Option(help="Coder processes (0: one per core).")] = _bench.workers,
        source: Annotated[str, typer.Option(help="synthetic (SmolLM2-shaped random KV) or smollm2.")]
        = _bench.source,
        out: Annotated[Path | None, typer.Option(help="Also write the JSON to this file.")] = None,
    ) -> None:
        """Encode/decode speed per level: Msymbols/s and MB/s of fp16 in/out."""
        from kvcast.codec.bench import bench_codec as run
        from kvcast.codec.errors import CodecError
        from kvcast.codec.model import ModelUnavailable

        try:
            settings = CodecBenchSettings(tokens=tokens, levels=comma_list(levels) or None, repeats=repeats,
                                          workers=workers, source=source)
        except ValueError as exc:
            fail(str(exc))
        try:
            result = run(settings)
        except (CodecError, ModelUnavailable) as exc:  # the codec failed on its own data, or no model
            fail(str(exc), FAILED)
        except ValueError as exc:  # unknown level, missing datasets (EvalError)
            fail(str(exc))
        emit_benchmark(result, _codec_table(result), out)

    _gpu = GpuBenchSettings

    @bench.command("gpu")
    def bench_gpu(
        contexts: Annotated[str, typer.Option(help="Comma-separated context lengths (tokens), Mistral-7B-shaped.")]
        = ",".join(map(str, _gpu.contexts)),
        levels: Annotated[str, typer.Option(help="Comma-separated levels (default: every format-2 level).")] = "",
        repeats: Annotated[int, typer.Option(help="Timed repetitions (the median is reported).")] = _gpu.repeats,
        kv_file: Annotated[Path | None, typer.Option(help="SmolLM2 KV to tile (scripts/gpu_carry.py).")] = None,
        check_dir: Annotated[Path | None, typer.Option(help="CPU-made objects and digests to check.")] = None,
        fuzz: Annotated[int, typer.Option(help="Corrupted objects decoded on the GPU.")] = _gpu.fuzz,
        out: Annotated[Path | None, typer.Option(help="Also write the JSON to this file.")] = None,
    ) -> None:
        """The CUDA decoder: bit-exactness with the CPU, decode GB/s vs the copy floor and a baseline kernel of
        CacheGen's structure, fuzzing. Needs a CUDA device (scripts/gpu_bench.sh reproduces the reported run)."""
        from kvcast.codec.errors import CodecError
        from kvcast.codec.gpubench import run_gpu_bench, table

        try:
            settings = GpuBenchSettings(contexts=tuple(int(c) for c in comma_list(contexts)),
                                        levels=tuple(comma_list(levels)) or None, repeats=repeats,
                                        kv_file=str(kv_file) if kv_file else None,
                                        check_dir=str(check_dir) if check_dir else None, fuzz=fuzz)
        except ValueError as exc:
            fail(str(exc))
        try:
            result = run_gpu_bench(settings, log=lambda m: typer.echo(m, err=True))
        except CodecError as exc:  # no CUDA device or toolchain, or a check failed
            fail(str(exc), FAILED)
        emit_benchmark(result, table(result), out)

    _eval = EvalSettings

    @evaluate.command("codec")
    def eval_codec(
        out: Annotated[Path, typer.Option(
            help="Output folder (eval.json, table.md, rate_distortion.png, profile.json).")]
        = Path("out/eval-codec"),
        passages: Annotated[int, typer.Option(help="Passages (distinct, evenly spaced, deterministic).")]
        = _eval.passages,
        context_tokens: Annotated[int, typer.Option(help="Context tokens per passage (one object).")]
        = _eval.context_tokens,
        continuation_tokens: Annotated[int, typer.Option(
            help="Next tokens scored on top of the decoded cache.")]
        = _eval.continuation_tokens,
        chunk_tokens: Annotated[int, typer.Option(help="Small-object size for the second rate.")]
        = _eval.chunk_tokens,
        levels: Annotated[str, typer.Option(help="Comma-separated levels (default: all codec levels).")] = "",
        baselines: Annotated[str, typer.Option(
            help="Comma-separated baselines: 'recent-P%' token eviction, 'no-context'; '' for none.")]
        = ",".join(_eval.baselines),
        split: Annotated[str, typer.Option(
            help="test (wikitext-2-raw/wiki.test.raw, for reporting) or valid (wikitext-2/valid.txt, for "
                 "tuning).")] = _eval.split,
        datasets: Annotated[Path | None, typer.Option(help=_DATASETS_HELP)] = _eval.datasets,
        text_file: Annotated[Path | None, typer.Option(help="Evaluate on this UTF-8 text instead.")]
        = _eval.text_file,
        model: Annotated[str, typer.Option(help=_MODEL_HELP)] = _eval.model,
        tables: Annotated[Path | None, typer.Option(help=_TABLES_HELP)] = _eval.tables,
        threads: Annotated[int, typer.Option(help=_THREADS_HELP)] = DEFAULT_THREADS,
    ) -> None:
        """Rate (bits/value) vs quality (KL, top-1, ΔPPL) of every level on a model (SmolLM2-135M) and WikiText-2."""
        from kvcast.codec.evaluate import EvalError, LevelPlan, rich_table, run_codec_eval, write_outputs
        from kvcast.codec.model import ModelUnavailable

        _set_threads(threads)
        try:
            settings = EvalSettings(
                context_tokens=context_tokens, continuation_tokens=continuation_tokens, passages=passages,
                chunk_tokens=chunk_tokens, levels=comma_list(levels) or None, baselines=comma_list(baselines),
                split=split, datasets=datasets, text_file=text_file, model=model, tables=tables)
            results = run_codec_eval(settings)
        except EvalError as exc:
            fail(str(exc))
        except ModelUnavailable as exc:
            _model_failed(exc, model)
        paths = write_outputs(results, out)
        console = _console()
        console.print(rich_table(results))
        if results.get("skipped_levels"):
            console.print(LevelPlan([], skipped=results["skipped_levels"]).note(), highlight=False, soft_wrap=True,
                          markup=False)
        console.print(f"{results['elapsed_s']:.0f} s; wrote " + ", ".join(str(p) for p in paths.values()))

    _pos = PositionSettings

    @evaluate.command("position")
    def eval_position(
        out: Annotated[Path, typer.Option(
            help="Output folder (positions.jsonl, the cache of every measurement; summary.json, table.md, "
                 "position.png; profile.json with --profile).")] = Path("out/eval-position"),
        chunk_tokens: Annotated[int, typer.Option(help="Tokens per chunk.")] = _pos.chunk_tokens,
        chunks: Annotated[int, typer.Option(help="Chunks of the context.")] = _pos.chunks,
        continuation_tokens: Annotated[int, typer.Option(help="Next tokens scored on top of the cache.")]
        = _pos.continuation_tokens,
        wikitext: Annotated[int, typer.Option(help="WikiText-2 test passages (or passages of --text-file).")]
        = _pos.wikitext_documents,
        longchat: Annotated[int, typer.Option(help="LongChat prompts (cachegen-longchat/longchat.jsonl).")]
        = _pos.longchat_documents,
        levels: Annotated[str, typer.Option(help="Comma-separated lossy levels (default: all but raw).")] = "",
        plan_levels: Annotated[str, typer.Option(
            help="Two levels a,b of the mixed plans and the text-over-lossy-prefix cases.")]
        = ",".join(_pos.plan_levels),
        positions: Annotated[str, typer.Option(
            help="Comma-separated chunk indices measured one at a time (default: every chunk; the check "
                 "interpolates the others by distance).")] = "",
        plans: Annotated[bool, typer.Option(help="Measure the mixed plans (the additivity check).")] = _pos.plans,
        text_penalty: Annotated[bool, typer.Option(help="Measure text recomputed over a lossy prefix.")]
        = _pos.text_penalty,
        quick: Annotated[bool, typer.Option(
            help="A small run: 4 chunks x 64 tokens, 16 next tokens, one passage, levels int8,cachegen-1 and "
                 "kvcast-2.")] = False,
        profile: Annotated[Path | None, typer.Option(
            help="A kvcast-profile/1 file to write out/profile.json from, with this run's position_quality.")]
        = None,
        datasets: Annotated[Path | None, typer.Option(help=_DATASETS_HELP)] = None,
        text_file: Annotated[Path | None, typer.Option(help="Measure passages of this UTF-8 text instead.")] = None,
        model: Annotated[str, typer.Option(help=_MODEL_HELP)] = _pos.model,
        tables: Annotated[Path | None, typer.Option(help=_TABLES_HELP)] = None,
        threads: Annotated[int, typer.Option(help=_THREADS_HELP)] = DEFAULT_THREADS,
    ) -> None:
        """KL and top-1 of the continuation when only one chunk of a long context is lossy, by level and distance
        from the context's end (SmolLM2's 8K window); checks the per-chunk model on mixed plans and measures text
        recomputed over a lossy prefix. Rerunning continues from out/positions.jsonl."""
        from kvcast.codec.model import ModelUnavailable
        from kvcast.codec.position import run_position_eval, write_outputs

        _set_threads(threads)
        try:
            if quick:
                chunk_tokens, chunks, continuation_tokens, wikitext, longchat = 64, 4, 16, 1, 0
                levels = levels or "int8,cachegen-1,kvcast-2"
            a_b = tuple(comma_list(plan_levels))
            if len(a_b) != 2:
                fail("--plan-levels names two levels")
            settings = PositionSettings(
                chunk_tokens=chunk_tokens, chunks=chunks, continuation_tokens=continuation_tokens,
                wikitext_documents=wikitext, longchat_documents=0 if text_file is not None else longchat,
                levels=tuple(comma_list(levels)) or None, plan_levels=a_b, plans=plans,  # type: ignore[arg-type]
                positions=tuple(int(c) for c in comma_list(positions)) or None,
                text_penalty=text_penalty, datasets=datasets, text_file=text_file, model=model, tables=tables)
            results = run_position_eval(settings, out)
            paths = write_outputs(results, out, profile)
        except ValueError as exc:  # EvalError, and the codec's errors for a bad level
            fail(str(exc))
        except ModelUnavailable as exc:
            _model_failed(exc, model)
        typer.echo((out / "table.md").read_text(encoding="utf-8"))
        typer.echo(f"{results['elapsed_s']:.0f} s; wrote " + ", ".join(str(p) for p in paths.values()))

    _demo = DemoSettings

    @evaluate.command("demo")
    def demo(
        out: Annotated[Path, typer.Option(help="Output folder.")] = _demo.out,
        tokens: Annotated[int, typer.Option(help="Context tokens.")] = _demo.context_tokens,
        next_tokens: Annotated[int, typer.Option(help="Next tokens scored on the decoded cache.")]
        = _demo.next_tokens,
        levels: Annotated[str, typer.Option(help="Comma-separated levels (default: all).")] = "",
        text_file: Annotated[Path | None, typer.Option(help="Use this UTF-8 text file.")] = None,
        datasets: Annotated[Path | None, typer.Option(help=_DATASETS_HELP)] = None,
        save_bitstreams: Annotated[bool, typer.Option(help="Also write each level's object.")] = False,
        model: Annotated[str, typer.Option(help=_MODEL_HELP)] = _demo.model,
        tables: Annotated[Path | None, typer.Option(help=_TABLES_HELP)] = _demo.tables,
        threads: Annotated[int, typer.Option(help=_THREADS_HELP)] = _demo.threads,
    ) -> None:
        """One real passage's KV through every codec level on SmolLM2-135M (or --model): size, speed, agreement.
        (kvcast demo runs the whole of kvcast.)"""
        from kvcast.codec.demo import run_demo
        from kvcast.codec.evaluate import EvalError
        from kvcast.codec.model import ModelUnavailable

        try:
            run_demo(out=out, context_tokens=tokens, next_tokens=next_tokens,
                     levels=list(comma_list(levels)) or None, text_file=text_file, datasets=datasets,
                     threads=threads or None, save_bitstreams=save_bitstreams, console=_console(), model=model,
                     tables=tables)
        except EvalError as exc:
            fail(str(exc))
        except ModelUnavailable as exc:
            _model_failed(exc, model)

    _cal = CalibrateSettings

    calibrate_app = typer.Typer(invoke_without_command=True, no_args_is_help=False,
                                help="Measure what kvcast needs to know of a model or host: without a subcommand, "
                                     "the model's KV sensitivity table (for the kvcast-* levels).")
    app.add_typer(calibrate_app, name="calibrate")

    @calibrate_app.callback()
    def calibrate_cmd(
        ctx: typer.Context,
        out_dir: Annotated[Path | None, typer.Option(
            help="Folder for the table (default: codec/tables, the folder the codec ships and finds tables "
                 "in).")] = _cal.out_dir,
        split: Annotated[str, typer.Option(help="valid (the tuning split) or test.")] = _cal.split,
        passages: Annotated[int, typer.Option(help="Passages of context + continuation tokens.")]
        = _cal.passages,
        trim: Annotated[float, typer.Option(
            help="Fraction of each passage's most sensitive tokens left out of the per-channel means "
                 "(secondary sinks).")] = _cal.trim,
        basis_shrink: Annotated[float, typer.Option(
            help="Shrinkage of each head's full Fisher matrix towards its diagonal before the basis of the "
                 "kvcast-basis-* levels is fitted (0: trust the sample fully, 1: diagonal only).")]
        = _cal.basis_shrink,
        basis_long_tokens: Annotated[str, typer.Option(
            help="Comma-separated longer context lengths whose Fisher correlations the basis also averages "
                 "('' for none; lengths past the model's window are skipped).")]
        = ",".join(str(n) for n in _cal.basis_long_tokens),
        basis_long_passages: Annotated[int, typer.Option(help="Passages per longer context length.")]
        = _cal.basis_long_passages,
        context_tokens: Annotated[int, typer.Option(help="Context tokens per passage.")]
        = _cal.context_tokens,
        continuation_tokens: Annotated[int, typer.Option(
            help="Continuation tokens per passage, whose log-likelihood gradients are measured.")]
        = _cal.continuation_tokens,
        datasets: Annotated[Path | None, typer.Option(help=_DATASETS_HELP)] = None,
        text_file: Annotated[Path | None, typer.Option(help="Calibrate on this UTF-8 text instead.")] = None,
        model: Annotated[str, typer.Option(
            help=_MODEL_HELP + " The table's file is named after the model.")] = _cal.model,
        threads: Annotated[int, typer.Option(help=_THREADS_HELP)] = DEFAULT_THREADS,
    ) -> None:
        """Measure a model's KV sensitivity (Fisher) table from real text, for the kvcast-* levels (default:
        SmolLM2-135M)."""
        if ctx.invoked_subcommand is not None:
            return  # e.g. `kvcast calibrate host`
        import json

        from kvcast.codec.calibrate import calibrate_model, table_summary
        from kvcast.codec.errors import CodecError
        from kvcast.codec.evaluate import EvalError
        from kvcast.codec.model import ModelUnavailable
        from kvcast.codec.sensitivity import SensitivityTable

        _set_threads(threads)
        try:
            path = calibrate_model(model, split=split, passages=passages, context_tokens=context_tokens,
                                   continuation_tokens=continuation_tokens, trim=trim, basis_shrink=basis_shrink,
                                   basis_long_tokens=tuple(int(n) for n in basis_long_tokens.split(",")
                                                           if n.strip()),
                                   basis_long_passages=basis_long_passages, out_dir=out_dir, datasets=datasets,
                                   text_file=text_file)
        except EvalError as exc:
            fail(str(exc), BAD_INPUT)
        except ModelUnavailable as exc:
            _model_failed(exc, model)
        except CodecError as exc:
            fail(str(exc), FAILED)
        summary = table_summary(SensitivityTable.load(path))
        typer.echo(json.dumps({"table": str(path), "meta": summary["meta"],
                               "distance_profile": [round(x, 3) for x in summary["distance_profile"]],
                               "score_edges": [round(x, 3) for x in summary["score_edges"] or []],
                               "score_profile": [round(x, 3) for x in summary["score_profile"] or []]}))


    return {"calibrate": calibrate_app}


def _codec_table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    s = result["summary"]
    tokens = result["settings"]["tokens"]
    table = Table(title=f"codec speed: {tokens}-token object, {s['values'] / 1e6:.1f} M values, "
                        f"{s['workers']} workers")
    for col in ("level", "bits/value", "enc Msym/s", "dec Msym/s", "enc MB/s", "dec MB/s"):
        table.add_column(col, justify="right" if col != "level" else "left")
    for r in result["rows"]:
        table.add_row(r["level"], f"{r['bits_per_value']:.3f}", f"{r['encode_msym_per_s']:.1f}",
                      f"{r['decode_msym_per_s']:.1f}", f"{r['encode_mb_per_s_fp16']:.0f}",
                      f"{r['decode_mb_per_s_fp16']:.0f}")
    return table
