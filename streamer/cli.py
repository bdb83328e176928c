"""`kvcast simulate`, `kvcast train-policy`, `kvcast bench sim`, `kvcast bench mpc` and `kvcast bench gym`;
`kvcast.cli` calls `register`.

Every default comes from `kvcast.streamer.config.SimulationConfig` or the benchmark settings of
`kvcast.streamer.bench` (light modules); conventions: `kvcast.clitools`.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from kvcast.clitools import FAILED, comma_list, emit_benchmark, fail
from kvcast.streamer.bench import GymBenchSettings, MpcBenchSettings, SimBenchSettings
from kvcast.streamer.config import SimulationConfig

_SIM = SimulationConfig
_BAD_TRACE_HINT = "(use --on-bad-trace skip to report and skip bad files)"


def _span(pair: tuple[Any, Any]) -> str:
    """``(a, b)`` -> ``"a-b"``, the form `_range` reads."""
    return "-".join(format(x, "g") if isinstance(x, float) else str(x) for x in pair)


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
        fail(str(exc), hint=_BAD_TRACE_HINT)
    skipped = [(str(p), str(e)) for p, e in loaded.skipped]
    usable = []
    for trace in loaded.traces:  # readable but useless: nothing would ever be delivered
        if trace.mean_bps > 0:
            usable.append(trace)
            continue
        problem = f"trace {trace.name!r} has zero bandwidth throughout; nothing can be delivered"
        if on_bad_trace == "raise":
            fail(f"{trace.source}: {problem}", hint=_BAD_TRACE_HINT)
        skipped.append((trace.source, problem))
        console.print(f"[yellow]skipped[/yellow] {escape(trace.source)}: {escape(problem)}", highlight=False,
                      soft_wrap=True)
    for path, exc in loaded.skipped:
        console.print(f"[yellow]skipped[/yellow] {escape(str(path))}: {escape(str(exc))}", highlight=False,
                      soft_wrap=True)
    if not usable:
        fail("no usable trace in " + ", ".join(map(str, traces)))
    return usable, skipped


def register(app: typer.Typer, bench: typer.Typer, evaluate: typer.Typer) -> None:
    """Add the streaming engine's commands to the `kvcast` CLI."""

    @app.command("simulate")
    def simulate(
        traces: Annotated[list[Path] | None, typer.Option(
            "--traces", help="Trace file or folder (repeatable). Default: kvcast's synthetic default set.")]
        = None,
        policies: Annotated[str, typer.Option(
            help="Comma-separated policy specs, e.g. text,raw,cachegen,fixed:cachegen-2.")]
        = ",".join(_SIM.policies),
        out: Annotated[Path, typer.Option(help="Output folder.")] = Path("results/simulate"),
        model: Annotated[str, typer.Option(help="Model shape name or layers,kv_heads,head_dim.")]
        = _SIM.model,
        gpu: Annotated[str, typer.Option(help="GPU of the recompute cost table.")] = _SIM.gpu,
        recompute: Annotated[str | None, typer.Option(
            help="Recompute cost override: gpu/model or a,b,c (s/token, s/token pair, s).")] = _SIM.recompute,
        profile: Annotated[Path | None, typer.Option(
            help="kvcast-profile/1 JSON (default: the shipped profile, measured on WikiText-2 test).")]
        = _SIM.profile,
        host_profile: Annotated[Path | None, typer.Option(
            help="kvcast-host-profile/1 JSON (kvcast calibrate host): this host's prefill cost and decode "
                 "speeds replace --gpu/--recompute and the profile's decode speeds.")] = _SIM.host_profile,
        levels: Annotated[str | None, typer.Option(
            help="Codec levels on the menu, comma-separated, united: a set (all; cachegen = cachegen-N, "
                 "CacheGen's menu; kvcast = kvcast-N; baselines = raw, int8) or level names. Default: all. "
                 "cachegen and cachegen-code only use CacheGen's own levels of it; on a set of one codec "
                 "every controller has the same levels.")]
        = _SIM.levels,
        chunk_tokens: Annotated[int, typer.Option(help="Tokens per chunk.")] = _SIM.chunk_tokens,
        context_tokens: Annotated[str, typer.Option(
            help="Context length, or a range low-high drawn per context.")] = _span(_SIM.context_tokens),
        contexts: Annotated[int, typer.Option(help="Contexts per trace.")] = _SIM.contexts,
        slo: Annotated[float, typer.Option(help="TTFT target (s).")] = _SIM.slo_s,
        scaling: Annotated[str, typer.Option(
            help="range (trace means log-uniform in --mean-gbps), none, or factor:X.")] = _SIM.scaling,
        mean_gbps: Annotated[str, typer.Option(help="Range of trace means for --scaling range (Gbps).")]
        = _span(_SIM.mean_gbps),
        rtt_ms: Annotated[float, typer.Option(help="Round-trip time per chunk request (ms).")]
        = _SIM.rtt_s * 1e3,
        gpu_share: Annotated[float, typer.Option(
            help="Recompute's share of the GPU: every recompute time divided by it (1: a dedicated GPU; as a "
                 "point of kvcast sweep --gpu-share).")] = _SIM.gpu_share,
        bandwidth_scale: Annotated[float, typer.Option(
            help="Factor on every trace bandwidth, after --scaling (the prior throughput scales too; as a point "
                 "of kvcast sweep --bandwidth-scale).")] = _SIM.bandwidth_scale,
        efficiency: Annotated[float, typer.Option(help="Payload bytes per wire byte.")] = _SIM.efficiency,
        overhead_bytes: Annotated[int, typer.Option(help="Extra bytes per request.")] = _SIM.overhead_bytes,
        prior_window: Annotated[float, typer.Option(
            help="Seconds of trace history averaged into the policies' prior throughput.")]
        = _SIM.prior_window_s,
        query_prefill: Annotated[float, typer.Option(help="Query prefill added to TTFT (s).")]
        = _SIM.query_prefill_s,
        seed: Annotated[int, typer.Option(help="Seed of contexts, offsets and scaling.")] = _SIM.seed,
        lossy_prefix_ratio: Annotated[float | None, typer.Option(
            help="A text chunk recomputed over lossy chunks scores this ratio times their mean loss. Default: "
                 "the profile's lossy_prefix_ratio, else 0 (lossless).")] = _SIM.lossy_prefix_ratio,
        workers: Annotated[int, typer.Option(help="Worker processes (0: one per CPU).")] = 0,
        on_bad_trace: Annotated[str, typer.Option(help="error: stop at a malformed trace file; skip: report "
                                                       "and skip it.")] = "error",
        chunk_log: Annotated[bool, typer.Option(help="Write per-chunk records to OUT/chunks.jsonl.")] = True,
        max_traces: Annotated[int, typer.Option(help="Use only the first N traces (0: all).")] = 0,
        objective: Annotated[str, typer.Option(
            help="The planners' objective (mpc, hybrid, oracle; a spec's own objective= wins): slo (meet the "
                 "SLO, then the least quality loss) or ttft (the least TTFT within --quality-budget and "
                 "--level-floor).")] = "slo",
        quality_budget: Annotated[float | None, typer.Option(
            help="--objective ttft: the session's largest mean quality loss per token.")] = None,
        level_floor: Annotated[str | None, typer.Option(
            help="--objective ttft: no chunk loaded at a level worse than this one.")] = None,
    ) -> None:
        """Trace-driven simulation of policies x traces x contexts; writes summary.json, tables and plots.

        Outputs in OUT: summary.json (one object per policy: sessions, slo_violation_rate, ttft_mean_s,
        ttft_p50_s, ttft_p95_s, quality_loss_mean, bytes_mean, each with a 95% bootstrap CI), summary.md,
        sessions.jsonl, chunks.jsonl, ttft_cdf.png, pareto.png, run.json (configuration, skipped traces,
        timing). --objective ttft rewrites the planners' specs (mpc becomes
        mpc:objective=ttft+quality_budget=B), so the summary names each row's objective.
        """
        from rich.console import Console

        console = Console(stderr=True)
        if on_bad_trace not in ("error", "skip"):
            raise typer.BadParameter("--on-bad-trace must be 'error' or 'skip'")
        from kvcast.streamer.sweep_config import OperatingPoint, check_value

        try:
            specs = with_objective(comma_list(policies), objective, quality_budget, level_floor)
            # the operating point's settings are applied as a point of `kvcast sweep` applies them
            point = OperatingPoint(slo_s=slo, gpu_share=check_value("gpu_share", gpu_share),
                                   bandwidth_scale=check_value("bandwidth_scale", bandwidth_scale),
                                   rtt_ms=rtt_ms, context_tokens=_range(context_tokens, "--context-tokens", int))
            config = point.config(SimulationConfig(
                policies=specs, model=model, gpu=gpu,
                recompute=recompute, profile=None if profile is None else str(profile),
                host_profile=None if host_profile is None else str(host_profile),
                levels=None if not levels else tuple(x.strip() for x in levels.split(",")),
                chunk_tokens=chunk_tokens, contexts=contexts, scaling=scaling,
                mean_gbps=_range(mean_gbps, "--mean-gbps", float), efficiency=efficiency,
                overhead_bytes=overhead_bytes, prior_window_s=prior_window, query_prefill_s=query_prefill,
                seed=seed, lossy_prefix_ratio=lossy_prefix_ratio))
            _check_config(config)
        except (ValueError, KeyError) as exc:
            fail(str(exc))
        trace_list, skipped = _load(traces, "raise" if on_bad_trace == "error" else "skip", console)
        if max_traces > 0:
            trace_list = trace_list[:max_traces]
        try:
            run_simulation(trace_list, config, out, workers=workers or None, chunk_log=chunk_log,
                           skipped=skipped, console=console)
        except RuntimeError as exc:  # a policy failed inside a session: the message names it
            fail(str(exc), FAILED)

    _sim = SimBenchSettings

    @bench.command("sim")
    def bench_sim(
        policy: Annotated[str, typer.Option(help="Policy spec to time (a greedy one by default).")]
        = _sim.policy,
        sessions: Annotated[int, typer.Option(help="Sessions per repeat.")] = _sim.sessions,
        repeats: Annotated[int, typer.Option(help="Timed repeats (the median is reported).")] = _sim.repeats,
        context_tokens: Annotated[int, typer.Option(help="Tokens per context.")] = _sim.context_tokens,
        chunk_tokens: Annotated[int, typer.Option(help="Tokens per chunk.")] = _sim.chunk_tokens,
        sweep_traces: Annotated[int, typer.Option(
            help="Also time a full `simulate` sweep (processes, chunk log) over this many traces x 20 "
                 "contexts and extrapolate to 350 traces x 6 policies (0: skip).")] = _sim.sweep_traces,
        sweep_policies: Annotated[str, typer.Option(help="Comma-separated policies of the timed sweep.")]
        = ",".join(_sim.sweep_policies),
        traces: Annotated[list[Path] | None, typer.Option(
            "--traces", help="Trace file or folder of the timed sweep (repeatable). Default: kvcast's "
                             "default set, repeated.")] = None,
        workers: Annotated[int, typer.Option(help="Sweep worker processes (0: one per CPU).")] = _sim.workers,
        out: Annotated[Path | None, typer.Option(help="Also write the JSON to this file.")] = None,
    ) -> None:
        """Simulation speed: simulated chunks per second on one core (engine + SimPy link + policy)."""
        from kvcast.streamer.bench import bench_sim as run

        try:
            settings = SimBenchSettings(policy=policy, sessions=sessions, repeats=repeats,
                                        context_tokens=context_tokens, chunk_tokens=chunk_tokens,
                                        sweep_traces=sweep_traces, sweep_policies=comma_list(sweep_policies),
                                        workers=workers)
        except ValueError as exc:
            fail(str(exc))
        trace_list = None
        if sweep_traces > 0 and traces:
            from rich.console import Console

            trace_list = _load(traces, "skip", Console(stderr=True))[0]
        try:
            result = run(settings, trace_list)
        except KeyError as exc:  # unknown policy
            fail(str(exc.args[0]) if exc.args else str(exc))
        emit_benchmark(result, _sim_table(result), out)

    _mpc = MpcBenchSettings

    @bench.command("mpc")
    def bench_mpc(
        sessions: Annotated[int, typer.Option(help="Engine sessions whose mpc decisions are recorded and "
                                                   "timed.")] = _mpc.sessions,
        enumerate_count: Annotated[int, typer.Option(
            "--enumerate", help="Full-horizon problems also solved by full enumeration (~0.05 s each).")]
        = _mpc.enumerate_count,
        repeats: Annotated[int, typer.Option(help="Timed repeats (the median is reported).")] = _mpc.repeats,
        seed: Annotated[int, typer.Option(help="Seed of the sessions and of the enumerated subset.")]
        = _mpc.seed,
        levels: Annotated[str, typer.Option(
            help="Menu levels: a set (all, cachegen, kvcast, baselines) or level names, comma-separated.")]
        = _mpc.levels,
        options: Annotated[str, typer.Option(
            help="mpc's spec argument, e.g. objective=ttft+quality_budget=0.01 (default: none).")]
        = _mpc.options,
        out: Annotated[Path | None, typer.Option(help="Also write the JSON to this file.")] = None,
    ) -> None:
        """mpc speed: whole decide() calls/s; its exact search vs full enumeration on the same problems."""
        from kvcast.streamer.bench import bench_mpc as run

        try:
            settings = MpcBenchSettings(sessions=sessions, enumerate_count=enumerate_count, repeats=repeats,
                                        seed=seed, levels=levels, options=options)
        except ValueError as exc:
            fail(str(exc))
        try:
            result = run(settings)
        except (KeyError, ValueError) as exc:  # unknown levels
            fail(str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc))
        emit_benchmark(result, _mpc_table(result), out, notes=[_mpc_note(result)])


    _gym = GymBenchSettings

    @bench.command("gym")
    def bench_gym(
        steps: Annotated[int, typer.Option(help="Environment steps per timed repeat.")] = _gym.steps,
        repeats: Annotated[int, typer.Option(help="Timed repeats (the median is reported).")] = _gym.repeats,
        warmup: Annotated[int, typer.Option(help="Untimed steps first.")] = _gym.warmup,
        vector_envs: Annotated[int, typer.Option(help="Also time a SyncVectorEnv of this many envs (0: skip).")]
        = _gym.vector_envs,
        seed: Annotated[int, typer.Option(help="Seed of the sessions and actions.")] = _gym.seed,
        out: Annotated[Path | None, typer.Option(help="Also write the JSON to this file.")] = None,
    ) -> None:
        """Gymnasium environment speed: steps per second on one core (needs kvcast[gym])."""
        try:
            settings = GymBenchSettings(steps=steps, repeats=repeats, warmup=warmup, vector_envs=vector_envs,
                                        seed=seed)
        except ValueError as exc:
            fail(str(exc))
        try:
            from kvcast.streamer.bench import bench_gym as run
            result = run(settings)
        except ImportError as exc:
            fail(str(exc))
        emit_benchmark(result, _gym_table(result), out)

    @app.command("train-policy")
    def train_policy(
        out: Annotated[Path, typer.Option(help="Weights file to write (safetensors).")]
        = Path("results/learned.safetensors"),
        traces: Annotated[list[Path] | None, typer.Option(
            "--traces", help="Training trace file or folder (repeatable). Default: kvcast's synthetic set.")]
        = None,
        seed: Annotated[int, typer.Option(help="Seed of sessions, samples and initial weights.")] = 0,
        teacher: Annotated[str, typer.Option(help="Policy imitated first ('' for none).")] = "hybrid",
        demo_episodes: Annotated[int, typer.Option(help="Sessions the teacher plays.")] = 6000,
        bc_epochs: Annotated[int, typer.Option(help="Imitation epochs.")] = 30,
        updates: Annotated[int, typer.Option(help="REINFORCE updates after imitation.")] = 600,
        batch: Annotated[int, typer.Option(help="Sessions per update.")] = 16,
        minutes: Annotated[float, typer.Option(
            help="Wall-clock cap of fine-tuning (0: none; a capped run depends on the machine's speed).")] = 0.0,
        slo: Annotated[float, typer.Option(help="TTFT target (s) of the training sessions.")] = _SIM.slo_s,
        levels: Annotated[str | None, typer.Option(help="Menu levels (default: all).")] = None,
        reward: Annotated[str, typer.Option(
            help="Reward weight overrides, e.g. miss=1,overrun=0.5,quality=2 (kvcast.streamer.gym.RewardWeights).")]
        = "",
        report: Annotated[Path | None, typer.Option(help="Also write the training report (JSON) here.")] = None,
    ) -> None:
        """Train the `learned` policy in the Gymnasium environment (imitation, then REINFORCE); needs kvcast[gym].

        Use the result with ``kvcast simulate --policies learned:OUT``.
        """
        from rich.console import Console

        from kvcast.streamer.learn import TrainSettings
        from kvcast.streamer.learn import train_policy as run

        console = Console(stderr=True)
        try:
            weights = {}
            for part in comma_list(reward):
                key, _, value = part.partition("=")
                weights[key.strip()] = float(value)
            settings = TrainSettings(seed=seed, teacher=teacher, demo_episodes=demo_episodes, bc_epochs=bc_epochs,
                                     updates=updates, batch=batch, minutes=minutes, slo_s=slo,
                                     levels=None if not levels else tuple(x.strip() for x in levels.split(",")),
                                     reward=weights)
        except ValueError as exc:
            fail(f"bad setting: {exc}")
        trace_list, _ = _load(traces, "skip", console)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            result = run(trace_list, settings, out, log=lambda line: console.print(line, highlight=False))
        except (ImportError, TypeError, ValueError, KeyError) as exc:
            fail(str(exc))
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(json.dumps(result, indent=2) + "\n")
        best = result["best_validation"]
        console.print(f"wrote {out} ({result['bytes']} bytes) in {result['wall_s']:.0f} s; validation: "
                      f"violations {best['violations']:.3f}, quality loss {best['quality_loss']:.4f}",
                      highlight=False)


def with_objective(specs: list[str] | tuple[str, ...], objective: str, quality_budget: float | None = None,
                   level_floor: str | None = None) -> tuple[str, ...]:
    """`specs` with the run-wide objective added to every planner's spec (a policy class with
    ``supports_objective``; a spec that sets ``objective=`` itself is kept). ValueError for a bad objective,
    budget or floor, or ``ttft`` with no planner among `specs`.

    >>> with_objective(["text", "hybrid:margin=0.1", "oracle:objective=slo"], "ttft", 0.01)
    ('text', 'hybrid:margin=0.1+objective=ttft+quality_budget=0.01', 'oracle:objective=slo')
    """
    from kvcast.policies.planning import Objective
    from kvcast.policies.registry import default_registry

    if objective not in ("slo", "ttft"):
        raise ValueError(f"--objective must be slo or ttft, got {objective!r}")
    if objective == "slo":
        if quality_budget is not None or level_floor is not None:
            raise ValueError("--quality-budget and --level-floor bound --objective ttft; add it")
        return tuple(specs)
    if quality_budget is not None and not (quality_budget >= 0 and quality_budget < float("inf")):
        raise ValueError(f"--quality-budget must be a finite number >= 0, got {quality_budget}")
    argument = Objective("ttft", float("inf") if quality_budget is None else float(quality_budget),
                         level_floor).spec_argument()
    registry = default_registry()
    out, planners = [], 0
    for spec in specs:
        name, sep, arg = spec.partition(":")
        if not getattr(registry.factory(name), "supports_objective", False):
            out.append(spec)
            continue
        planners += 1
        if any(part.partition("=")[0].strip() == "objective" for part in arg.split("+")):
            out.append(spec)
        else:
            out.append(f"{name}:{arg}+{argument}" if arg else f"{name}:{argument}")
    if not planners:
        raise ValueError("--objective ttft applies to the planners (mpc, hybrid, oracle); none in --policies")
    return tuple(out)


def _check_config(config: Any) -> None:
    """Fail early, before any worker starts, on a bad policy, profile, shape or cost: every policy runs one
    short session on a constant trace (ValueError with the policy's name otherwise)."""
    from kvcast.policies.registry import default_registry
    from kvcast.streamer.menus import build_menus
    from kvcast.streamer.simulate import simulate_session
    from kvcast.traces.synthetic import constant

    registry = default_registry()
    profile = config.load_profile()
    menus = build_menus(profile, config.shape(), config.context_tokens[0], config.chunk_tokens,
                        config.recompute_cost(), levels=config.levels)
    trace = constant(config.mean_gbps[0] * 1e9)
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
             f"{config.gpu}" + (f" at GPU share {config.gpu_share:g}" if config.gpu_share != 1 else "")
             + (f", bandwidth x{config.bandwidth_scale:g}" if config.bandwidth_scale != 1 else "")
             + f", levels {','.join(config.levels) if config.levels else 'all'}")
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


# ------------------------------------------------------------------------------------------- bench tables


def _sim_table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    s = result["summary"]
    table = Table(title="kvcast bench sim")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("policy", s["policy"])
    table.add_row("chunks/s (median, one core)", f"{s['chunks_per_s']:,.0f}")
    table.add_row("sessions/s (median)", f"{s['sessions_per_s']:,.0f}")
    table.add_row("chunks per session", f"{s['chunks_per_session']:.1f}")
    for row in result["rows"]:
        if row["run"] == "sweep":
            to = s["sweep_extrapolated_to"]
            table.add_row(f"sweep {row['traces']}x{row['contexts']}x{row['policies']} wall (s)",
                          f"{row['wall_s']:.1f}")
            table.add_row(f"extrapolated {to['traces']}x{to['contexts']}x{to['policies']} (s)",
                          f"{s['sweep_extrapolated_s']:.0f}")
    return table


def _gym_table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    s = result["summary"]
    table = Table(title="kvcast bench gym")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("steps/s (median, one env, wall clock)", f"{s['steps_per_s']:,.0f}")
    table.add_row("steps per CPU second (median, one env)", f"{s['steps_per_cpu_s']:,.0f}")
    table.add_row("steps per episode", f"{s['steps_per_episode']:.1f}")
    if s["vector_steps_per_s"] is not None:
        table.add_row("steps/s (median, SyncVectorEnv, wall clock)", f"{s['vector_steps_per_s']:,.0f}")
    table.add_row("target", f"{s['target_steps_per_s']:,} steps/s per core")
    return table


def _mpc_table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    plans = result["summary"]["plans_per_full_horizon"]
    table = Table(title=f"kvcast bench mpc: exact search vs enumeration ({plans:,} plans/decision)")
    table.add_column("measure")
    table.add_column("decisions/s (median)", justify="right")
    for row in result["rows"]:
        rate = row["decisions_per_s"]
        table.add_row(row["description"], "-" if rate is None else f"{rate:,.0f}")
    return table


def _mpc_note(result: dict[str, Any]) -> str:
    s, machine = result["summary"], result["machine"]
    speedup = s["speedup_same_problems"]
    load = machine["load_average_1min"]
    return (f"same plan as enumeration: {s['same_plan_as_enumeration']}"
            + (f"; speedup {speedup:,.0f}x" if speedup else "")
            + ("" if load is None else f"; load average {load:.1f} on {machine['cpus']} CPUs"))
