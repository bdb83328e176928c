"""The `kvcast` command line. Each package registers its own commands in its `cli.py`.

Heavy imports (torch, transformers, simpy) happen inside the commands, so `kvcast --help` is fast.
"""

from __future__ import annotations

import typer

from kvcast.codec import cli as codec_cli
from kvcast.policies import cli as policies_cli
from kvcast.streamer import cli as streamer_cli
from kvcast.traces import cli as traces_cli

app = typer.Typer(help="kvcast: KV-cache codec, streaming engine, network simulation and controllers.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
bench_app = typer.Typer(help="Benchmarks: print JSON and a table.", no_args_is_help=True)
eval_app = typer.Typer(help="Quality evaluations on a real model.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(eval_app, name="eval")
app.add_typer(traces_cli.app, name="traces")

codec_cli.register(app=app, bench=bench_app, evaluate=eval_app)
streamer_cli.register(app=app, bench=bench_app, evaluate=eval_app)
policies_cli.register(app=app, bench=bench_app, evaluate=eval_app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
