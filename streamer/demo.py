"""``kvcast demo``: the whole of kvcast on real data, in one command, with a report.

`run_demo` runs these steps, each with a progress display, and writes ``report.md``, ``report.html`` (offline),
``report.json`` and the PNGs to `DemoConfig.out` (the run's store, profiles and logs under ``data/``, ``simulate/``
and ``live/``):

1. load the model (SmolLM2-135M-Instruct by default) and read the data (`kvcast.streamer.demo_data`: WikiText-2,
   LongChat and real traces from ``../shared`` when present, else kvcast's generated corpus and synthetic traces);
2. measure this host's decode speed per level and prefill cost (`kvcast calibrate host`'s
   `kvcast.streamer.host.measure_host_profile`), on the device the live step uses (the GPU where there is one);
3. prefill each context once, store every chunk at every level (`kvcast store put`'s `put_context`) and measure
   each level's size and quality on the real model (`kvcast.streamer.demo_measure`);
4. the headline tables (`kvcast.streamer.demo_headline`): CacheGen's comparison on this host, and scaled to a
   Mistral-7B-sized deployment on the H100 and A100 cost models;
5. simulate every built-in policy over the traces with this run's sizes (`kvcast.streamer.demo_simulation`);
6. stream one context live over loopback through ``kvcast serve`` with a paced trace and answer its question from
   the fetched cache (`kvcast.streamer.demo_live`);
7. check the targets (`kvcast.streamer.demo_targets`) and write the report (`kvcast.streamer.demo_report`).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from kvcast.streamer.demo_config import NEAR_LOSSLESS, DemoConfig

__all__ = ["DemoError", "run_demo"]


class DemoError(ValueError):
    """Bad demo input: missing or malformed data, an unknown level or policy."""


class _Step:
    """One step of the progress display: `note` names what it is doing (a log line too where the output is not a
    terminal, so a CI log shows the progress), `advance` moves its bar."""

    def __init__(self, progress: Any, task: Any, console: Any) -> None:
        self.progress, self.task, self.console = progress, task, console

    def note(self, text: str) -> None:
        self.progress.update(self.task, description=f"  {text}")
        if not self.console.is_terminal:
            self.console.print(f"  {text}", highlight=False, markup=False)

    def advance(self, steps: int = 1) -> None:
        self.progress.advance(self.task, steps)


class _Progress:
    """A rich progress display: the step counter on top, the current step's own bar under it; each finished step
    leaves one line with its time."""

    def __init__(self, console: Any, steps: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = console
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=True)
        self.steps = steps
        self.done = 0
        self.times: list[dict[str, Any]] = []

    def __enter__(self) -> _Progress:
        self.bar.__enter__()
        self.overall = self.bar.add_task("kvcast demo", total=self.steps)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    @contextmanager
    def step(self, name: str, total: int | None = None) -> Iterator[_Step]:
        self.bar.update(self.overall, description=f"[bold]step {self.done + 1}/{self.steps}: {name}")
        if not self.console.is_terminal:
            self.console.print(f"step {self.done + 1}/{self.steps}: {name}", highlight=False, markup=False)
        task = self.bar.add_task("  ...", total=total)
        started = time.perf_counter()
        try:
            yield _Step(self.bar, task, self.console)
        finally:
            wall = time.perf_counter() - started
            self.bar.remove_task(task)
            self.done += 1
            self.bar.advance(self.overall)
            self.times.append({"step": name, "wall_s": wall})
            self.console.print(f"[green]done[/green] {name} ({wall:.1f} s)", highlight=False)


def _load_average() -> str:
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _machine() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": cuda, "load_average_start": _load_average()}


def _level_rows(measured: Sequence[Any], profile: Any, scaled_chunk_tokens: int
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Per level over every context: bytes, bits per value (as stored, and at `scaled_chunk_tokens`-token objects:
    the payload as measured, each object's header and side information spread over that many tokens), ratios,
    pooled quality, CPU decode speed, and by position; the baselines; the exact cache's perplexity and accuracy."""
    from kvcast.codec.evaluate import QualitySums

    levels = list(measured[0].manifest.levels)
    texts = [m for m in measured if m.context.kind == "text"]
    questions = [m for m in measured if m.context.kind == "qa"]
    values = sum(m.values for m in measured)
    int8 = sum(m.level_bytes("int8") for m in measured) if "int8" in levels else None
    geometry = measured[0].manifest  # the positions of the first context (a passage), for the profile's curves
    n = geometry.tokens
    picks = [geometry.chunks[0], geometry.chunks[len(geometry.chunks) // 2], geometry.chunks[-1]]
    objects = sum(len(m.manifest.chunks) for m in measured)
    tokens_per_object = sum(m.manifest.tokens for m in measured) / objects
    spread = tokens_per_object / scaled_chunk_tokens
    scaled_bits = {}
    for level in levels:
        side = sum(m.side_bytes[level] for m in measured)
        nbytes = sum(m.level_bytes(level) for m in measured)
        scaled_bits[level] = 8 * (nbytes - side + side * spread) / values
    rows = []
    for level in levels:
        nbytes = sum(m.level_bytes(level) for m in measured)
        sums = QualitySums()
        for m in texts:
            sums.merge(m.levels[level].sums)
        summary = sums.summary() if texts else {}
        by_position = []
        for where in ("first", "middle", "last"):
            bits = []
            for m in measured:
                per_chunk = m.chunk_bits_per_value(level)
                if where == "first":
                    bits.append(per_chunk[0])
                elif where == "last":
                    bits.append(per_chunk[-1])
                else:
                    inner = per_chunk[1:-1] or per_chunk
                    bits.append(sum(inner) / len(inner))
            by_position.append(sum(bits) / len(bits))
        try:
            losses = [profile.quality_loss_at(level, n - (c.start_token + c.tokens / 2),
                                              first_chunk=c.start_token == 0 and c.tokens < n) for c in picks]
        except ValueError:  # a level the profile does not have
            losses = [None, None, None]
        decode_s = sum(m.decode_s[level] for m in measured)
        rows.append({
            "level": level, "bytes": nbytes, "values": values, "bits_per_value": 8 * nbytes / values,
            "side_bytes": sum(m.side_bytes[level] for m in measured), "bits_per_value_scaled": scaled_bits[level],
            "x_smaller_than_int8": int8 / nbytes if int8 else None, "x_smaller_than_fp16": 2 * values / nbytes,
            "x_smaller_than_int8_scaled": scaled_bits["int8"] / scaled_bits[level] if int8 else None,
            "kl_per_token": summary.get("kl_per_token"), "top1_agreement": summary.get("top1_agreement"),
            "ppl_change": summary.get("ppl_change"),
            "qa_accuracy": sum(bool(m.levels[level].correct) for m in questions) / len(questions) if questions
            else None,
            "qa_same_as_exact": sum(bool(m.levels[level].same_as_exact) for m in questions) / len(questions)
            if questions else None,
            "decode_msym_per_s": values / decode_s / 1e6 if decode_s > 0 else None,
            "bits_per_value_by_position": by_position, "profile_loss_by_position": losses,
        })
    baselines = []
    for name in (texts[0].baselines if texts else {}):
        sums = QualitySums()
        for m in texts:
            sums.merge(m.baselines[name][1].sums)
        s = sums.summary()
        baselines.append({"name": name, "bits_per_value": sum(m.baselines[name][0] for m in texts) / len(texts),
                          "kl_per_token": s["kl_per_token"], "top1_agreement": s["top1_agreement"],
                          "ppl_change": s["ppl_change"]})
    exact_ppl = QualitySums()
    for m in texts:
        exact_ppl.merge(m.levels[levels[0]].sums)
    exact = {"ppl": exact_ppl.summary()["ppl_exact"] if texts else None,
             "qa_accuracy": sum(bool(m.exact.correct) for m in questions) / len(questions) if questions else None}
    return rows, baselines, exact


def _notes(config: DemoConfig, results: dict[str, Any]) -> list[str]:
    exact = results["exact"]
    notes = [
        f"This machine is shared with other jobs (load average {results['machine']['load_average_start']} at the "
        f"start, {results['machine']['load_average_end']} at the end): wall times and this host's measured costs "
        "move from run to run.",
        "The measured table is this host: a 135M model on a CPU, where recompute is slow and the codec's CPU decoder "
        "(tens of Msym/s) is slower than fetching int8 over a fast link, so it favours the cheap-to-decode levels. "
        "The scaled tables model a GPU deployment (GPU decode from `kvcast bench gpu` on an H100, recompute from "
        "`recompute_costs.json`): sizes are this run's, costs are models, not an end-to-end measurement.",
        "Quality of a controller is measured by applying its sessions' actions to this run's contexts (text chunks "
        "recomputed over the chunks before them); in the scaled tables a 16K-token plan is mapped by relative "
        "position onto these shorter contexts.",
    ]
    if exact.get("qa_accuracy") is not None:
        notes.append(f"SmolLM2-135M retrieves few lines even from the exact cache ({exact['qa_accuracy']:.0%} here), "
                     "so QA accuracy is near chance for every method; agreement with the exact cache's answer is the "
                     "more telling column.")
    if results.get("quick"):
        notes.append("`--quick`: one short passage and one question: the numbers show the mechanics, with wide "
                     "error; run `kvcast demo` for the full report.")
    if not results["data"].get("shared_datasets", True):
        notes.append("No datasets folder was found (`../shared/datasets` or `--datasets`): the passages are kvcast's "
                     "generated corpus, whose templated sentences the model predicts far better than real prose, so "
                     "the perplexity changes, and the size target that rests on them, are not established here.")
    if not results["data"]["real_traces"]:
        notes.append("No real traces were found (`../shared/traces` or `--traces`): the simulation ran on kvcast's "
                     "synthetic traces, so the SLO target, which names real traces, is not established here.")
    return notes


def run_demo(config: DemoConfig, console: Any = None, *, quick: bool = False) -> dict[str, Any]:
    """Run the demo (see the module docstring) and write its report to `config.out`; returns the results (what
    ``report.json`` holds) with ``report_paths``. `quick` only labels the report. Raises `DemoError` for bad input
    and `kvcast.codec.model.ModelUnavailable` when the model cannot be loaded."""
    import torch
    from rich.console import Console

    from kvcast.codec.evaluate import EvalError
    from kvcast.codec.model import load_model
    from kvcast.policies.registry import UnknownPolicyError, default_registry
    from kvcast.streamer.config import SimulationConfig
    from kvcast.streamer.demo_data import load_demo_data
    from kvcast.streamer.demo_headline import host_table, resolve_spec, scaled_table
    from kvcast.streamer.demo_live import run_live
    from kvcast.streamer.demo_measure import ContextMeasurer, profile_with_measured_sizes
    from kvcast.streamer.demo_report import write_plots, write_report
    from kvcast.streamer.demo_simulation import simulate_traces
    from kvcast.streamer.demo_targets import evaluate_targets
    from kvcast.streamer.host import measure_host_profile, save_host_profile
    from kvcast.streamer.ingest import IngestError, resolve_levels
    from kvcast.streamer.menus import ModelShape, recompute_cost
    from kvcast.streamer.profile import default_profile
    from kvcast.streamer.store import open_store

    console = console or Console()
    started = time.perf_counter()
    started_at = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    out = config.out
    registry = default_registry()
    try:  # fail on bad names before any work
        levels = resolve_levels(config.levels)
        for spec in {*config.policies, config.live_policy} - {NEAR_LOSSLESS}:
            registry.create(spec)
        ModelShape.parse(config.scaled_model)
        for gpu in config.scaled_gpus:
            recompute_cost(f"{gpu}/{config.scaled_model}")
    except (IngestError, UnknownPolicyError, ValueError) as exc:
        raise DemoError(str(exc).strip("'\"")) from None
    if config.threads:
        torch.set_num_threads(config.threads)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    machine = _machine()
    results: dict[str, Any] = {"config": {**config.to_json_dict(), "quick": quick}, "machine": machine,
                               "started": started_at, "quick": quick}

    with _Progress(console, steps=7) as progress:
        with progress.step("load the model and read the data") as step:
            step.note(f"loading {config.model}")
            lm = load_model(config.model, progress=False)
            step.note("reading the data")
            try:
                data = load_demo_data(config, lm.tokenizer)
            except EvalError as exc:
                raise DemoError(str(exc)) from None
            fingerprint = lm.fingerprint()
            results["model"] = {"name": fingerprint.name, "layers": fingerprint.layers,
                                "kv_heads": fingerprint.kv_heads, "head_dim": fingerprint.head_dim}
            results["data"] = {"text_source": data.text_source, "qa_source": data.qa_source,
                               "trace_source": data.trace_source, "shared_datasets": data.shared_datasets,
                               "real_traces": data.real_traces}

        with progress.step("measure this host's decode and prefill costs (kvcast calibrate host)",
                           total=len(levels) + 2 * config.host_positions) as step:
            def host_note(text: str) -> None:
                step.note(text)
                step.advance()

            positions = tuple(i * config.chunk_tokens for i in range(config.host_positions))
            # measured where the live step runs the model and decodes (`run_live`: the GPU where there is one)
            live_device = "cuda" if torch.cuda.is_available() else "cpu"
            lm.model.to(live_device)
            try:
                host, record = measure_host_profile(lm.model, fingerprint=fingerprint, levels=levels,
                                                    chunk_tokens=config.chunk_tokens, positions=positions,
                                                    repeats=config.host_repeats, progress=host_note)
            finally:
                lm.model.to("cpu")
            save_host_profile(record, data_dir / "host.json")
            results["host"] = {k: record[k] for k in ("decode_values_per_s", "skipped_levels", "chunk_tokens")}
            results["host"]["recompute"] = {k: v for k, v in record["recompute"].items() if k != "points"}

        store = open_store(data_dir / "store")
        measurer = ContextMeasurer(lm, store, chunk_tokens=config.chunk_tokens, levels=config.levels,
                                   baselines=config.baselines, answer_tokens=config.answer_tokens)
        measured = []
        with progress.step("prefill, store every chunk at every level, score each level",
                           total=len(data.contexts)) as step:
            for context in data.contexts:
                measured.append(measurer.measure(context, on_step=step.note))
                step.advance()
        results["contexts"] = [{
            "context_id": m.context_id, "kind": m.context.kind, "tokens": m.manifest.tokens,
            "chunks": len(m.manifest.chunks), "source": m.context.source, "prefill_s": m.prefill_s,
            "store_s": m.store_s, "stored_bytes": m.manifest.nbytes, "expected_answer": m.context.expected_answer,
            "exact_answer": m.exact.answer, "exact_correct": m.exact.correct} for m in measured]
        shipped = default_profile()
        rows, baselines, exact = _level_rows(measured, shipped, SimulationConfig.chunk_tokens)
        results.update(levels=rows, baselines=baselines, exact=exact, skipped_levels=measured[0].skipped_levels,
                       scaled_chunk_tokens=SimulationConfig.chunk_tokens)
        profile = profile_with_measured_sizes(
            shipped, {r["level"]: r["bits_per_value_scaled"] for r in rows},
            f"kvcast demo on {started_at}: bits_per_value measured on this run's {config.chunk_tokens}-token chunks, "
            f"header and side information spread over {SimulationConfig.chunk_tokens}-token objects.")
        profile_path = data_dir / "profile.json"
        profile.save(profile_path)
        near_lossless = resolve_spec(NEAR_LOSSLESS, profile)
        near_lossless_loss = profile.level("int8").quality_loss if "int8" in profile.level_names else None
        results["near_lossless_spec"] = near_lossless or NEAR_LOSSLESS

        with progress.step("headline tables: this host, and scaled to Mistral-7B on each GPU cost model") as step:
            measured_rows = host_table(measured, host, profile, config, registry, measurer,
                                       on_row=lambda label: step.note(f"this host: {label}"))
            scaled: dict[str, Any] = {}
            scaled_rows = {}
            for gpu in config.scaled_gpus:
                rows_gpu = scaled_table(measured, profile, config, gpu, registry, measurer,
                                        on_row=lambda label, gpu=gpu: step.note(f"{gpu}: {label}"))
                scaled_rows[gpu] = rows_gpu
                cost = recompute_cost(f"{gpu}/{config.scaled_model}")
                scaled[gpu] = {"rows": [r.to_json() for r in rows_gpu], "gbps": config.headline_gbps,
                               "slo_s": config.slo_s, "model": config.scaled_model,
                               "context_tokens": config.scaled_context_tokens,
                               "chunk_tokens": SimulationConfig.chunk_tokens, "recompute_cost": cost.name,
                               "provisional_cost": cost.provisional}
            results["headline"] = {"measured": {"rows": [r.to_json() for r in measured_rows],
                                                "gbps": config.headline_gbps, "slo_s": config.host_slo_s},
                                   "scaled": scaled}

        with progress.step("simulate every policy over the traces", total=len(data.traces)) as step:
            simulation = simulate_traces(data.traces, profile, profile_path, config, out / "simulate",
                                         on_trace=lambda done, total: step.advance())
            results["simulation"] = simulation.to_json()

        live_context = next((m for m in measured if m.context.kind == "qa"), measured[0])
        with progress.step(f"stream {live_context.context_id} live through kvcast serve and answer") as step:
            trace = data.traces[0].scaled_to_mean(config.live_mean_mbps * 1e6)
            step.note(f"{config.live_policy} over {trace.name} at a {config.live_mean_mbps:g} Mbps mean")
            live = run_live(live_context, store, lm, host, trace, policy=config.live_policy, slo_s=config.host_slo_s,
                            rtt_ms=config.live_rtt_ms, answer_tokens=config.answer_tokens, registry=registry,
                            out=out / "live")
            results["live"] = live.to_json()

        with progress.step("check the targets and draw the plots"):
            results["targets"] = evaluate_targets(rows, scaled_rows, config.headline_gbps, simulation,
                                                  near_lossless_loss, data.real_traces,
                                                  chunk_tokens=config.chunk_tokens,
                                                  scaled_chunk_tokens=SimulationConfig.chunk_tokens,
                                                  real_text=data.shared_datasets)
            plots = write_plots(results, simulation.sessions, out, live.outputs.get("timeline"))
    machine["load_average_end"] = _load_average()
    results["notes"] = _notes(config, results)
    results["steps"] = progress.times
    results["wall_s"] = time.perf_counter() - started
    results["plots"] = {k: str(v) for k, v in plots.items()}
    paths = write_report(results, plots, out)
    results["report_paths"] = {k: str(v) for k, v in paths.items()}
    return results
