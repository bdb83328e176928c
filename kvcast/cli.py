"""The `kvcast` command line. Each part registers its own commands from its `cli.py` (`register`).

Conventions for every part (`kvcast.clitools`): ``Annotated[type, typer.Option(help=...)]`` options whose
defaults are read from the part's settings dataclasses; bad input exits with code 2, a failed run with code
1, both with ``error: ...`` on stderr; every benchmark is ``kvcast bench <part>``, prints the JSON of
`kvcast.benchmark.result` alone on stdout and a table on stderr, and ``--out FILE`` writes the same JSON.

Heavy imports (torch, transformers, simpy) happen inside the commands; settings live in light modules.
"""

from __future__ import annotations

import typer

from kvcast.codec import cli as codec_cli
from kvcast.streamer import cli as streamer_cli
from kvcast.streamer import demo_cli, fetch_cli, serve_cli, store_cli, sweep_cli
from kvcast.traces import cli as traces_cli

app = typer.Typer(help="kvcast: KV-cache codec, streaming engine, network simulation and controllers.",
                  no_args_is_help=True, rich_markup_mode="rich", pretty_exceptions_show_locals=False)
bench_app = typer.Typer(help="Speed benchmarks: JSON on stdout (one layout for all), a table on stderr; "
                             "--out FILE also writes the JSON.", no_args_is_help=True)
eval_app = typer.Typer(help="Quality evaluations on a real model.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(eval_app, name="eval")

_groups = {}
for _part in (traces_cli, codec_cli, streamer_cli, sweep_cli, store_cli, serve_cli, demo_cli):
    _groups.update(_part.register(app=app, bench=bench_app, evaluate=eval_app) or {})
app.command("fetch")(fetch_cli.fetch)
_groups["calibrate"].command("host")(fetch_cli.calibrate_host)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
