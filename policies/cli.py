"""`kvcast bench mpc`; `kvcast.cli` calls `register`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer, bench: typer.Typer, evaluate: typer.Typer) -> None:
    """Add the policies' commands to the `kvcast` CLI."""

    @bench.command("mpc")
    def bench_mpc(
        sessions: Annotated[int, typer.Option(help="Engine sessions whose mpc decisions are recorded and "
                                                   "timed.")] = 40,
        enumerate_count: Annotated[int, typer.Option(
            "--enumerate", help="Full-horizon problems also solved by full enumeration (~0.05 s each).")]
        = 60,
        repeats: Annotated[int, typer.Option(help="Timed repeats (the median is reported).")] = 5,
        seed: Annotated[int, typer.Option(help="Seed of the sessions and of the enumerated subset.")] = 0,
        levels: Annotated[str, typer.Option(
            help="Menu levels: a set (all, cachegen, kvcast) or level names, comma-separated.")] = "kvcast",
        out: Annotated[Optional[Path], typer.Option(help="Also write the JSON here.")] = None,
    ) -> None:
        """mpc speed: whole decide() calls/s; its exact search vs full enumeration on the same problems."""
        from kvcast.policies.bench_mpc import bench, print_result

        if sessions < 1 or repeats < 1 or enumerate_count < 0:
            raise typer.BadParameter("--sessions and --repeats must be >= 1, --enumerate >= 0")
        result = bench(sessions=sessions, enumerate_count=enumerate_count, repeats=repeats, seed=seed,
                       levels=levels)
        print_result(result)
        if out is not None:
            out.write_text(json.dumps(result, indent=2) + "\n")
