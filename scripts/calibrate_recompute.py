#!/usr/bin/env python3
"""Calibrate the streamer's recompute (prefill) cost model on a GPU.

The streamer prices recomputing a chunk of ``len`` tokens whose prefix of ``pos`` tokens is already cached as
(`kvcast.streamer.menus.RecomputeCost`)::

    prefill_s(pos, len) = c_s + a_s_per_token * len + b_s_per_token_pair * len * (pos + len / 2)

This script times exactly that operation with transformers on a randomly initialised model of a named shape
(timing needs no trained weights): it builds the prefix's KV cache once per ``pos``, then times forwards of
``len`` fresh random tokens on top of it (the cache is truncated back to ``pos`` before every trial), with CUDA
events, warm-up and the median of several repetitions. It fits ``a``, ``b``, ``c`` by non-negative least squares
on the relative error of the medians and reports the residuals, on the fitted grid and on held-out points.

Commands (``python scripts/calibrate_recompute.py --help``):

* ``measure MODEL... --out DIR``: time and fit; writes ``DIR/calibration-MODEL.json`` per model.
* ``fit FILE...``: re-fit and print saved measurements (no GPU needed).
* ``table FILE... --table streamer/recompute_costs.json``: write measured entries into the cost table, and the
  provisional entries rescaled from them for shapes too large to measure (``--rescale TARGET=SOURCE``).

Docs: docs/recompute-calibration.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any

import typer

from kvcast.streamer.costfit import (  # noqa: F401 (re-exported: tests and the report use them from here)
    CostFit,
    design_row,
    fit_recompute_cost,
    fit_with_prefix_term,
    nnls,
    predict_s,
)

FORMAT = "kvcast-recompute-calibration/1"
TABLE_FORMAT = "kvcast-recompute-costs/1"

# --------------------------------------------------------------------------------------------------------------
# Model shapes. `layers_measured` < `layers` means a layer-truncated stand-in for a model too large for one GPU:
# its fitted coefficients are scaled by layers / layers_measured (all layers of a decoder are identical).


@dataclass(frozen=True)
class CalibrationShape:
    """A decoder shape to time: the transformers architecture and its config fields."""

    name: str
    arch: str  # "mistral" or "llama"
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    vocab_size: int
    head_dim: int = 128
    layers_measured: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def measured_layers(self) -> int:
        return self.layers_measured or self.layers

    @property
    def layer_scale(self) -> float:
        """Factor from the measured (possibly truncated) model to the full one."""
        return self.layers / self.measured_layers

    @property
    def table_model(self) -> str:
        """The model name used in the cost table."""
        return self.name.split("@", 1)[0]

    def params_per_layer(self) -> int:
        """Weights of one decoder layer's projections and MLP (the per-token matrix work is 2 FLOPs each)."""
        q = self.hidden_size * self.heads * self.head_dim
        kv = 2 * self.hidden_size * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        return q + kv + o + mlp

    def attention_width(self) -> int:
        """Per layer, attention FLOPs per (query, key) pair are 4 x heads x head_dim (QK^T and PV)."""
        return self.heads * self.head_dim

    def config_kwargs(self) -> dict[str, Any]:
        kw = {"hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
              "num_hidden_layers": self.measured_layers, "num_attention_heads": self.heads,
              "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim, "vocab_size": self.vocab_size,
              "max_position_embeddings": 32768}
        kw.update(self.extra)
        return kw


_L70 = MappingProxyType({"hidden_size": 8192, "intermediate_size": 28672, "layers": 80, "heads": 64, "kv_heads": 8,
                         "vocab_size": 128256})

SHAPES: MappingProxyType[str, CalibrationShape] = MappingProxyType({s.name: s for s in (
    # Mistral-7B v0.2/v0.3: full attention (no sliding window), 32K context.
    CalibrationShape("mistral-7b", "mistral", 4096, 14336, 32, 32, 8, 32000, extra={"sliding_window": None}),
    CalibrationShape("llama-3.1-8b", "llama", 4096, 14336, 32, 32, 8, 128256),
    CalibrationShape("smollm2-135m", "llama", 576, 1536, 30, 9, 3, 49152, head_dim=64,
                     extra={"tie_word_embeddings": True}),
    # 70B shapes do not fit on one 80 GB GPU in bf16: 16 of the 80 identical layers do (27 GB of weights).
    CalibrationShape("llama-3-70b@16L", "llama", layers_measured=16, **_L70),
    CalibrationShape("llama-2-70b", "llama", hidden_size=8192, intermediate_size=28672, layers=80, heads=64,
                     kv_heads=8, vocab_size=32000),
    CalibrationShape("llama-3-70b", "llama", **_L70),
    # For testing the script on a CPU.
    CalibrationShape("tiny", "mistral", 64, 128, 2, 4, 2, 1000, head_dim=16, extra={"sliding_window": None}),
)})
"""Shapes ``measure`` knows (read-only)."""

DEFAULT_LENGTHS = (256, 512, 1024, 1536, 2048)
DEFAULT_POSITIONS = (0, 2048, 4096, 8192, 16384, 24576)
DEFAULT_HOLDOUT = ((0, 4096), (0, 8192), (12288, 768), (28672, 2048))


# --------------------------------------------------------------------------------------------------------------
# Fitting: kvcast.streamer.costfit (pure numpy; tested on CPU by tests/streamer/test_recompute_calibration.py).


def rescale_factors(source: CalibrationShape, target: CalibrationShape) -> tuple[float, float, float]:
    """Work-count ratios target / source for ``(a, b, c)``: ``a`` by the decoder's matrix weights
    (layers x params_per_layer), ``b`` by layers x attention width, ``c`` (per-forward overhead, kernel
    launches) by layers."""
    ra = target.layers * target.params_per_layer() / (source.layers * source.params_per_layer())
    rb = target.layers * target.attention_width() / (source.layers * source.attention_width())
    rc = target.layers / source.layers
    return ra, rb, rc


def rescale_cost(coef: Sequence[float], source: CalibrationShape, target: CalibrationShape) -> tuple[float, ...]:
    """Carry measured ``(a, b, c)`` from one shape to another by `rescale_factors`. Assumes the same GPU
    efficiency at both sizes, so the result stays provisional."""
    return tuple(x * r for x, r in zip(coef, rescale_factors(source, target)))


# --------------------------------------------------------------------------------------------------------------
# Measurement (needs torch and transformers; a GPU for meaningful numbers).


@dataclass
class PointTiming:
    pos: int
    length: int
    role: str  # "fit" or "holdout"
    times_s: list[float]
    warmup_s: list[float] = field(default_factory=list)
    host_s: list[float] = field(default_factory=list)
    """Per timed trial, host time spent inside the forward call (Python and kernel launches): where it is
    close to the measured time, the step is bound by the host, not the GPU."""

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    def as_json(self) -> dict[str, Any]:
        return {"pos": self.pos, "len": self.length, "role": self.role, "median_s": self.median_s,
                "min_s": min(self.times_s), "max_s": max(self.times_s), "times_s": self.times_s,
                "warmup_s": self.warmup_s,
                "host_median_s": statistics.median(self.host_s) if self.host_s else None}


def _environment(torch: Any, device: str) -> dict[str, Any]:
    import importlib.util

    import transformers

    env: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "device": device,
        "flash_attn_package": importlib.util.find_spec("flash_attn") is not None,
    }
    try:
        from transformers.utils import is_flash_attn_2_available
        env["transformers_flash_attn_2_available"] = bool(is_flash_attn_2_available())
    except ImportError:
        pass
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count, cuda=torch.version.cuda,
                   sdpa_flash_enabled=torch.backends.cuda.flash_sdp_enabled(),
                   sdpa_mem_efficient_enabled=torch.backends.cuda.mem_efficient_sdp_enabled(),
                   sdpa_cudnn_enabled=torch.backends.cuda.cudnn_sdp_enabled())
        env["nvidia_smi"] = _nvidia_smi()
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def _nvidia_smi() -> str | None:
    """Read-only query of the GPU's clocks, power limit and temperature."""
    try:
        return subprocess.run(
            ["nvidia-smi", ("--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,"
                            "temperature.gpu,utilization.gpu"), "--format=csv"],
            check=False, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def build_model(shape: CalibrationShape, device: str, attn: str, seed: int):
    """A randomly initialised causal LM of `shape`, created directly in bf16 on `device`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    config_cls = {"mistral": MistralConfig, "llama": LlamaConfig}[shape.arch]
    config = config_cls(**shape.config_kwargs())
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no fp32 copy of the weights, on the CPU or the GPU
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.bfloat16)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    return model


def _truncate_cache(cache: Any, pos: int) -> None:
    """Drop every cached token after the first `pos` (views; the next forward's cat makes new tensors).
    Done on the layers directly: `DynamicCache.crop`'s argument changed meaning between transformers 5.x."""
    for layer in cache.layers:
        layer.keys = layer.keys[..., :pos, :]
        layer.values = layer.values[..., :pos, :]
    if cache.get_seq_length() != pos:
        raise RuntimeError(f"cache truncation failed: {cache.get_seq_length()} tokens, wanted {pos}")


def measure_shape(shape: CalibrationShape, *, device: str, attn: str, lengths: Sequence[int],
                  positions: Sequence[int], holdout: Sequence[tuple[int, int]], warmup: int, reps: int,
                  prefix_chunk: int, seed: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Time every (pos, len) point of the grid and the held-out points on one model; fit; return a record."""
    import torch
    from transformers import DynamicCache

    env = _environment(torch, device)
    t0 = time.perf_counter()
    model = build_model(shape, device, attn, seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[{shape.name}] built {n_params / 1e9:.2f}B params ({shape.measured_layers} layers, {attn}) "
        f"in {time.perf_counter() - t0:.1f}s")
    cuda = device.startswith("cuda")
    gen = torch.Generator(device=device).manual_seed(seed)

    def tokens(n: int):
        return torch.randint(0, shape.vocab_size, (1, n), device=device, generator=gen)

    def forward(ids, cache):
        return model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)

    def timed(ids, cache) -> tuple[float, float, Any]:
        """(measured seconds, host seconds inside the forward call, output)."""
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)  # each trial starts idle, as a chunk recompute does in the streamer
            start.record()
            t = time.perf_counter()
            out = forward(ids, cache)
            host = time.perf_counter() - t
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, host, out
        t = time.perf_counter()
        out = forward(ids, cache)
        dt = time.perf_counter() - t
        return dt, dt, out

    points = sorted({(p, n, "fit") for p in positions for n in lengths}
                    | {(p, n, "holdout") for p, n in holdout if (p, n) not in
                       {(q, m) for q in positions for m in lengths}})
    timings: list[PointTiming] = []
    with torch.inference_mode():
        # Global warm-up: kernels, cuBLAS handles, allocator, clocks.
        for n in sorted(set(lengths)) * 2:
            timed(tokens(n), DynamicCache())
        cache = DynamicCache()
        for p, n, role in points:
            while cache.get_seq_length() < p:  # extend the shared prefix in chunks (ascending pos)
                step = min(prefix_chunk, p - cache.get_seq_length())
                forward(tokens(step), cache)
            times: list[float] = []
            warm: list[float] = []
            host: list[float] = []
            for trial in range(warmup + reps):
                if p == 0:
                    trial_cache = DynamicCache()
                else:
                    _truncate_cache(cache, p)
                    trial_cache = cache
                dt, host_dt, out = timed(tokens(n), trial_cache)
                (times if trial >= warmup else warm).append(dt)
                if trial >= warmup:
                    host.append(host_dt)
            if trial_cache.get_seq_length() != p + n:
                raise RuntimeError(f"cache holds {trial_cache.get_seq_length()} tokens after the forward, "
                                   f"expected {p + n}")
            if not bool(torch.isfinite(out.logits).all()):
                raise RuntimeError(f"non-finite logits at pos={p} len={n}")
            if p > 0:
                _truncate_cache(cache, p)
            pt = PointTiming(p, n, role, times, warm, host)
            timings.append(pt)
            log(f"[{shape.name}] pos={p:6d} len={n:5d} {role:7s} median {pt.median_s * 1e3:8.2f} ms "
                f"(min {min(times) * 1e3:.2f}, max {max(times) * 1e3:.2f}, n={len(times)}; host "
                f"{statistics.median(host) * 1e3:.1f} ms; first warm-up "
                f"{warm[0] * 1e3 if warm else float('nan'):.1f} ms)")
        kernels = _attention_kernels(torch, forward, tokens, cache, max(positions), 1024, cuda)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    cache = model = None  # free the GPU memory before the next shape
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return {
        "format": FORMAT, "model": shape.name, "shape": asdict(shape), "params": n_params,
        "attn_implementation": attn, "dtype": "bfloat16", "environment": env,
        "settings": {"warmup": warmup, "reps": reps, "prefix_chunk": prefix_chunk, "seed": seed,
                     "logits_to_keep": 1, "timer": "cuda events" if cuda else "perf_counter"},
        "peak_memory_gib": peak, "kernels": kernels,
        "points": [t.as_json() for t in timings],
        "elapsed_s": time.perf_counter() - t0,
    }


def _attention_kernels(torch: Any, forward, tokens, cache, pos: int, length: int, cuda: bool) -> Any:
    """Which GPU kernels one forward at (pos, length) spends its time in (to see the SDPA backend used)."""
    if not cuda:
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        _truncate_cache(cache, pos)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            forward(tokens(length), cache)
            torch.cuda.synchronize()
        _truncate_cache(cache, pos)
        rows = []
        for ev in prof.key_averages():
            t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            if t > 0 and not ev.key.startswith("aten::"):
                rows.append((float(t), ev.key[:160], ev.count))
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        return {"pos": pos, "len": length, "total_us": total,
                "top": [{"kernel": k, "us": t, "share": t / total, "calls": c} for t, k, c in rows[:12]]}
    except Exception as exc:
        return {"error": repr(exc)}


# --------------------------------------------------------------------------------------------------------------
# Reports and the cost table.


def fit_record(record: dict[str, Any]) -> tuple[CostFit, list[dict[str, Any]]]:
    """Fit a measurement record's grid points; return the fit and every point with its relative residual."""
    pts = record["points"]
    fit = fit_recompute_cost([(p["pos"], p["len"], p["median_s"]) for p in pts if p["role"] == "fit"])
    rows = [dict(p, predicted_s=predict_s(fit.coef, p["pos"], p["len"]),
                 rel_residual=predict_s(fit.coef, p["pos"], p["len"]) / p["median_s"] - 1) for p in pts]
    return fit, rows


def fit_summary(fit: CostFit, rows: list[dict[str, Any]], layer_scale: float) -> dict[str, Any]:
    hold = [r["rel_residual"] for r in rows if r["role"] == "holdout"]
    coef4, resid4 = fit_with_prefix_term(fit.points)
    return {
        "method": "NNLS on relative error of medians (rows weighted by 1/median), fit points only",
        "a_s_per_token": fit.a_s_per_token, "b_s_per_token_pair": fit.b_s_per_token_pair, "c_s": fit.c_s,
        "layer_scale": layer_scale,
        "fit_rms_rel_residual": fit.rms_rel, "fit_max_abs_rel_residual": fit.max_abs_rel,
        "holdout_max_abs_rel_residual": max(map(abs, hold)) if hold else None,
        "diagnostic_with_prefix_term": {
            "a_s_per_token": coef4[0], "b_s_per_token_pair": coef4[1], "c_s": coef4[2],
            "d_s_per_prefix_token": coef4[3], "rms_rel_residual": math.sqrt(sum(r * r for r in resid4) / len(resid4)),
            "max_abs_rel_residual": max(map(abs, resid4))},
    }


def markdown_report(record: dict[str, Any], fit: CostFit, rows: list[dict[str, Any]]) -> str:
    """Medians as a pos x len grid (ms, with the fit's relative residual), held-out points, and the fit."""
    lengths = sorted({r["len"] for r in rows if r["role"] == "fit"})
    positions = sorted({r["pos"] for r in rows if r["role"] == "fit"})
    cell = {(r["pos"], r["len"]): r for r in rows if r["role"] == "fit"}
    out = [f"**{record['model']}**: median ms (relative residual of the fit)", "",
           "| pos \\ len | " + " | ".join(map(str, lengths)) + " |", "|---" * (len(lengths) + 1) + "|"]
    for p in positions:
        out.append(f"| {p} | " + " | ".join(
            f"{cell[p, n]['median_s'] * 1e3:.1f} ({cell[p, n]['rel_residual']:+.0%})" if (p, n) in cell else "-"
            for n in lengths) + " |")
    hold = [r for r in rows if r["role"] == "holdout"]
    if hold:
        out += ["", "Held out: " + "; ".join(
            f"({r['pos']}, {r['len']}) {r['median_s'] * 1e3:.1f} ms, fit {r['predicted_s'] * 1e3:.1f} ms "
            f"({r['rel_residual']:+.0%})" for r in hold) + "."]
    out += ["", (f"Fit: a = {fit.a_s_per_token:.3e} s/token, b = {fit.b_s_per_token_pair:.3e} s/token pair, "
                 f"c = {fit.c_s:.3e} s; relative residuals rms {fit.rms_rel:.1%}, max {fit.max_abs_rel:.1%}."), ""]
    return "\n".join(out)


def print_report(record: dict[str, Any], fit: CostFit, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    env = record["environment"]
    table = Table(title=f"{record['model']}: prefill of len tokens after pos cached tokens "
                        f"({env.get('gpu', env.get('device'))}, {record['attn_implementation']}, bf16)")
    for col in ("pos", "len", "role", "median ms", "min ms", "max ms", "host ms", "fit ms", "rel resid"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["pos"]), str(r["len"]), r["role"], f"{r['median_s'] * 1e3:.2f}",
                      f"{r['min_s'] * 1e3:.2f}", f"{r['max_s'] * 1e3:.2f}",
                      f"{r['host_median_s'] * 1e3:.1f}" if r.get("host_median_s") is not None else "-",
                      f"{r['predicted_s'] * 1e3:.2f}",
                      f"{r['rel_residual']:+.1%}")
    console.print(table)
    s = fit_summary(fit, rows, 1.0)
    hold = s["holdout_max_abs_rel_residual"]
    console.print(f"{record['model']}: a = {fit.a_s_per_token:.4e} s/token, b = {fit.b_s_per_token_pair:.4e} "
                  f"s/token-pair, c = {fit.c_s:.4e} s; relative residuals on the fit grid: rms "
                  f"{fit.rms_rel:.1%}, max {fit.max_abs_rel:.1%}"
                  + (f"; held-out max {hold:.1%}" if hold is not None else ""))
    d = s["diagnostic_with_prefix_term"]
    console.print(f"  diagnostic with a d*pos term: d = {d['d_s_per_prefix_token']:.3e} s/prefix token, a = "
                  f"{d['a_s_per_token']:.3e}, b = {d['b_s_per_token_pair']:.3e}, c = {d['c_s']:.3e}; rms "
                  f"{d['rms_rel_residual']:.1%}, max {d['max_abs_rel_residual']:.1%}")


def _fmt(x: float) -> str:
    return f"{x:.3e}" if x else "0.0"


def format_table(table: dict[str, Any]) -> str:
    """The cost table as JSON with one entry per line (as shipped)."""
    head = {k: v for k, v in table.items() if k != "entries"}
    lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()] + ['  "entries": [']
    entries = []
    for e in table["entries"]:
        parts = [f'"gpu": {json.dumps(e["gpu"])}', f'"model": {json.dumps(e["model"])}']
        parts += [f'"{k}": {_fmt(e[k])}' for k in ("a_s_per_token", "b_s_per_token_pair", "c_s")]
        parts += [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in e.items()
                  if k not in ("gpu", "model", "a_s_per_token", "b_s_per_token_pair", "c_s")]
        entries.append("    {" + ", ".join(parts) + "}")
    lines.append(",\n".join(entries))
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def merge_entries(table: dict[str, Any], new: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Replace the entries with the same (gpu, model) in place; append the others."""
    out = dict(table, entries=[dict(e) for e in table["entries"]])
    index = {(e["gpu"], e["model"]): i for i, e in enumerate(out["entries"])}
    for e in new:
        key = (e["gpu"], e["model"])
        if key in index:
            out["entries"][index[key]] = dict(e)
        else:
            index[key] = len(out["entries"])
            out["entries"].append(dict(e))
    return out


def load_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{path}:{exc.lineno}: not JSON: {exc.msg}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise SystemExit(f"{path}: not a {FORMAT} file")
    return record


# --------------------------------------------------------------------------------------------------------------
# CLI


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"expected comma-separated integers, got {text!r}") from None


def _pairs(text: str) -> list[tuple[int, int]]:
    if text.strip().lower() in ("", "none"):
        return []
    try:
        return [(int(a), int(b)) for a, b in (x.split(":") for x in text.split(","))]
    except ValueError:
        raise SystemExit(f"expected pos:len[,pos:len...], got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> None:
    app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])

    @app.command()
    def measure(
        models: Annotated[list[str], typer.Argument(help=f"shapes: {', '.join(SHAPES)}")],
        out: Annotated[Path, typer.Option(help="directory for calibration-MODEL.json")] = Path("results/recompute"),
        device: Annotated[str, typer.Option(help="cuda, cuda:N or cpu")] = "cuda",
        attn: Annotated[str, typer.Option(help="transformers attn_implementation")] = "sdpa",
        lengths: Annotated[str, typer.Option(help="chunk lengths")] = ",".join(map(str, DEFAULT_LENGTHS)),
        positions: Annotated[str, typer.Option(help="cached prefix lengths")] = ",".join(
            map(str, DEFAULT_POSITIONS)),
        holdout: Annotated[str, typer.Option(help="pos:len points timed but not fitted ('none' for none)")] = ",".join(
            f"{p}:{n}" for p, n in DEFAULT_HOLDOUT),
        warmup: Annotated[int, typer.Option(min=0, help="untimed trials per point")] = 2,
        reps: Annotated[int, typer.Option(min=1, help="timed trials per point (median)")] = 7,
        prefix_chunk: Annotated[int, typer.Option(min=1, help="chunk size used to build the prefix cache")] = 4096,
        seed: Annotated[int, typer.Option(help="seed of weights and tokens")] = 0,
    ) -> None:
        """Time prefill(pos, len) on randomly initialised models and fit the cost model."""
        unknown = [m for m in models if m not in SHAPES]
        if unknown:
            raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(SHAPES)}")
        out.mkdir(parents=True, exist_ok=True)
        for name in models:
            shape = SHAPES[name]
            record = measure_shape(shape, device=device, attn=attn, lengths=_ints(lengths),
                                   positions=_ints(positions), holdout=_pairs(holdout), warmup=warmup,
                                   reps=reps, prefix_chunk=prefix_chunk, seed=seed,
                                   log=lambda s: print(s, flush=True))
            fit, rows = fit_record(record)
            record["points"] = rows
            record["fit"] = fit_summary(fit, rows, shape.layer_scale)
            record["command"] = " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
            path = out / f"calibration-{name.replace('@', '-')}.json"
            path.write_text(json.dumps(record, indent=1) + "\n")
            print_report(record, fit, rows)
            print(f"wrote {path}", flush=True)

    @app.command("fit")
    def fit_cmd(files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False)],
                markdown: Annotated[bool, typer.Option(help="print markdown tables")] = False) -> None:
        """Re-fit saved measurements and print the table."""
        for path in files:
            record = load_record(path)
            fit, rows = fit_record(record)
            if markdown:
                print(markdown_report(record, fit, rows))
            else:
                print_report(record, fit, rows)

    @app.command()
    def table(
        files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False)],
        table_path: Annotated[Path, typer.Option("--table", exists=True)] = Path("streamer/recompute_costs.json"),
        gpu: Annotated[str, typer.Option(help="gpu key of the entries")] = "h100",
        rescale: Annotated[list[str] | None, typer.Option(
            help="TARGET=SOURCE: provisional entry for TARGET from the measured SOURCE by work counts")] = None,
        note: Annotated[str, typer.Option(help="replace the table's note")] = "",
        dry_run: Annotated[bool, typer.Option(help="print the table instead of writing it")] = False,
    ) -> None:
        """Write measured entries (and rescaled provisional ones) into the cost table."""
        try:
            current = json.loads(table_path.read_text())
        except json.JSONDecodeError as exc:
            raise SystemExit(f"{table_path}:{exc.lineno}: not JSON: {exc.msg}") from None
        if current.get("format") != TABLE_FORMAT:
            raise SystemExit(f"{table_path}: not a {TABLE_FORMAT} table")
        new, measured = [], {}
        for path in files:
            record = load_record(path)
            if record.get("model") not in SHAPES:
                raise SystemExit(f"{path}: unknown model {record.get('model')!r}")
            shape = SHAPES[record["model"]]
            fit, _ = fit_record(record)
            s = shape.layer_scale
            env = record["environment"]
            date = env["date_utc"][:10]
            device = env.get("gpu", env["device"])
            coef = (fit.a_s_per_token * s, fit.b_s_per_token_pair * s, fit.c_s * s)
            measured[shape.table_model] = (coef, shape, record["model"], date, device)
            truncated = shape.layers_measured is not None
            source = (f"scripts/calibrate_recompute.py measure {record['model']}, {date}, {device}, "
                      f"{record['attn_implementation']} bf16, random init; "
                      + (f"{shape.measured_layers} of {shape.layers} layers, coefficients x{s:g} (one-GPU "
                         f"equivalent: the model does not fit one GPU); " if truncated else "")
                      + f"fit rms {fit.rms_rel:.1%}, max {fit.max_abs_rel:.1%} rel. residual")
            new.append({"gpu": gpu, "model": shape.table_model, "a_s_per_token": coef[0],
                        "b_s_per_token_pair": coef[1], "c_s": coef[2], "provisional": truncated,
                        "source": source})
        for spec in rescale or []:
            target, _, src = spec.partition("=")
            if src not in measured or target not in SHAPES:
                raise SystemExit(f"--rescale {spec!r}: need TARGET=SOURCE with SOURCE among the measured "
                                 f"({', '.join(measured)}) and TARGET among {', '.join(SHAPES)}")
            coef, shape, measured_as, date, device = measured[src]
            a, b, c = rescale_cost(coef, shape, SHAPES[target])
            ra, rb, rc = rescale_factors(shape, SHAPES[target])
            origin = f"{gpu}/{src} ({measured_as}, {date}, {device})"
            how = (f"same layer count and per-layer work as {origin}" if (ra, rb, rc) == (1.0, 1.0, 1.0) else
                   f"{origin} rescaled by work counts: a x {ra:.2f} (matrix weights), b x {rb:.2f} (layers x "
                   f"attention width), c x {rc:.2f} (layers)")
            new.append({"gpu": gpu, "model": target, "a_s_per_token": a, "b_s_per_token_pair": b, "c_s": c,
                        "provisional": True,
                        "source": f"{how}; scripts/calibrate_recompute.py table --rescale {spec}"})
        if note:
            current["note"] = note
        text = format_table(merge_entries(current, new))
        json.loads(text)  # the output must parse
        if dry_run:
            print(text)
        else:
            table_path.write_text(text)
            print(f"wrote {len(new)} entries to {table_path}")

    app(args=list(argv) if argv is not None else None)


if __name__ == "__main__":
    main()
