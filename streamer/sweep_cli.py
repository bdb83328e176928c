"""`kvcast sweep`: `kvcast simulate` at many operating points, paired, on a process pool or on Ray; and the
regime map (``--regime-map``). `kvcast.cli` calls `register`.

Defaults come from `SimulationConfig` and `kvcast.streamer.sweep_config` (light modules); the work is done by
`kvcast.streamer.sweep`, `kvcast.streamer.regime` and `kvcast.streamer.sweep_report`, imported in the command.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from kvcast.clitools import FAILED, comma_list, fail
from kvcast.streamer.cli import _check_config, _load, _range, _span
from kvcast.streamer.config import SimulationConfig
from kvcast.streamer.sweep_config import (
    AXES,
    BASE_POINT,
    REGIME_GBPS,
    OperatingPoint,
    RegimeSettings,
    parse_axis,
    parse_base,
    parse_list,
    plan_points,
)

_SIM = SimulationConfig
_REGIME = RegimeSettings
QUICK_AXES = {"slo_s": "0.3,1", "gpu_share": "0.5,1"}
"""The axes of ``--quick`` when none is given."""
QUICK_CONTEXTS = 2
QUICK_TRACES = 2
QUICK_RESAMPLES = 200
QUICK_REGIME_GBPS = (1.0, 3.0, 10.0)


def _axis_help(name: str, text: str) -> str:
    return f"{text} Comma-separated list, e.g. {AXES[name].example}; base: {BASE_POINT.labels()[name]}."


def register(app: typer.Typer, bench: typer.Typer, evaluate: typer.Typer) -> None:
    """Add `kvcast sweep` to the `kvcast` CLI."""

    @app.command("sweep")
    def sweep(
        slo: Annotated[str | None, typer.Option(help=_axis_help("slo_s", "TTFT targets (s)."))] = None,
        gpu_share: Annotated[str | None, typer.Option(help=_axis_help(
            "gpu_share", "Recompute's share of the GPU: recompute time divided by it."))] = None,
        bandwidth_scale: Annotated[str | None, typer.Option(help=_axis_help(
            "bandwidth_scale", "Factors on every trace bandwidth (after --scaling)."))] = None,
        rtt_ms: Annotated[str | None, typer.Option(help=_axis_help("rtt_ms", "Round-trip times (ms)."))] = None,
        context_tokens: Annotated[str | None, typer.Option(help=_axis_help(
            "context_tokens", "Context lengths, each a count or a range low-high drawn per context."))] = None,
        base: Annotated[str | None, typer.Option(
            help="The base point, axis=value,... (e.g. slo=1,rtt-ms=20,context-tokens=16384); other axes keep "
                 "their defaults.")] = None,
        grid: Annotated[bool, typer.Option(
            help="Every combination of the listed values instead of one axis at a time around the base.")]
        = False,
        rank_by: Annotated[str, typer.Option(
            help="Who wins a point: violations (then quality loss, then TTFT), quality (then violations, TTFT) "
                 "or ttft (then violations, quality).")] = "violations",
        quick: Annotated[bool, typer.Option(
            help=f"A small sweep for tests and a first look: {QUICK_CONTEXTS} contexts on {QUICK_TRACES} traces, "
                 f"{QUICK_RESAMPLES} bootstrap "
                 "resamples, --slo 0.3,1 --gpu-share 0.5,1 unless axes are given; the regime map at "
                 "1, 3, 10 Gbps.")] = False,
        regime_map: Annotated[bool, typer.Option(
            help="Also write the regime map: TTFT of text recompute, int8 fetch, the best lossless plan and "
                 "hybrid per bandwidth and GPU (regime_map.{json,md,png}).")] = False,
        regime_gbps: Annotated[str, typer.Option(help="Bandwidths of the regime map (Gbps).")]
        = ",".join(format(b, "g") for b in _REGIME.bandwidths_gbps),
        regime_gpus: Annotated[str, typer.Option(help="GPU cost models of the regime map (gpu of gpu/model).")]
        = ",".join(_REGIME.gpus),
        regime_context_tokens: Annotated[int, typer.Option(help="Context length of the regime map.")]
        = _REGIME.context_tokens,
        executor: Annotated[str, typer.Option(
            help="process (a local process pool; --workers 1: this process) or ray (needs kvcast[ray]).")]
        = "process",
        ray_address: Annotated[str | None, typer.Option(
            help="Ray cluster address (auto, ray://host:10001); default: start a local Ray instance.")] = None,
        traces: Annotated[list[Path] | None, typer.Option(
            "--traces", help="Trace file or folder (repeatable). Default: kvcast's synthetic default set.")]
        = None,
        policies: Annotated[str, typer.Option(help="Comma-separated policy specs.")] = ",".join(_SIM.policies),
        out: Annotated[Path, typer.Option(help="Output folder.")] = Path("results/sweep"),
        model: Annotated[str, typer.Option(help="Model shape name or layers,kv_heads,head_dim.")] = _SIM.model,
        gpu: Annotated[str, typer.Option(help="GPU of the recompute cost table.")] = _SIM.gpu,
        recompute: Annotated[str | None, typer.Option(
            help="Recompute cost override: gpu/model or a,b,c (s/token, s/token pair, s).")] = _SIM.recompute,
        profile: Annotated[Path | None, typer.Option(help="kvcast-profile/1 JSON (default: the shipped one).")]
        = _SIM.profile,
        host_profile: Annotated[Path | None, typer.Option(
            help="kvcast-host-profile/1 JSON: replaces --gpu/--recompute and the decode speeds.")]
        = _SIM.host_profile,
        levels: Annotated[str | None, typer.Option(
            help="Codec levels on the menu (as kvcast simulate --levels). Default: all.")] = _SIM.levels,
        chunk_tokens: Annotated[int, typer.Option(help="Tokens per chunk.")] = _SIM.chunk_tokens,
        contexts: Annotated[int | None, typer.Option(
            help=f"Contexts per trace (default {_SIM.contexts}; {QUICK_CONTEXTS} with --quick).")] = None,
        scaling: Annotated[str, typer.Option(help="range, none, or factor:X (as kvcast simulate).")]
        = _SIM.scaling,
        mean_gbps: Annotated[str, typer.Option(help="Range of trace means for --scaling range (Gbps).")]
        = _span(_SIM.mean_gbps),
        efficiency: Annotated[float, typer.Option(help="Payload bytes per wire byte.")] = _SIM.efficiency,
        overhead_bytes: Annotated[int, typer.Option(help="Extra bytes per request.")] = _SIM.overhead_bytes,
        prior_window: Annotated[float, typer.Option(help="Seconds of trace history in the prior throughput.")]
        = _SIM.prior_window_s,
        query_prefill: Annotated[float, typer.Option(help="Query prefill added to TTFT (s).")]
        = _SIM.query_prefill_s,
        seed: Annotated[int, typer.Option(help="Seed of contexts, offsets and scaling.")] = _SIM.seed,
        workers: Annotated[int, typer.Option(
            help="Worker processes (0: one per CPU); with --executor ray, the CPUs of a local Ray instance.")] = 0,
        on_bad_trace: Annotated[str, typer.Option(help="error or skip (as kvcast simulate).")] = "error",
        max_traces: Annotated[int | None, typer.Option(
            help=f"Use only the first N traces (default all; {QUICK_TRACES} with --quick).")] = None,
        resamples: Annotated[int | None, typer.Option(
            help=f"Bootstrap resamples of the CIs (default 1000; {QUICK_RESAMPLES} with --quick).")] = None,
    ) -> None:
        """Sweep policies x traces x contexts over operating points: SLO, GPU share, bandwidth scale, RTT and
        context length, one axis at a time around a base point (or --grid); every policy plays the same
        sessions at a point.

        Outputs in OUT: sessions.jsonl (one line per session with its point's axis values), summary.json (per
        point and policy the metrics with 95% CIs, and the winner), summary.md (where each policy wins, per-axis
        tables), axis_<axis>.png (violations and quality loss per policy with CI bars), run.json; with
        --regime-map also regime_map.{json,md,png}.
        """
        from rich.console import Console

        console = Console(stderr=True)
        if on_bad_trace not in ("error", "skip"):
            raise typer.BadParameter("--on-bad-trace must be 'error' or 'skip'")
        from kvcast.streamer.sweep import RANKINGS

        if rank_by not in RANKINGS:
            raise typer.BadParameter(f"--rank-by must be one of {', '.join(RANKINGS)}, got {rank_by!r}")
        from kvcast.streamer.executors import EXECUTORS

        if executor not in EXECUTORS:
            raise typer.BadParameter(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
        if ray_address is not None and executor != "ray":
            fail("--ray-address needs --executor ray")
        given = {"slo_s": slo, "gpu_share": gpu_share, "bandwidth_scale": bandwidth_scale, "rtt_ms": rtt_ms,
                 "context_tokens": context_tokens}
        texts = {k: v for k, v in given.items() if v is not None}
        if quick and not texts:
            texts = dict(QUICK_AXES)
        if not texts and not regime_map:
            fail("nothing to sweep: give at least one axis (" + ", ".join(a.option for a in AXES.values())
                 + ") or --regime-map", hint="e.g. kvcast sweep --slo 0.3,0.6,1,2 --gpu-share 0.25,0.5,1")
        try:
            axes = {name: parse_axis(name, text) for name, text in texts.items()}
            base_point = parse_base(base, BASE_POINT)
            planned = plan_points(axes, base_point, grid=grid) if axes else []
            config = base_point.config(SimulationConfig(
                policies=comma_list(policies), model=model, gpu=gpu, recompute=recompute,
                profile=None if profile is None else str(profile),
                host_profile=None if host_profile is None else str(host_profile),
                levels=None if not levels else comma_list(levels), chunk_tokens=chunk_tokens,
                contexts=contexts if contexts is not None else (QUICK_CONTEXTS if quick else _SIM.contexts),
                scaling=scaling, mean_gbps=_range(mean_gbps, "--mean-gbps", float), efficiency=efficiency,
                overhead_bytes=overhead_bytes, prior_window_s=prior_window, query_prefill_s=query_prefill,
                seed=seed))
            for p in planned:  # every point's settings are valid before any work starts
                p.point.config(config)
            regime = RegimeSettings(
                bandwidths_gbps=QUICK_REGIME_GBPS if quick and regime_gbps == _default_gbps() else
                parse_list(REGIME_GBPS, regime_gbps),
                gpus=comma_list(regime_gpus), context_tokens=regime_context_tokens) if regime_map else None
            _check_config(config)
        except (ValueError, KeyError) as exc:  # SweepError and ProfileError are ValueErrors
            fail(str(exc))
        limit = max_traces if max_traces is not None else (QUICK_TRACES if quick else 0)
        n_resamples = resamples if resamples is not None else (QUICK_RESAMPLES if quick else 1000)
        if n_resamples < 1:
            raise typer.BadParameter("--resamples must be >= 1")
        out.mkdir(parents=True, exist_ok=True)
        if regime is not None:
            _write_regime(regime, config, out, console)
        if not planned:
            return
        trace_list, skipped = _load(traces, "raise" if on_bad_trace == "error" else "skip", console)
        if limit > 0:
            trace_list = trace_list[:limit]
        from kvcast.streamer.executors import ExecutorError

        try:
            run_sweep_points(trace_list, config, planned, out, axes=axes, base=base_point, grid=grid,
                             rank_by=rank_by, resamples=n_resamples, executor=executor,
                             workers=workers or None, ray_address=ray_address, skipped=skipped, console=console)
        except ExecutorError as exc:
            fail(str(exc), FAILED)
        except RuntimeError as exc:  # a policy failed inside a session: the message names it
            fail(str(exc), FAILED)


def _default_gbps() -> str:
    return ",".join(format(b, "g") for b in _REGIME.bandwidths_gbps)


def _write_regime(settings: RegimeSettings, config: SimulationConfig, out: Path, console: Any) -> None:
    from kvcast.streamer.regime import lossless_levels, regime_map
    from kvcast.streamer.sweep_report import plot_regime, regime_markdown

    rows = regime_map(settings, config)
    lossless = list(lossless_levels(config.load_profile(), config.levels))
    (out / "regime_map.json").write_text(json.dumps(
        {"format": "kvcast-regime-map/1", "model": config.model, "lossless_levels": lossless,
         "settings": {"bandwidths_gbps": list(settings.bandwidths_gbps), "gpus": list(settings.gpus),
                      "context_tokens": settings.context_tokens, "slo_s": config.slo_s, "rtt_s": config.rtt_s,
                      "gpu_share": config.gpu_share, "chunk_tokens": config.chunk_tokens},
         "rows": rows}, indent=2) + "\n")
    text = regime_markdown(rows, lossless, config.model)
    (out / "regime_map.md").write_text(text)
    plot_regime(rows, out / "regime_map.png")
    console.print(f"regime map: {len(rows)} cells -> {out}/regime_map.{{json,md,png}}", highlight=False)


def run_sweep_points(traces: list[Any], config: SimulationConfig, planned: list[Any], out: Path, *,
                     axes: dict[str, Any], base: OperatingPoint, grid: bool, rank_by: str, resamples: int,
                     executor: str, workers: int | None, ray_address: str | None,
                     skipped: list[tuple[str, str]] | None = None, console: Any = None) -> dict[str, Any]:
    """Run the sweep and write every output into `out`; returns the summary."""
    from rich.console import Console
    from tqdm import tqdm

    from kvcast.streamer.sweep import contenders, run_points, summarize_sweep
    from kvcast.streamer.sweep_report import plot_axis, sweep_markdown, wins_rich_table

    console = console or Console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    total = len(planned) * len(traces) * config.contexts * len(config.policies)
    rows_by_point: list[list[dict[str, Any]]] = [[] for _ in planned]
    chunks = 0
    t0 = time.perf_counter()
    with open(out / "sessions.jsonl", "w") as fs, \
            tqdm(total=total, desc=f"sweep ({executor})", unit="session", file=sys.stderr) as bar:
        for index, rows in run_points(traces, config, planned, executor=executor, workers=workers,
                                      ray_address=ray_address):
            for row in rows:
                fs.write(json.dumps(row, separators=(",", ":")) + "\n")
                chunks += row["chunks"]
            rows_by_point[index].extend(rows)
            bar.update(len(rows))
    wall = time.perf_counter() - t0
    summary = summarize_sweep(rows_by_point, planned, config=config, axes=axes, base=base, grid=grid,
                              candidates=contenders(config.policies) or config.policies,  # all bounds: rank them
                              rank_by=rank_by, resamples=resamples)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    title = (f"{len(planned)} points x {len(traces)} traces x {config.contexts} contexts x "
             f"{len(config.policies)} policies, {config.model}, {config.gpu}, "
             f"levels {','.join(config.levels) if config.levels else 'all'}")
    (out / "summary.md").write_text(sweep_markdown(summary, title))
    plots = [name for name in AXES if name in axes and plot_axis(summary, name, out / f"axis_{name}.png")]
    sessions = sum(len(r) for r in rows_by_point)
    run = {"config": config.to_json_dict(), "executor": executor, "ray_address": ray_address,
           "points": len(planned), "traces": len(traces), "sessions": sessions, "chunks": chunks,
           "wall_s": wall, "sessions_per_s": sessions / wall if wall > 0 else None,
           "plots": [f"axis_{name}.png" for name in plots],
           "skipped_traces": [{"path": p, "error": e} for p, e in (skipped or [])]}
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    Console(stderr=True, width=max(Console().width, 150)).print(wins_rich_table(summary))
    console.print(f"{sessions} sessions, {chunks} chunks in {wall:.1f} s; outputs in {out}/", highlight=False)
    return summary
