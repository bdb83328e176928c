"""The `kvcast` command line. Each package registers its own commands in its `cli.py`.

Heavy imports (torch, transformers, simpy) happen inside the commands, so `kvcast --help` is fast.
"""

from __future__ import annotations

import typer

import codec.cli
import policies.cli
import streamer.cli
import traces.cli

app = typer.Typer(help="kvcast: KV-cache codec, streaming engine, network simulation and controllers.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
bench_app = typer.Typer(help="Benchmarks: print JSON and a table.", no_args_is_help=True)
eval_app = typer.Typer(help="Quality evaluations on a real model.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(eval_app, name="eval")
app.add_typer(traces.cli.app, name="traces")

codec.cli.register(app=app, bench=bench_app, evaluate=eval_app)
streamer.cli.register(app=app, bench=bench_app, evaluate=eval_app)
policies.cli.register(app=app, bench=bench_app, evaluate=eval_app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
