"""`kvcast calibrate`: measure a model's KV sensitivity table from real text.

For each passage: prefill the context, make its KV a leaf that requires gradients, feed the continuation,
sample each continuation token from the model's own distribution (so the squared gradients estimate the
Fisher information of the model's predictive distribution, the quantity a KL to the exact model expands
into) and back-propagate its log-likelihood to the KV. The squared gradients, averaged over passages,
context tokens past the sink and continuation tokens, give the per-channel table; summed over channels, the
per-position curve gives the distance-from-end profile (`kvcast.codec.sensitivity`). The table records the
model's fingerprint and its KV signature (`kvcast.codec.fingerprint.KVSignature`), by which the encoder finds
it for any copy of the same model.

`calibrate_model` does this for SmolLM2-135M-Instruct (the default; its table ships in ``codec/tables``) or any
causal LM `kvcast.codec.model.load_model` finds, and names the file after the model (`table_filename`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvcast.codec.evaluate import EvalSettings, corpus_path, passages_from_text, read_text
from kvcast.codec.hf import cache_from_kv, fingerprint_from_config, kv_from_cache
from kvcast.codec.model import load_model
from kvcast.codec.sensitivity import (
    TABLES_DIR,
    SensitivityTable,
    binned,
    profile_from_positions,
    score_profile,
    sink_scores,
)
from kvcast.codec.settings import CalibrateSettings as _CAL

DEFAULT_SINK_TOKENS = 4
DEFAULT_TRIM = _CAL.trim


def table_filename(name: str) -> str:
    """File name for a model's table: its name in lower case, non-alphanumerics as dashes."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")
    return f"{slug or 'model'}.safetensors"


def calibrate(model: Any, passages: list[torch.Tensor], *, name: str, context_tokens: int,
              continuation_tokens: int, sink_tokens: int = DEFAULT_SINK_TOKENS, seed: int = 0,
              trim: float = DEFAULT_TRIM, source: str = "",
              progress: Callable[[str], None] | None = None) -> SensitivityTable:
    """The sensitivity table of `model` from `passages` (token ids ``[1, >= context + continuation]``).

    The per-token Fisher is modelled as ``w_t * F_c``: ``w_t`` from the token's distance to the context's end
    and its sink score (both binned profiles, fitted by alternation), ``F_c`` per channel from the squared
    gradients divided by ``w_t``. `trim`: the fraction of each passage's tokens that this model explains
    worst (largest Fisher / ``w_t``) left out of ``F_c``: a few such tokens would otherwise set every step.
    """
    fingerprint = fingerprint_from_config(model.config, name=name, dtype=model.dtype)
    layers, heads, dim = fingerprint.layers, fingerprint.kv_heads, fingerprint.head_dim
    sink_sum = torch.zeros(layers, heads, dim, dtype=torch.float64)
    body_keys, body_grads = [], []
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for index, ids in enumerate(passages):
        ctx = ids[:, :context_tokens]
        fed = ids[:, context_tokens:context_tokens + continuation_tokens]
        with torch.inference_mode():
            kv = kv_from_cache(model(ctx, use_cache=True, logits_to_keep=1).cache)
        leaves = [(k.clone().requires_grad_(True), v.clone().requires_grad_(True)) for k, v in kv]
        cache = cache_from_kv(leaves, model.config, dtype=model.dtype)
        with torch.enable_grad():
            logp = torch.log_softmax(model(fed, cache=cache, use_cache=True).logits[0].float(), -1)
            sampled = torch.multinomial(logp.detach().exp(), 1, generator=generator)
            logp.gather(-1, sampled).sum().backward()
        grads = torch.stack([torch.stack([k.grad[0], v.grad[0]]) for k, v in leaves], 1)  # [2, L, H, T, D]
        body_grads.append((grads[:, :, :, sink_tokens:].float() ** 2).numpy())
        keys = torch.stack([k[0] for k, _ in kv])                                       # [L, H, T, D]
        sink_sum += torch.nn.functional.normalize(keys[:, :, 0].double(), dim=-1)
        body_keys.append(keys[:, :, sink_tokens:].float().numpy())
        if progress:
            progress(f"passage {index + 1}/{len(passages)} ({time.perf_counter() - started:.0f} s)")
    sink_key = (sink_sum / len(passages)).float().numpy()  # mean of unit vectors: shorter if they disagree
    scores = np.stack([sink_scores(k, sink_key) for k in body_keys])              # [passages, body]
    fisher = np.stack([g.sum((0, 1, 2, 4), dtype=np.float64) for g in body_grads])  # per token
    distance = np.arange(fisher.shape[1] - 1, -1, -1)
    # alternate: each profile is measured on the Fisher the other one leaves unexplained
    score_w = np.ones_like(fisher)
    for _ in range(2):
        curve = np.concatenate([np.zeros(sink_tokens), (fisher / score_w).mean(0)])
        edges, profile = profile_from_positions(curve, sink_tokens)
        dist_w = binned(edges, profile, distance)
        s_edges, s_profile = score_profile(scores.ravel(), (fisher / dist_w).ravel())
        score_w = binned(s_edges, s_profile, scores)
    # channels: Fisher per token divided by the token's modelled weight, so that F(t, c) ~ w_t * F_c
    token_w = dist_w[None, :] * score_w
    residual = fisher / token_w
    channel_sum = np.zeros((2, layers, heads, dim))
    kept = 0
    for p, grads in enumerate(body_grads):
        keep = residual[p] <= np.quantile(residual[p], 1.0 - trim) if trim > 0 else np.ones(len(residual[p]), bool)
        kept += int(keep.sum())
        channel_sum += np.einsum("klhtd,t->klhd", grads[:, :, :, keep], 1.0 / token_w[p, keep])
    channel = channel_sum / (kept * continuation_tokens)
    return SensitivityTable(
        model=fingerprint.to_dict(), kv_signature=fingerprint.kv_signature,
        key=channel[0].astype(np.float32), value=channel[1].astype(np.float32),
        distance_edges=edges, distance_profile=profile,
        sink_key=sink_key, score_edges=s_edges, score_profile=s_profile,
        meta={"source": source, "passages": len(passages), "context_tokens": context_tokens,
              "continuation_tokens": continuation_tokens, "sink_tokens": sink_tokens, "seed": seed, "trim": trim,
              "estimator": "squared gradient of log p(sampled continuation token) w.r.t. the KV, per "
                           "continuation token",
              "seconds": round(time.perf_counter() - started, 1)})


def calibrate_model(model: str = _CAL.model, *, split: str = _CAL.split, passages: int = _CAL.passages,
                    context_tokens: int = _CAL.context_tokens, continuation_tokens: int = _CAL.continuation_tokens,
                    trim: float = DEFAULT_TRIM, out_dir: Path | None = _CAL.out_dir,
                    datasets: Path | None = None, text_file: Path | None = None, progress: bool = True) -> Path:
    """Calibrate `model` (SmolLM2-135M-Instruct by default, else any causal-LM folder or hub id on this machine:
    `kvcast.codec.model.load_model`, which raises `ModelUnavailable`) on a WikiText-2 split (or a text file)
    and write its table to ``out_dir / table_filename(name)`` (None: the shipped tables folder), ``name`` the
    model's `LoadedModel.name`. Returns the table's path. Defaults: `kvcast.codec.settings.CalibrateSettings`."""
    settings = EvalSettings(split=split, passages=passages, datasets=datasets, text_file=text_file)
    source = corpus_path(settings)
    loaded = load_model(model, progress=progress)
    found = passages_from_text(read_text(source), loaded.tokenizer, passages,
                               context_tokens + continuation_tokens, source=str(source))
    note = (lambda msg: print(f"calibrate: {msg}", flush=True)) if progress else None
    table = calibrate(loaded.model, [p.token_ids for p in found], name=loaded.name, context_tokens=context_tokens,
                      continuation_tokens=continuation_tokens, trim=trim, source=f"{source.parent.name}/{source.name}",
                      progress=note)
    return table.save(Path(TABLES_DIR if out_dir is None else out_dir) / table_filename(loaded.name))


def calibrate_smollm2(**kwargs: Any) -> Path:
    """`calibrate_model` of SmolLM2-135M-Instruct (the same keyword arguments, less `model`)."""
    return calibrate_model(_CAL.model, **kwargs)


def table_summary(table: SensitivityTable) -> dict[str, Any]:
    """Where the sensitivity sits: per layer (keys, values) and the distance profile."""
    return {"model": table.model.get("name"), "meta": table.meta,
            "key_by_layer": table.key.mean((1, 2)).tolist(), "value_by_layer": table.value.mean((1, 2)).tolist(),
            "key_channel_spread": float(np.median(table.key.max(2) / np.median(table.key, 2))),
            "distance_edges": table.distance_edges.tolist(), "distance_profile": table.distance_profile.tolist(),
            "score_edges": None if table.score_edges is None else table.score_edges.tolist(),
            "score_profile": None if table.score_profile is None else table.score_profile.tolist()}
