"""`kvcast traces ...` commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="Throughput traces: statistics and plots.", no_args_is_help=True)
