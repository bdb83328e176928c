"""Conventions shared by every part's ``cli.py`` (imports only typer, rich and the standard library).

* Options are ``name: Annotated[type, typer.Option(help="Sentence.")] = default``. A default that belongs to
  a settings dataclass is read from it (``= SimulationConfig.slo_s``), never written a second time; settings
  dataclasses live in light modules (no torch, numpy or simpy at import) so ``kvcast --help`` stays fast.
* Bad input exits with code 2 (`BAD_INPUT`): `typer.BadParameter` for one option's value, `fail(message)`
  for anything else the user gave (files, specs, option combinations).
* A run that fails for another reason (no model installed, an error inside the run) exits with code 1
  (`fail(message, FAILED)`). Both print ``error: message`` on stderr.
* Benchmarks: the part's ``bench.py`` returns a `kvcast.benchmark.result` dict; the command calls
  `emit_benchmark`: the JSON alone on stdout, a table on stderr, and ``--out FILE`` writes the same JSON.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import typer

__all__ = ["BAD_INPUT", "FAILED", "comma_list", "emit_benchmark", "fail", "stderr_console"]

BAD_INPUT = 2
FAILED = 1


def stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def fail(message: str, code: int = BAD_INPUT, *, hint: str | None = None) -> NoReturn:
    """Print ``error: message`` (and a hint line) on stderr and exit with `code`."""
    from rich.markup import escape

    text = f"[red]error:[/red] {escape(message)}" + (f"\n{escape(hint)}" if hint else "")
    stderr_console().print(text, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def comma_list(text: str | None) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``."""
    return tuple(x.strip() for x in (text or "").split(",") if x.strip())


def emit_benchmark(result: dict[str, Any], table: Any, out: Path | None = None,
                   notes: Sequence[str] = ()) -> None:
    """The JSON alone on stdout, `table` (a rich renderable) and `notes` on stderr, the JSON to `out` too."""
    from rich.console import Console

    text = json.dumps(result, indent=2, allow_nan=False) + "\n"
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
    console.print(table)
    for note in notes:
        console.print(note, highlight=False, soft_wrap=True, markup=False)
    sys.stdout.write(text)
    sys.stdout.flush()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
