"""`kvcast serve` and `kvcast bench serve`; `kvcast.cli` calls `register`.

Defaults come from light modules (no aiohttp at import): `kvcast.streamer.serve_config.ServeLimits` and
`kvcast.streamer.bench_serve.ServeBenchSettings`; conventions: `kvcast.clitools` (bad input exits 2, a failed
run 1, both with one ``error: ...`` line).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from kvcast.clitools import FAILED, emit_benchmark, fail
from kvcast.streamer.bench_serve import ServeBenchSettings
from kvcast.streamer.serve_config import (
    ACCESS_LOGGER,
    DEFAULT_HOST,
    DEFAULT_PORT,
    MIN_TOKEN_CHARS,
    TOKEN_ENV,
    ServeLimits,
    check_token,
)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_token(token_file: Path | None, no_auth: bool, host: str) -> str | None:
    """The bearer token (None with --no-auth); fails with a message that never shows the token."""
    from rich.console import Console

    if no_auth:
        if token_file is not None:
            fail("--no-auth and --token-file contradict each other: choose one")
        if not _is_loopback(host):
            fail(f"--no-auth serves only on a loopback address (127.0.0.1, ::1, localhost), not {host!r}: "
                 f"give a token (--token-file or {TOKEN_ENV}) to listen there")
        if os.environ.get(TOKEN_ENV):
            Console(stderr=True).print(f"note: {TOKEN_ENV} is ignored (--no-auth)", highlight=False)
        return None
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="ascii").strip()
            mode = token_file.stat().st_mode
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read the token file {token_file}: {type(exc).__name__}")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            Console(stderr=True).print(f"warning: the token file {token_file} is readable by other users "
                                       "(chmod 600 it)", highlight=False, soft_wrap=True)
        where = f"the token file {token_file}"
    elif os.environ.get(TOKEN_ENV):
        token = os.environ[TOKEN_ENV].strip()
        where = TOKEN_ENV
    else:
        fail(f"no token: set {TOKEN_ENV} or pass --token-file FILE (or --no-auth to serve loopback without one)")
    try:
        return check_token(token, MIN_TOKEN_CHARS)
    except ValueError as exc:
        fail(f"{where}: {exc}")


def _access_logger(target: str) -> logging.Logger | None:
    """The ``kvcast.serve`` logger writing bare JSON lines to `target` (``-``: stdout, ``off``: nowhere)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.propagate = False
    if target == "off":
        logger.disabled = True
        return logger
    if target == "-":
        handler: logging.Handler = logging.StreamHandler(sys.stdout)
    else:
        try:
            handler = logging.FileHandler(target, mode="a", encoding="utf-8")
        except OSError as exc:
            fail(f"cannot open the access log {target}: {exc.strerror or exc}")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger


def register(app: typer.Typer, bench: typer.Typer, evaluate: typer.Typer) -> None:
    """Add `kvcast serve` and `kvcast bench serve` to the `kvcast` CLI."""
    _limits = ServeLimits

    @app.command("serve")
    def serve(
        store: Annotated[str | None, typer.Option(
            help="The KV store to serve: dir://PATH (or a folder) or redis://HOST:PORT/DB. Required.")] = None,
        host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = DEFAULT_HOST,
        port: Annotated[int, typer.Option(help="TCP port (0: any free port, reported on stderr).")] = DEFAULT_PORT,
        token_file: Annotated[Path | None, typer.Option(
            help=f"File holding the bearer token (default: the {TOKEN_ENV} environment variable).")] = None,
        no_auth: Annotated[bool, typer.Option(
            "--no-auth", help="Serve without a token (loopback addresses only).")] = False,
        trace: Annotated[Path | None, typer.Option(
            help="Throughput trace file (any format traces/ reads) to pace responses by, in real time.")] = None,
        rtt_ms: Annotated[float, typer.Option(help="Round-trip time added to each paced request (ms; "
                                                    "needs --trace).")] = 0.0,
        max_streams: Annotated[int, typer.Option(help="Chunk streams in flight at once (more: 503).")]
        = _limits.max_streams,
        rate: Annotated[float, typer.Option(help="Requests per second per client address (more: 429; "
                                                  "0: no limit).")] = _limits.rate_per_s,
        burst: Annotated[int, typer.Option(help="Requests a client may make at once (the rate limit's "
                                                 "bucket).")] = _limits.burst,
        access_log: Annotated[str, typer.Option(
            help="Where the JSON access log goes: a file (appended), - for stdout, off.")] = "-",
    ) -> None:
        """Serve a KV store's manifests and chunks over HTTP (auth, ranges, limits, metrics, trace pacing).

        Endpoints: GET /healthz, /metrics, /v1/contexts, /v1/contexts/ID/manifest,
        /v1/contexts/ID/chunks/INDEX/LEVEL (Range requests); POST /v1/pacing/reset. See docs/streaming.md.
        Stops on SIGINT or SIGTERM.
        """
        from rich.console import Console

        from kvcast.streamer.serve import run_server
        from kvcast.streamer.store import StoreError, open_store

        console = Console(stderr=True)
        if store is None:
            fail("--store is required: a folder, dir://PATH or redis://HOST:PORT/DB")
        if not 0 <= port <= 65535:
            raise typer.BadParameter(f"--port must be 0-65535, got {port}")
        if not (0.0 <= rtt_ms < 1e6):
            raise typer.BadParameter(f"--rtt-ms must be >= 0, got {rtt_ms}")
        if rtt_ms and trace is None:
            fail("--rtt-ms needs --trace (the RTT is part of the emulated network)")
        token = _read_token(token_file, no_auth, host)
        try:
            limits = ServeLimits(max_streams=max_streams, rate_per_s=rate, burst=burst)
        except ValueError as exc:
            fail(str(exc))
        pacer = _pacer(trace, rtt_ms) if trace is not None else None
        try:
            opened = open_store(store)
        except StoreError as exc:
            fail(str(exc))
        root = getattr(opened, "root", None)  # a folder store: a typo would serve an empty, new folder
        if isinstance(root, Path) and not root.is_dir():
            fail(f"no store at {root} (not a folder)")
        try:
            contexts = len(opened.contexts())
        except StoreError as exc:
            fail(f"the store {store} is not usable: {exc}", FAILED)
        logger = _access_logger(access_log)

        def ready(bound_host: str, bound_port: int) -> None:
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            pacing = "off" if pacer is None else (f"trace {pacer.trace.name or trace} "
                                                  f"(mean {pacer.trace.mean_bps / 1e6:.3g} Mbps), RTT {rtt_ms:g} ms")
            console.print(f"kvcast serve: listening on http://{shown}:{bound_port} ({opened.url}: {contexts} "
                          f"contexts; auth {'none' if token is None else 'bearer token'}; pacing {pacing})",
                          highlight=False, soft_wrap=True, markup=False)

        try:
            run_server(opened, host=host, port=port, token=token, pacer=pacer, limits=limits,
                       access_logger=logger, on_ready=ready)
        except OSError as exc:  # the address is taken or cannot be bound
            fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", FAILED)
        finally:
            opened.close()
        console.print("kvcast serve: stopped", highlight=False)

    _bench = ServeBenchSettings

    @bench.command("serve")
    def bench_serve(
        objects: Annotated[int, typer.Option(help="Synthetic objects in the temporary store.")] = _bench.objects,
        object_mib: Annotated[float, typer.Option(help="Size of each object (MiB).")] = _bench.object_mib,
        sessions: Annotated[int, typer.Option(help="Concurrent client sessions of the load test.")]
        = _bench.sessions,
        chunks_per_session: Annotated[int, typer.Option(help="Chunks each session fetches, one after the "
                                                              "other.")] = _bench.chunks_per_session,
        repeats: Annotated[int, typer.Option(help="Single-stream repeats (the median is reported).")]
        = _bench.repeats,
        out: Annotated[Path | None, typer.Option(help="Also write the JSON to this file.")] = None,
    ) -> None:
        """kvcast serve speed: single-stream GB/s and a load test of concurrent sessions, on loopback.

        Fills a temporary dir:// store with random objects, starts `kvcast serve` in a subprocess on a free
        loopback port and reads from it with aiohttp clients in this process (the two share the machine's CPUs).
        """
        from kvcast.streamer.bench_serve import BenchServeError
        from kvcast.streamer.bench_serve import bench_serve as run

        try:
            settings = ServeBenchSettings(objects=objects, object_mib=object_mib, sessions=sessions,
                                          chunks_per_session=chunks_per_session, repeats=repeats)
        except ValueError as exc:
            fail(str(exc))
        try:
            result = run(settings)
        except BenchServeError as exc:
            fail(str(exc), FAILED)
        emit_benchmark(result, _bench_table(result), out, notes=[_bench_note(result)])


PACING_SLACK_S = 0.005
"""How late a paced piece may be reserved and still continue the link's timeline (`TracePacer.slack_s`)."""


def _pacer(trace_path: Path, rtt_ms: float) -> Any:
    from kvcast.netsim.pacing import TracePacer
    from kvcast.traces.readers import load_trace
    from kvcast.traces.trace import TraceError

    try:
        trace = load_trace(trace_path)
    except (TraceError, OSError, ValueError) as exc:
        fail(f"--trace: {exc}")
    try:
        # A piece the event loop sends a few ms late continues its stream's timeline: without the slack every
        # scheduling delay between pieces is capacity lost for good (measured: ~20 ms a 6 MB object).
        return TracePacer(trace, rtt_s=rtt_ms / 1e3, slack_s=PACING_SLACK_S)
    except ValueError as exc:
        fail(f"--trace {trace_path}: {exc}")


def _bench_table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    s = result["summary"]
    table = Table(title="kvcast bench serve (loopback)")
    table.add_column("measure")
    table.add_column("value", justify="right")

    def number(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    table.add_row("single stream GB/s (median)", number(s["single_stream_gb_per_s"], ".2f"))
    table.add_row(f"  target {s['single_stream_target_gb_per_s']:g} GB/s met", str(s["meets_target"]))
    table.add_row(f"{s['sessions']} sessions: requests / errors", f"{s['requests']} / {s['errors']}")
    table.add_row("  chunk latency p50 / p99 (s)",
                  f"{number(s['latency_p50_s'], '.3f')} / {number(s['latency_p99_s'], '.3f')}")
    table.add_row("  aggregate GB/s", number(s["aggregate_gb_per_s"], ".2f"))
    table.add_row("server RSS after start / peak (MiB)",
                  f"{number(s['server_start_rss_mib'], '.0f')} / {number(s['server_peak_rss_mib'], '.0f')}")
    return table


def _bench_note(result: dict[str, Any]) -> str:
    machine = result["machine"]
    load = machine["load_average_1min"]
    return (f"client and server share {machine['cpus']} CPUs"
            + ("" if load is None else f"; load average {load:.1f}"))
