"""`kvcast demo`: one real passage through every codec level on SmolLM2-135M, in about a minute on 2 cores.

Loads SmolLM2 (converting its GGUF once), prefills a ~1.5K-token passage (WikiText-2 from the datasets folder, or
kvcast's generated corpus where there is none: `kvcast.codec.evaluate.corpus_path`), encodes its KV at every
level, decodes it, continues the next tokens on the decoded cache, and prints a table of size, speed and
agreement with the exact cache; writes ``demo.json`` (and, on request, the bitstreams) to the output folder.

``model`` names any other causal LM on this machine (`kvcast.codec.model.load_model`); its ``kvcast-*`` levels
run only with a sensitivity table that fits it (``tables``, then the shipped ones), else they are skipped with
a note (and listed under ``skipped_levels`` in ``demo.json``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from kvcast import codec
from kvcast.codec.evaluate import (
    EvalError,
    EvalSettings,
    QualitySums,
    continuation_logits,
    corpus_path,
    passages_from_text,
    plan_levels,
    read_text,
    warm_up_levels,
)
from kvcast.codec.hf import cache_from_kv, kv_from_cache, kv_values
from kvcast.codec.model import SMOLLM2_ALIASES, SMOLLM2_NAME, load_model
from kvcast.codec.settings import DemoSettings as _DEMO

DEMO_FORMAT = "kvcast-demo/1"


def run_demo(*, out: Path = _DEMO.out, context_tokens: int = _DEMO.context_tokens,
             next_tokens: int = _DEMO.next_tokens, levels: list[str] | None = None, text_file: Path | None = None,
             datasets: Path | None = None, threads: int | None = _DEMO.threads, save_bitstreams: bool = False,
             sample_tokens: int = _DEMO.sample_tokens, console: Any = None, model: str = _DEMO.model,
             tables: Path | None = _DEMO.tables) -> dict[str, Any]:
    """Run the demo, print its table to `console` (a rich Console) and write ``demo.json`` under `out`.
    Defaults: `kvcast.codec.settings.DemoSettings`. `model` is loaded by `kvcast.codec.model.load_model`
    (`kvcast.codec.model.ModelUnavailable` when it cannot be); `tables` is a folder of sensitivity tables
    searched before the shipped ones."""
    from rich.console import Console

    console = console or Console()
    started = time.perf_counter()
    source = corpus_path(EvalSettings(split="test", datasets=datasets, text_file=text_file))
    text = read_text(source)
    levels = list(levels) if levels else codec.levels()
    unknown = [lv for lv in levels if lv not in codec.levels()]
    if unknown:
        raise EvalError(f"unknown level(s) {', '.join(unknown)}; the codec has {', '.join(codec.levels())}")
    if tables is not None and not tables.is_dir():
        raise EvalError(f"tables folder {tables} does not exist")

    smollm2 = str(model).strip().lower() in SMOLLM2_ALIASES
    with console.status(f"Loading {SMOLLM2_NAME if smollm2 else model} ..."):
        lm = load_model(model, threads=threads, progress=True)
    fingerprint = lm.fingerprint()
    plan = plan_levels(levels, fingerprint, tables, model_arg=model)
    if plan.skipped:
        console.print(plan.note(), highlight=False, soft_wrap=True, markup=False)
    levels = plan.levels
    if not levels:
        raise EvalError(f"no level left to run ({plan.note()})")
    need = context_tokens + next_tokens + 1
    passage = passages_from_text(text, lm.tokenizer, 1, need, source=str(source))[0]
    ids = passage.token_ids
    ctx, fed, targets = ids[:, :context_tokens], ids[:, context_tokens:need - 1], ids[0, context_tokens + 1:need]
    with console.status(f"Prefilling {context_tokens} tokens ..."):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out_exact = lm.model(ctx, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
        kv = kv_from_cache(out_exact.cache)
        exact = continuation_logits(lm.model, kv, fed)
    values = kv_values(kv)
    fp16_bytes = 2 * values

    rows: list[dict[str, Any]] = []
    out.mkdir(parents=True, exist_ok=True)
    decoded_by_level: dict[str, Any] = {}
    with console.status("Warming up the coder ..."):
        warm_up_levels(levels, kv, fingerprint, plan.table)
    with console.status("Encoding ...") as status:
        for level in levels:
            status.update(f"Level {level}: encode, decode, continue ...")
            t0 = time.perf_counter()
            data = codec.encode(kv, level, model=fingerprint, sensitivity=plan.sensitivity(level))
            t1 = time.perf_counter()
            decoded = codec.decode(data, dtype=torch.float32, expect_model=fingerprint,
                                   sensitivity=plan.sensitivity(level))
            t2 = time.perf_counter()
            sums = QualitySums()
            sums.add(exact, continuation_logits(lm.model, decoded, fed), targets)
            quality = sums.summary()
            sizes = codec.inspect(data)["sizes"]
            if save_bitstreams:
                (out / f"{level}.kvc").write_bytes(data)
            decoded_by_level[level] = decoded
            rows.append({"level": level, "bytes": len(data), "bytes_by_role": sizes,
                         "bits_per_value": 8 * len(data) / values, "x_smaller_than_fp16": fp16_bytes / len(data),
                         "encode_ms": 1e3 * (t1 - t0), "decode_ms": 1e3 * (t2 - t1),
                         "top1_agreement": quality["top1_agreement"], "kl_per_token": quality["kl_per_token"],
                         "ppl_change": quality["ppl_change"]})

    samples = {}
    if sample_tokens > 0 and rows:
        smallest = min(rows, key=lambda r: r["bytes"])["level"]
        first = out_exact.logits[:, -1:].argmax(-1)
        samples["exact"] = _greedy(lm, kv, first, sample_tokens)
        samples[smallest] = _greedy(lm, decoded_by_level[smallest], first, sample_tokens)

    result = {
        "format": DEMO_FORMAT, "model": fingerprint.to_dict(), "source": str(source),
        "char_offset": passage.char_offset, "context_tokens": context_tokens, "next_tokens": next_tokens,
        "values": values, "fp16_bytes": fp16_bytes, "prefill_s": prefill_s, "levels": rows,
        "greedy_samples": samples, "elapsed_s": time.perf_counter() - started,
    }
    if plan.skipped:  # only then, so a run that skips nothing writes what it always did
        result["skipped_levels"] = dict(plan.skipped)
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    _print(console, result, lm.tokenizer, text[passage.char_offset:passage.char_offset + 160], out)
    return result


def _greedy(lm: Any, kv: Any, first: torch.Tensor, steps: int) -> list[int]:
    cache, tokens, nxt = cache_from_kv(kv, lm.config, dtype=torch.float32), [int(first)], first
    with torch.inference_mode():
        for _ in range(steps - 1):
            out = lm.model(nxt, cache=cache, use_cache=True)
            cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
            tokens.append(int(nxt))
    return tokens


def _print(console: Any, result: dict[str, Any], tokenizer: Any, opening: str, out: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    m = result["model"]
    console.print(f"[bold]{m['name']}[/bold] ({m['layers']} layers x {m['kv_heads']} KV heads x {m['head_dim']}), "
                  f"{result['context_tokens']} tokens of {Path(result['source']).name} "
                  f"(\"{escape(' '.join(opening.split())[:70])}...\"): {result['values']:,} KV values, "
                  f"{result['fp16_bytes'] / 1e6:.1f} MB in fp16; prefill {result['prefill_s']:.1f} s")
    table = Table(title=f"Every codec level on this context; quality on the next {result['next_tokens']} tokens")
    for col in ("level", "bytes", "bits/value", "x smaller than fp16", "encode ms", "decode ms", "top-1", "KL/token"):
        table.add_column(col, justify="left" if col == "level" else "right")
    for r in result["levels"]:
        kl = r["kl_per_token"]
        table.add_row(r["level"], f"{r['bytes']:,}", f"{r['bits_per_value']:.2f}", f"{r['x_smaller_than_fp16']:.1f}x",
                      f"{r['encode_ms']:.0f}", f"{r['decode_ms']:.0f}", f"{100 * r['top1_agreement']:.1f}%",
                      f"{kl:.4f}" if kl >= 1e-3 else f"{kl:.1e}")
    console.print(table)
    for name, tokens in result["greedy_samples"].items():
        console.print(f"[bold]{name:>12}[/bold] continues: {escape(repr(tokenizer.decode(tokens)))}")
    console.print(f"Wrote {out / 'demo.json'} in {result['elapsed_s']:.0f} s. Next: [bold]kvcast eval codec[/bold] "
                  "for the full rate-distortion table.")
