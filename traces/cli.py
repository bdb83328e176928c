"""`kvcast traces stats|plot|write-defaults` and `kvcast bench traces`; `kvcast.cli` calls `register`.

Conventions: `kvcast.clitools`; the benchmark's defaults: `kvcast.traces.bench.TracesBenchSettings`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from kvcast.clitools import comma_list, emit_benchmark, fail
from kvcast.traces.bench import TracesBenchSettings
from kvcast.traces.readers import ReadOptions as _READ  # the readers' defaults (kvcast.traces imports it)

traces_app = typer.Typer(help="Throughput traces: statistics and plots.", no_args_is_help=True)
app = traces_app  # the `kvcast traces` group on its own (tests invoke it directly)

_FORMAT_HELP = ("Read every file as this format (pensieve_time_mbps, mahimahi_pkt_ms, sabre_json, "
                "oboe_pair_ms_kbps, cachegen_jsonl_gbps, kvcast_json); default: MANIFEST.tsv, then content.")
# The readers' options, shared by `stats` and `plot`.
ScaleOption = Annotated[float, typer.Option(help="Multiply every bandwidth by this factor.")]
MahimahiBinOption = Annotated[float, typer.Option(help="Bin width for mahimahi traces (s).")]
ChunkDurationOption = Annotated[float, typer.Option(help="Seconds per CacheGen per-chunk value.")]


def _options(scale: float, mahimahi_bin_s: float, chunk_duration_s: float) -> Any:
    from kvcast.traces.readers import ReadOptions

    try:
        return ReadOptions(chunk_duration_s=chunk_duration_s, mahimahi_bin_s=mahimahi_bin_s,
                           bandwidth_scale=scale)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _check_format(fmt: str | None) -> None:
    from kvcast.traces.readers import FORMATS

    if fmt is not None and fmt not in FORMATS:
        raise typer.BadParameter(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")


def _pooled_percentile(values: list[Any], weights: list[Any], q: float) -> float:
    import numpy as np

    v = np.concatenate(values)
    w = np.concatenate(weights)
    order = np.argsort(v, kind="stable")
    cum = np.cumsum(w[order])
    idx = int(np.searchsorted(cum, q / 100.0 * cum[-1] * (1 - 1e-12), side="left"))
    return float(v[order[min(idx, v.size - 1)]])


@traces_app.command("stats")
def stats(
    paths: Annotated[list[Path], typer.Argument(help="Trace files or folders (searched recursively).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    fmt: Annotated[str | None, typer.Option("--format", help=_FORMAT_HELP)] = None,
    recursive: Annotated[bool, typer.Option(help="Search folders recursively.")] = True,
    strict: Annotated[bool, typer.Option(help="Stop at the first unreadable file instead of skipping it.")]
    = False,
    scale: ScaleOption = _READ.bandwidth_scale,
    mahimahi_bin_s: MahimahiBinOption = _READ.mahimahi_bin_s,
    chunk_duration_s: ChunkDurationOption = _READ.chunk_duration_s,
) -> None:
    """Per-trace statistics (duration, time-weighted mean/p10/p90 Mbps) with totals."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from kvcast.traces.readers import load_traces
    from kvcast.traces.trace import TraceError

    _check_format(fmt)
    opts = _options(scale, mahimahi_bin_s, chunk_duration_s)
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise typer.BadParameter(f"no such file or folder: {', '.join(missing)}")
    err = Console(stderr=True)
    try:
        result = load_traces(paths, recursive=recursive, on_error="raise" if strict else "skip", format=fmt,
                             options=opts, progress=not as_json and sys.stderr.isatty())
    except TraceError as exc:
        fail(str(exc))
    rows = []
    for tf in result.files:
        for trace in tf.traces:
            rows.append({
                "file": str(tf.path), "name": trace.name, "format": tf.format, "segments": trace.num_segments,
                "duration_s": trace.duration_s, "mean_mbps": trace.mean_bps / 1e6,
                "p10_mbps": trace.percentile_bps(10) / 1e6, "p90_mbps": trace.percentile_bps(90) / 1e6,
            })
    traces = result.traces
    totals: dict[str, Any] = {"files": len(result.files), "traces": len(traces), "skipped": len(result.skipped)}
    if traces:
        duration = sum(t.duration_s for t in traces)
        widths = [t.boundaries_s[1:] - t.boundaries_s[:-1] for t in traces]
        values = [t.bandwidth_bps for t in traces]
        totals.update(duration_s=duration, mean_mbps=sum(t.total_bits for t in traces) / duration / 1e6,
                      p10_mbps=_pooled_percentile(values, widths, 10) / 1e6,
                      p90_mbps=_pooled_percentile(values, widths, 90) / 1e6)
    skipped = [{"file": str(p), "error": str(e)} for p, e in result.skipped]
    if as_json:
        typer.echo(json.dumps({"traces": rows, "totals": totals, "skipped": skipped}, indent=2))
        return
    table = Table(title=f"{len(traces)} traces from {len(result.files)} files", show_footer=bool(traces))
    foot = totals if traces else {}
    table.add_column("file", footer="total", overflow="fold", ratio=1)
    table.add_column("format", no_wrap=True)
    table.add_column("duration s", justify="right", footer=_fmt(foot.get("duration_s"), ".1f"))
    table.add_column("mean Mbps", justify="right", footer=_fmt(foot.get("mean_mbps"), ".4g"))
    table.add_column("p10 Mbps", justify="right", footer=_fmt(foot.get("p10_mbps"), ".4g"))
    table.add_column("p90 Mbps", justify="right", footer=_fmt(foot.get("p90_mbps"), ".4g"))
    for row in rows:
        label = row["file"] if row["name"] in (Path(row["file"]).name, "") else f"{row['file']} [{row['name']}]"
        table.add_row(escape(label), row["format"], f"{row['duration_s']:.1f}", f"{row['mean_mbps']:.4g}",
                      f"{row['p10_mbps']:.4g}", f"{row['p90_mbps']:.4g}")
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    for item in skipped:
        err.print(f"[yellow]skipped:[/yellow] {escape(item['error'])}", highlight=False, soft_wrap=True)


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


@traces_app.command("plot")
def plot(
    file: Annotated[Path, typer.Argument(help="A trace file.", exists=True, dir_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")],
    fmt: Annotated[str | None, typer.Option("--format", help=_FORMAT_HELP)] = None,
    index: Annotated[int | None, typer.Option(help="Plot only this trace of a multi-trace file.")] = None,
    scale: ScaleOption = _READ.bandwidth_scale,
    mahimahi_bin_s: MahimahiBinOption = _READ.mahimahi_bin_s,
    chunk_duration_s: ChunkDurationOption = _READ.chunk_duration_s,
    title: Annotated[str | None, typer.Option(help="Plot title (default: the file name).")] = None,
) -> None:
    """Plot a trace's bandwidth over time (step plot) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from kvcast.traces.readers import read_trace_file
    from kvcast.traces.trace import TraceError

    _check_format(fmt)
    try:
        tf = read_trace_file(file, format=fmt, options=_options(scale, mahimahi_bin_s, chunk_duration_s))
    except TraceError as exc:
        fail(str(exc))
    traces = list(tf.traces)
    if index is not None:
        if not -len(traces) <= index < len(traces):
            raise typer.BadParameter(f"--index {index} out of range: {file} holds {len(traces)} traces")
        traces = [traces[index]]
    peak = max(float(t.bandwidth_bps.max()) for t in traces)
    unit, div = next(((u, d) for u, d in (("Gbps", 1e9), ("Mbps", 1e6), ("kbps", 1e3)) if peak >= d),
                     ("bps", 1.0))
    fig, ax = plt.subplots(figsize=(10, 3.6), dpi=110)
    for trace in traces[:20]:
        x = trace.boundaries_s
        y = np.append(trace.bandwidth_bps, trace.bandwidth_bps[-1]) / div
        label = f"{trace.name} (mean {trace.mean_bps / div:.3g} {unit})"
        ax.step(x, y, where="post", linewidth=0.9, label=label)
    if len(traces) == 1:
        ax.axhline(traces[0].mean_bps / div, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"bandwidth ({unit})")
    ax.set_ylim(bottom=0)
    ax.set_title(title or f"{file.name} ({tf.format}{f', x{scale:g}' if scale != 1 else ''})")
    ax.grid(alpha=0.3)
    if len(traces) <= 10:
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    shown = min(len(traces), 20)
    typer.echo(f"wrote {out} ({shown} of {len(tf.traces)} trace{'s' if len(tf.traces) != 1 else ''})")


@traces_app.command("write-defaults")
def write_defaults(
    directory: Annotated[Path | None, typer.Argument(help="Output folder (default: the package's "
                                                            "traces/default).")] = None,
) -> None:
    """(Re)generate kvcast's default synthetic traces from their seeds."""
    from kvcast.traces.defaults import write_default_traces

    for path in write_default_traces(directory):
        typer.echo(str(path))


def register(app: typer.Typer, bench: typer.Typer, evaluate: typer.Typer) -> None:
    """Add ``kvcast traces ...`` and ``kvcast bench traces`` to the `kvcast` CLI."""
    app.add_typer(traces_app, name="traces")

    _bench = TracesBenchSettings

    @bench.command("traces")
    def bench_traces(
        sizes: Annotated[str, typer.Option(help="Comma-separated segments per random trace.")]
        = ",".join(map(str, _bench.sizes)),
        calls: Annotated[int, typer.Option(help="Calls per timing sample.")] = _bench.calls,
        repeats: Annotated[int, typer.Option(help="Timing samples (the median is reported).")]
        = _bench.repeats,
        seed: Annotated[int, typer.Option(help="Seed of the random traces and calls.")] = _bench.seed,
        out: Annotated[Path | None, typer.Option(help="Also write the JSON to this file.")] = None,
    ) -> None:
        """Trace integration cost: Trace.transfer_end_s / delivered_bits per call and per element."""
        from kvcast.traces.bench import bench_traces as run

        try:
            segments = tuple(int(x) for x in comma_list(sizes))
        except ValueError:
            raise typer.BadParameter(f"expected comma-separated integers, got {sizes!r}",
                                     param_hint="--sizes") from None
        try:
            settings = TracesBenchSettings(sizes=segments, calls=calls, repeats=repeats, seed=seed)
        except ValueError as exc:
            fail(str(exc))
        result = run(settings)
        emit_benchmark(result, _bench_table(result), out)


def _bench_table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title="Trace integration cost (medians)")
    for col in ("segments", "wrap", "transfer_end_s µs/call", "delivered_bits µs/call",
                "transfer_end_s vec ns/elem", "delivered_bits vec ns/elem"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(str(r["segments"]), str(r["wrap"]), f"{r['transfer_end_s_us_per_call']:.2f}",
                      f"{r['delivered_bits_us_per_call']:.2f}",
                      f"{r['transfer_end_s_vectorised_ns_per_elem']:.0f}",
                      f"{r['delivered_bits_vectorised_ns_per_elem']:.0f}")
    return table
