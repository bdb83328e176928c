"""`kvcast demo`; `kvcast.cli` calls `register`.

Defaults come from `kvcast.streamer.demo_config.DemoConfig` (a light module); ``--quick`` starts from
`DemoConfig.quick` instead, and the options given override either. Conventions: `kvcast.clitools` (bad input
exits 2, a failed run 1, both with one ``error: ...`` line).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from kvcast.clitools import FAILED, comma_list, fail
from kvcast.streamer.demo_config import DemoConfig

__all__ = ["register"]

_DEMO = DemoConfig


def _console() -> Any:
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=140)


def register(app: typer.Typer, bench: typer.Typer, evaluate: typer.Typer) -> None:
    """Add `kvcast demo` to the `kvcast` CLI."""

    @app.command("demo")
    def demo(
        out: Annotated[Path, typer.Option(help="Folder of report.md, report.html, report.json, the PNGs and the "
                                               "run's data.")] = _DEMO.out,
        quick: Annotated[bool, typer.Option(help="The small run (one short passage and question, 8 traces x 4 "
                                                 "contexts): a few minutes; CI runs it.")] = False,
        datasets: Annotated[Path | None, typer.Option(
            help="Datasets folder (WikiText-2, LongChat lines). Default: ../shared/datasets if present, else "
                 "kvcast's generated corpus.")] = _DEMO.datasets,
        traces: Annotated[list[Path] | None, typer.Option(
            "--traces", help="Trace file or folder (repeatable). Default: ../shared/traces if present, else kvcast's "
                             "synthetic traces.")] = None,
        model: Annotated[str, typer.Option(help="smollm2 (SmolLM2-135M-Instruct), or a transformers causal-LM "
                                                "folder or hub id on this machine.")] = _DEMO.model,
        levels: Annotated[str, typer.Option(help="Comma-separated codec levels to store and measure (default: "
                                                 "all).")] = "",
        headline_gbps: Annotated[float, typer.Option(help="Link bandwidth of the headline tables (Gbps).")]
        = _DEMO.headline_gbps,
        slo: Annotated[float, typer.Option(help="TTFT target of the scaled deployment (s).")] = _DEMO.slo_s,
        threads: Annotated[int, typer.Option(help="torch threads (0: torch's default).")] = _DEMO.threads,
        workers: Annotated[int, typer.Option(help="Simulation worker processes (0: one per CPU).")] = _DEMO.workers,
        seed: Annotated[int, typer.Option(help="Seed of the questions, trace scaling and contexts.")] = _DEMO.seed,
        live_policy: Annotated[str, typer.Option(help="Policy of the live step (a policy spec, e.g. fixed:kvcast-2 "
                                                      "to stream every chunk at one level).")] = _DEMO.live_policy,
    ) -> None:
        """The whole of kvcast on real data: prefill contexts on SmolLM2-135M and store every chunk at every level,
        measure size and quality, simulate every policy over the traces, stream one context live through kvcast
        serve and answer from it; writes OUT/report.md, report.html (offline), report.json and PNG plots."""
        from kvcast.codec.model import ModelUnavailable
        from kvcast.streamer.demo import DemoError, run_demo

        changes = dict(out=out, datasets=datasets, traces=tuple(traces) if traces else None, model=model,
                       levels=comma_list(levels) or None, headline_gbps=headline_gbps, slo_s=slo, threads=threads,
                       workers=workers, seed=seed, live_policy=live_policy)
        if datasets is not None and not datasets.is_dir():
            fail(f"--datasets: {datasets} is not a folder")
        for path in traces or ():
            if not path.exists():
                fail(f"--traces: {path} does not exist")
        try:
            config = DemoConfig.quick(**changes) if quick else DemoConfig(**changes)
        except ValueError as exc:
            fail(str(exc))
        console = _console()
        try:
            results = run_demo(config, console, quick=quick)
        except DemoError as exc:
            fail(str(exc))
        except ModelUnavailable as exc:
            fail(str(exc), FAILED if model == _DEMO.model else 2)
        _summary(console, results)


def _summary(console: Any, results: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="kvcast demo: targets")
    for column in ("target", "result", "verdict"):
        table.add_column(column, overflow="fold")
    for t in results["targets"]:
        verdict = "not checked" if t["met"] is None else ("[green]met[/green]" if t["met"] else "[red]MISSED[/red]")
        table.add_row(t["target"], t["result"], verdict)
    console.print(table)
    paths = results["report_paths"]
    console.print(f"kvcast demo: {results['wall_s']:.0f} s; wrote {paths['markdown']}, {paths['html']}, "
                  f"{paths['json']} and {len(results['plots'])} plots", highlight=False, soft_wrap=True)
