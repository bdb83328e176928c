"""`kvcast simulate` and `kvcast bench sim`; `kvcast.cli` calls `register`."""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

_DEFAULTS_HELP = "Default: see streamer.simulate.SimulationConfig."


def _range(text: str, what: str, cast: Any) -> tuple[Any, Any]:
    """``"a-b"`` or ``"a"`` -> (a, b)."""
    parts = re.split(r"(?<![eE])-", text.strip())
    try:
        values = [cast(p) for p in parts if p != ""]
    except ValueError:
        raise typer.BadParameter(f"{what}: expected a number or low-high, got {text!r}") from None
    if len(values) == 1:
        return values[0], values[0]
    if len(values) != 2 or values[0] > values[1]:
        raise typer.BadParameter(f"{what}: expected a number or low-high with low <= high, got {text!r}")
    return values[0], values[1]


def _load(traces: list[Path] | None, on_bad_trace: str,
          console: Any) -> tuple[list[Any], list[tuple[str, str]]]:
    """The traces to simulate and the skipped files (path, error)."""
    from rich.markup import escape

    from kvcast.traces.readers import load_traces
    from kvcast.traces.trace import TraceError

    if not traces:
        from kvcast.traces.defaults import default_traces

        return list(default_traces()), []
    try:
        loaded = load_traces([str(p) for p in traces], on_error=on_bad_trace, progress=True)
    except (TraceError, OSError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}\n"
                      "(use --on-bad-trace skip to report and skip bad files)",
                      markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    skipped = [(str(p), str(e)) for p, e in loaded.skipped]
    usable = []
    for trace in loaded.traces:  # readable but useless: nothing would ever be delivered
        if trace.mean_bps > 0:
            usable.append(trace)
            continue
        problem = f"trace {trace.name!r} has zero bandwidth throughout; nothing can be delivered"
        if on_bad_trace == "raise":
            console.print(f"[red]error:[/red] {escape(trace.source)}: {escape(problem)}\n"
                          "(use --on-bad-trace skip to report and skip bad files)", highlight=False,
                          soft_wrap=True)
            raise typer.Exit(2)
        skipped.append((trace.source, problem))
        console.print(f"[yellow]skipped[/yellow] {escape(trace.source)}: {escape(problem)}", highlight=False,
                      soft_wrap=True)
    for path, exc in loaded.skipped:
        console.print(f"[yellow]skipped[/yellow] {escape(str(path))}: {escape(str(exc))}", highlight=False,
                      soft_wrap=True)
    if not usable:
        console.print("[red]error:[/red] no usable trace in " + escape(", ".join(map(str, traces))),
                      soft_wrap=True)
        raise typer.Exit(2)
    return usable, skipped


def register(app: typer.Typer, bench: typer.Typer, evaluate: typer.Typer) -> None:
    """Add the streaming engine's commands to the `kvcast` CLI."""

    @app.command("simulate")
    def simulate(
        traces: Annotated[Optional[list[Path]], typer.Option(
            "--traces", help="Trace file or folder (repeatable). Default: kvcast's synthetic default set.")]
        = None,
        policies: Annotated[str, typer.Option(
            help="Comma-separated policy specs, e.g. text,raw,cachegen,fixed:cachegen-2.")]
        = "text,raw,fixed:cachegen-2,cachegen,cachegen-code",
        out: Annotated[Path, typer.Option(help="Output folder.")] = Path("results/simulate"),
        model: Annotated[str, typer.Option(help="Model shape name or layers,kv_heads,head_dim.")]
        = "mistral-7b",
        gpu: Annotated[str, typer.Option(help="GPU of the recompute cost table.")] = "h100",
        recompute: Annotated[Optional[str], typer.Option(
            help="Recompute cost override: gpu/model or a,b,c (s/token, s/token pair, s).")] = None,
        profile: Annotated[Optional[Path], typer.Option(
            help="kvcast-profile/1 JSON (default: the shipped profile, measured on WikiText-2 test).")] = None,
        levels: Annotated[Optional[str], typer.Option(
            help="Codec levels on the menu, comma-separated, united: a set (all, cachegen = raw, int8, "
                 "cachegen-N; kvcast = raw, int8, kvcast-N) or level names. Default: all. cachegen and "
                 "cachegen-code only use CacheGen's own levels of it.")]
        = None,
        chunk_tokens: Annotated[int, typer.Option(help="Tokens per chunk.")] = 1536,
        context_tokens: Annotated[str, typer.Option(
            help="Context length, or a range low-high drawn per context.")]
        = "12288-20480",
        contexts: Annotated[int, typer.Option(help="Contexts per trace.")] = 20,
        slo: Annotated[float, typer.Option(help="TTFT target in seconds.")] = 0.6,
        scaling: Annotated[str, typer.Option(
            help="range (trace means log-uniform in --mean-gbps), none, or factor:X.")] = "range",
        mean_gbps: Annotated[str, typer.Option(help="Range of trace means for --scaling range (Gbps).")]
        = "1-10",
        rtt_ms: Annotated[float, typer.Option(help="Round-trip time per chunk request (ms).")] = 10.0,
        efficiency: Annotated[float, typer.Option(help="Payload bytes per wire byte.")] = 0.95,
        overhead_bytes: Annotated[int, typer.Option(help="Extra bytes per request.")] = 400,
        prior_window: Annotated[float, typer.Option(
            help="Seconds of trace history averaged into the policies' prior throughput.")] = 5.0,
        query_prefill: Annotated[float, typer.Option(help="Query prefill added to TTFT (s).")] = 0.0,
        seed: Annotated[int, typer.Option(help="Seed of contexts, offsets and scaling.")] = 0,
        workers: Annotated[int, typer.Option(help="Worker processes (0: one per CPU).")] = 0,
        on_bad_trace: Annotated[str, typer.Option(help="error: stop at a malformed trace file; skip: report "
                                                       "and skip it.")] = "error",
        chunk_log: Annotated[bool, typer.Option(help="Write per-chunk records to OUT/chunks.jsonl.")] = True,
        max_traces: Annotated[int, typer.Option(help="Use only the first N traces (0: all).")] = 0,
    ) -> None:
        """Trace-driven simulation of policies x traces x contexts; writes summary.json, tables and plots.

        Outputs in OUT: summary.json (one object per policy: sessions, slo_violation_rate, ttft_mean_s,
        ttft_p95_s, quality_loss_mean, bytes_mean, each with a 95% bootstrap CI), summary.md, sessions.jsonl,
        chunks.jsonl, ttft_cdf.png, pareto.png, run.json (configuration, skipped traces, timing).
        """
        from rich.console import Console
        from rich.markup import escape

        from kvcast.streamer.simulate import SimulationConfig

        console = Console(stderr=True)
        if on_bad_trace not in ("error", "skip"):
            raise typer.BadParameter("--on-bad-trace must be 'error' or 'skip'")
        try:
            config = SimulationConfig(
                policies=tuple(p.strip() for p in policies.split(",") if p.strip()), model=model, gpu=gpu,
                recompute=recompute, profile=None if profile is None else str(profile),
                levels=None if not levels else tuple(x.strip() for x in levels.split(",")),
                chunk_tokens=chunk_tokens, context_tokens=_range(context_tokens, "--context-tokens", int),
                contexts=contexts, slo_s=slo, scaling=scaling,
                mean_gbps=_range(mean_gbps, "--mean-gbps", float),
                rtt_s=rtt_ms / 1e3, efficiency=efficiency, overhead_bytes=overhead_bytes,
                prior_window_s=prior_window, query_prefill_s=query_prefill, seed=seed)
            _check_config(config)
        except (ValueError, KeyError) as exc:
            console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        trace_list, skipped = _load(traces, "raise" if on_bad_trace == "error" else "skip", console)
        if max_traces > 0:
            trace_list = trace_list[:max_traces]
        run_simulation(trace_list, config, out, workers=workers or None, chunk_log=chunk_log, skipped=skipped,
                       console=console)

    @bench.command("sim")
    def bench_sim(
        policy: Annotated[str, typer.Option(help="Policy spec to time (a greedy one by default).")]
        = "cachegen",
        sessions: Annotated[int, typer.Option(help="Sessions per repeat.")] = 1000,
        repeats: Annotated[int, typer.Option(help="Timed repeats (median reported).")] = 5,
        context_tokens: Annotated[int, typer.Option(help="Tokens per context.")] = 16384,
        chunk_tokens: Annotated[int, typer.Option(help="Tokens per chunk.")] = 1536,
        sweep_traces: Annotated[int, typer.Option(
            help="Also time a full `simulate` sweep (processes, chunk log) over this many traces x 20 "
                 "contexts and extrapolate to 350 traces (0: skip).")] = 0,
        sweep_policies: Annotated[str, typer.Option(help="Policies of the timed sweep.")]
        = "text,raw,fixed:cachegen-2,cachegen,cachegen-code,fixed:int8",
        traces: Annotated[Optional[list[Path]], typer.Option(
            "--traces", help="Traces of the timed sweep (default: kvcast's default set, repeated).")] = None,
        workers: Annotated[int, typer.Option(help="Sweep worker processes (0: one per CPU).")] = 0,
        out: Annotated[Optional[Path], typer.Option(help="Also write the JSON here.")] = None,
    ) -> None:
        """Simulation speed: simulated chunks per second on one core (engine + SimPy link + policy)."""
        from rich.console import Console

        result = run_bench_sim(policy=policy, sessions=sessions, repeats=repeats,
                               context_tokens=context_tokens, chunk_tokens=chunk_tokens)
        if sweep_traces > 0:
            console = Console(stderr=True)
            trace_list = None
            if traces:
                trace_list = _load(traces, "skip", console)[0]
            result["sweep"] = run_bench_sweep(sweep_traces, tuple(sweep_policies.split(",")), trace_list,
                                              workers or None)
        _print_bench(result)
        if out is not None:
            out.write_text(json.dumps(result, indent=2) + "\n")


def _check_config(config: Any) -> None:
    """Fail early, before any worker starts, on a bad policy, profile, shape or cost: every policy runs one
    short session on a constant trace (ValueError with the policy's name otherwise)."""
    from kvcast.policies.registry import default_registry
    from kvcast.streamer.menus import build_menus
    from kvcast.streamer.simulate import simulate_session
    from kvcast.traces.trace import Trace

    registry = default_registry()
    profile = config.load_profile()
    menus = build_menus(profile, config.shape(), config.context_tokens[0], config.chunk_tokens,
                        config.recompute_cost(), levels=config.levels)
    trace = Trace([0.0, 1e6], [config.mean_gbps[0] * 1e9])
    for spec in config.policies:
        try:
            simulate_session(registry.create(spec), menus, trace, slo_s=config.slo_s, rtt_s=config.rtt_s,
                             prior_throughput_bps=trace.mean_bps)
        except Exception as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise ValueError(f"policy {spec!r}: {message}") from None


def run_simulation(traces: list[Any], config: Any, out: Path, *, workers: int | None, chunk_log: bool = True,
                   skipped: list[tuple[str, str]] | None = None, console: Any = None) -> list[dict[str, Any]]:
    """Run a sweep and write every output file into `out`; returns the summary list."""
    from rich.console import Console
    from tqdm import tqdm

    from kvcast.streamer.report import markdown_table, plot_pareto, plot_ttft_cdf, rich_table, summarize
    from kvcast.streamer.simulate import run_sweep

    console = console or Console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    total = len(traces) * config.contexts * len(config.policies)
    sessions: list[dict[str, Any]] = []
    chunks = 0
    t0 = time.perf_counter()
    with open(out / "sessions.jsonl", "w") as fs, \
            (open(out / "chunks.jsonl", "w") if chunk_log else open(_devnull(), "w")) as fc, \
            tqdm(total=total, desc="simulating", unit="session", file=sys.stderr) as bar:
        for outcome in run_sweep(traces, config, workers=workers, chunk_log=chunk_log):
            for row in outcome.sessions:
                fs.write(json.dumps(row, separators=(",", ":")) + "\n")
            if chunk_log and outcome.chunk_lines:
                fc.write("\n".join(outcome.chunk_lines) + "\n")
            sessions.extend(outcome.sessions)
            chunks += outcome.chunks
            bar.update(len(outcome.sessions))
    wall = time.perf_counter() - t0
    summary = summarize(sessions, seed=config.seed)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    title = (f"{len(traces)} traces x {config.contexts} contexts, SLO {config.slo_s:g} s, {config.model}, "
             f"{config.gpu}, levels {','.join(config.levels) if config.levels else 'all'}")
    (out / "summary.md").write_text(f"# kvcast simulate: {title}\n\n95% bootstrap CIs in brackets.\n\n"
                                    + markdown_table(summary))
    plot_ttft_cdf(sessions, out / "ttft_cdf.png", slo_s=config.slo_s)
    plot_pareto(summary, out / "pareto.png")
    from kvcast.streamer.menus import resolve_levels

    menu_levels = list(resolve_levels(config.load_profile(), config.levels))
    run = {"config": config.to_json_dict(), "menu_levels": menu_levels, "traces": len(traces),
           "sessions": len(sessions), "chunks": chunks,
           "wall_s": wall, "chunks_per_s": chunks / wall if wall > 0 else None,
           "skipped_traces": [{"path": p, "error": e} for p, e in (skipped or [])]}
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    Console(width=max(Console().width, 130)).print(rich_table(summary, title=title))
    console.print(f"{len(sessions)} sessions, {chunks} chunks in {wall:.1f} s; outputs in {out}/",
                  highlight=False)
    return summary


def _devnull() -> str:
    import os

    return os.devnull


def run_bench_sim(*, policy: str, sessions: int, repeats: int, context_tokens: int,
                  chunk_tokens: int) -> dict[str, Any]:
    """Time `sessions` sessions of `policy` per repeat in this process (default traces, default config)."""
    from kvcast.policies.registry import default_registry
    from kvcast.streamer.menus import build_menus
    from kvcast.streamer.simulate import SimulationConfig, history_mean_bps, session_in_virtual_time
    from kvcast.netsim.virtual_time import VirtualTimeLoop
    from kvcast.traces.defaults import default_traces

    config = SimulationConfig(policies=(policy,), chunk_tokens=chunk_tokens)
    menus = build_menus(config.load_profile(), config.shape(), context_tokens, chunk_tokens,
                        config.recompute_cost())
    registry = default_registry()
    traces = default_traces()
    rates, session_rates = [], []
    chunks_per_repeat = 0

    async def one_repeat() -> int:
        chunks = 0
        for i in range(sessions):
            trace = traces[i % len(traces)]
            offset = (i * 7.919) % trace.duration_s
            prior = history_mean_bps(trace, offset, config.prior_window_s)
            result = await session_in_virtual_time(
                registry.create(policy), menus, trace, slo_s=config.slo_s, offset_s=offset,
                rtt_s=config.rtt_s, efficiency=config.efficiency, overhead_bytes=config.overhead_bytes,
                prior_throughput_bps=prior)
            chunks += len(result.chunks)
        return chunks

    loop = VirtualTimeLoop()
    for _ in range(repeats):
        t0 = time.perf_counter()
        chunks = loop.run_until_complete(one_repeat())
        wall = time.perf_counter() - t0
        rates.append(chunks / wall)
        session_rates.append(sessions / wall)
        chunks_per_repeat = chunks
    loop.close()
    return {"bench": "sim", "policy": policy, "sessions": sessions, "chunks": chunks_per_repeat,
            "chunks_per_session": chunks_per_repeat / sessions, "repeats": repeats,
            "chunks_per_s": statistics.median(rates), "chunks_per_s_all": rates,
            "sessions_per_s": statistics.median(session_rates), "context_tokens": context_tokens,
            "chunk_tokens": chunk_tokens}


def run_bench_sweep(n_traces: int, policies: tuple[str, ...], traces: list[Any] | None,
                    workers: int | None) -> dict[str, Any]:
    """Time a full sweep (pool, chunk log built) over `n_traces` traces x 20 contexts; extrapolate to 350."""
    from kvcast.streamer.simulate import SimulationConfig, run_sweep
    from kvcast.traces.defaults import default_traces

    pool = list(traces) if traces else list(default_traces())
    chosen = [pool[i % len(pool)].with_name(f"{pool[i % len(pool)].name}~{i}") for i in range(n_traces)]
    config = SimulationConfig(policies=policies, contexts=20)
    t0 = time.perf_counter()
    chunks = sessions = 0
    for outcome in run_sweep(chosen, config, workers=workers, chunk_log=True):
        chunks += outcome.chunks
        sessions += len(outcome.sessions)
    wall = time.perf_counter() - t0
    return {"traces": n_traces, "contexts": 20, "policies": list(policies), "sessions": sessions,
            "chunks": chunks, "wall_s": wall, "chunks_per_s": chunks / wall,
            "extrapolated_350x20x6_s": wall * (350 / n_traces) * (6 / len(policies)),
            "note": "extrapolated linearly from the measured sub-sweep"}


def _print_bench(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    print(json.dumps(result, indent=2))
    table = Table(title="kvcast bench sim")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("policy", result["policy"])
    table.add_row("chunks/s (median, one core)", f"{result['chunks_per_s']:,.0f}")
    table.add_row("sessions/s (median)", f"{result['sessions_per_s']:,.0f}")
    table.add_row("chunks per session", f"{result['chunks_per_session']:.1f}")
    if "sweep" in result:
        sw = result["sweep"]
        table.add_row(f"sweep {sw['traces']}x20x{len(sw['policies'])} wall (s)", f"{sw['wall_s']:.1f}")
        table.add_row("extrapolated 350x20x6 (s)", f"{sw['extrapolated_350x20x6_s']:.0f}")
    Console(stderr=True).print(table)
