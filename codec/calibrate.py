"""`kvcast calibrate`: measure a model's KV sensitivity table from real text.

For each passage: prefill the context, make its KV a leaf that requires gradients, feed the continuation,
sample each continuation token from the model's own distribution (so the squared gradients estimate the
Fisher information of the model's predictive distribution, the quantity a KL to the exact model expands
into) and back-propagate its log-likelihood to the KV. The squared gradients, averaged over passages,
context tokens past the sink and continuation tokens, give the per-channel table; summed over channels, the
per-position curve gives the distance-from-end profile (`codec.sensitivity`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from codec.sensitivity import TABLES_DIR, SensitivityTable, profile_from_positions

DEFAULT_SINK_TOKENS = 4


def table_filename(name: str) -> str:
    """File name for a model's table: its name in lower case, non-alphanumerics as dashes."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")
    return f"{slug or 'model'}.safetensors"


def calibrate(model: Any, passages: list[torch.Tensor], *, name: str, context_tokens: int,
              continuation_tokens: int, sink_tokens: int = DEFAULT_SINK_TOKENS, seed: int = 0,
              source: str = "", progress: Callable[[str], None] | None = None) -> SensitivityTable:
    """The sensitivity table of `model` from `passages` (token ids ``[1, >= context + continuation]``)."""
    from codec.hf import cache_from_kv, fingerprint_from_config, kv_from_cache

    fingerprint = fingerprint_from_config(model.config, name=name, dtype=model.dtype)
    layers, heads, dim = fingerprint.layers, fingerprint.kv_heads, fingerprint.head_dim
    key_sum = torch.zeros(layers, heads, dim, dtype=torch.float64)
    value_sum = torch.zeros_like(key_sum)
    position_sum = torch.zeros(context_tokens, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for index, ids in enumerate(passages):
        ctx = ids[:, :context_tokens]
        fed = ids[:, context_tokens:context_tokens + continuation_tokens]
        with torch.inference_mode():
            kv = kv_from_cache(model(ctx, use_cache=True, logits_to_keep=1).past_key_values)
        leaves = [(k.clone().requires_grad_(True), v.clone().requires_grad_(True)) for k, v in kv]
        cache = cache_from_kv(leaves, model.config, dtype=model.dtype)
        with torch.enable_grad():
            logp = torch.log_softmax(model(fed, past_key_values=cache, use_cache=True).logits[0].float(), -1)
            sampled = torch.multinomial(logp.detach().exp(), 1, generator=generator)
            logp.gather(-1, sampled).sum().backward()
        gk = torch.stack([k.grad[0] for k, _ in leaves]).double() ** 2   # [L, H, T, D]
        gv = torch.stack([v.grad[0] for _, v in leaves]).double() ** 2
        key_sum += gk[:, :, sink_tokens:].sum(2)
        value_sum += gv[:, :, sink_tokens:].sum(2)
        position_sum += gk.sum((0, 1, 3)) + gv.sum((0, 1, 3))
        if progress:
            progress(f"passage {index + 1}/{len(passages)} ({time.perf_counter() - started:.0f} s)")
    count = len(passages) * (context_tokens - sink_tokens) * continuation_tokens
    edges, profile = profile_from_positions((position_sum / len(passages)).numpy(), sink_tokens)
    return SensitivityTable(
        model=fingerprint.to_dict(), key=(key_sum / count).float().numpy(),
        value=(value_sum / count).float().numpy(), distance_edges=edges, distance_profile=profile,
        meta={"source": source, "passages": len(passages), "context_tokens": context_tokens,
              "continuation_tokens": continuation_tokens, "sink_tokens": sink_tokens, "seed": seed,
              "estimator": "squared gradient of log p(sampled continuation token) w.r.t. the KV, per "
                           "continuation token",
              "seconds": round(time.perf_counter() - started, 1)})


def calibrate_smollm2(*, split: str = "valid", passages: int = 4, context_tokens: int = 2048,
                      continuation_tokens: int = 256, out_dir: Path = TABLES_DIR, datasets: Path | None = None,
                      text_file: Path | None = None, progress: bool = True) -> Path:
    """Calibrate SmolLM2-135M on a WikiText-2 split (or a text file) and write its table to `out_dir`."""
    from codec.evaluate import EvalSettings, corpus_path, passages_from_text, read_text
    from codec.model import load_smollm2

    settings = EvalSettings(split=split, passages=passages, datasets=datasets, text_file=text_file)
    source = corpus_path(settings)
    loaded = load_smollm2(progress=progress)
    found = passages_from_text(read_text(source), loaded.tokenizer, passages,
                               context_tokens + continuation_tokens, source=str(source))
    note = (lambda msg: print(f"calibrate: {msg}", flush=True)) if progress else None
    table = calibrate(loaded.model, [p.token_ids for p in found], name=loaded.name, context_tokens=context_tokens,
                      continuation_tokens=continuation_tokens, source=f"{source.parent.name}/{source.name}",
                      progress=note)
    return table.save(Path(out_dir) / table_filename(loaded.name))


def table_summary(table: SensitivityTable) -> dict[str, Any]:
    """Where the sensitivity sits: per layer (keys, values) and the distance profile."""
    return {"model": table.model.get("name"), "meta": table.meta,
            "key_by_layer": table.key.mean((1, 2)).tolist(), "value_by_layer": table.value.mean((1, 2)).tolist(),
            "key_channel_spread": float(np.median(table.key.max(2) / np.median(table.key, 2))),
            "distance_edges": table.distance_edges.tolist(), "distance_profile": table.distance_profile.tolist()}
