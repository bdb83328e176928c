"""Command-line entry points of this package; `kvcast.cli` calls `register`."""

from __future__ import annotations

import typer


def register(app: typer.Typer, bench: typer.Typer, evaluate: typer.Typer) -> None:
    """Add this package's commands to the `kvcast` CLI."""
