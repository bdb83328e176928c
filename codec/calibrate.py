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
    fit_basis,
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
              trim: float = DEFAULT_TRIM, basis_shrink: float = _CAL.basis_shrink,
              long_passages: dict[int, list[torch.Tensor]] | None = None, source: str = "",
              progress: Callable[[str], None] | None = None) -> SensitivityTable:
    """The sensitivity table of `model` from `passages` (token ids ``[1, >= context + continuation]``).

    The per-token Fisher is modelled as ``w_t * F_c``: ``w_t`` from the token's distance to the context's end
    and its sink score (both binned profiles, fitted by alternation), ``F_c`` per channel from the squared
    gradients divided by ``w_t``. `trim`: the fraction of each passage's tokens that this model explains
    worst (largest Fisher / ``w_t``) left out of ``F_c``: a few such tokens would otherwise set every step.
    The same tokens give each head's full Fisher matrix (whose diagonal is ``F_c``) and data covariance, from
    which `kvcast.codec.sensitivity.fit_basis` makes the table's basis, `basis_shrink` its shrinkage.
    `long_passages` (context length -> passages of that many tokens + the continuation) add the Fisher
    correlations of those context lengths to the basis (averaged with this one's; the diagonal stays ``F_c``):
    RoPE turns the queries with their absolute position, so a key basis fitted on one context length alone
    does not hold for queries much further on.
    """
    fingerprint = fingerprint_from_config(model.config, name=name, dtype=model.dtype)
    layers, heads, dim = fingerprint.layers, fingerprint.kv_heads, fingerprint.head_dim
    sink_sum = torch.zeros(layers, heads, dim, dtype=torch.float64)
    body_keys, body_grads, body_kv = [], [], []
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for index, ids in enumerate(passages):
        kv, grads = _kv_and_gradients(model, ids, context_tokens, continuation_tokens, generator)
        body_grads.append(grads[:, :, :, sink_tokens:].float().numpy())
        body_kv.append(_body_kv(kv, sink_tokens).float().numpy())                       # [2, L, H, T, D]
        keys = torch.stack([k[0] for k, _ in kv])                                       # [L, H, T, D]
        sink_sum += torch.nn.functional.normalize(keys[:, :, 0].double(), dim=-1)
        body_keys.append(keys[:, :, sink_tokens:].float().numpy())
        if progress:
            progress(f"passage {index + 1}/{len(passages)} ({time.perf_counter() - started:.0f} s)")
    sink_key = (sink_sum / len(passages)).float().numpy()  # mean of unit vectors: shorter if they disagree
    scores = np.stack([sink_scores(k, sink_key) for k in body_keys])              # [passages, body]
    fisher = np.stack([np.square(g).sum((0, 1, 2, 4), dtype=np.float64) for g in body_grads])  # per token
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
    matrix_sum = np.zeros((2, layers, heads, dim, dim))
    covariance_sum = np.zeros((2, layers, heads, dim, dim))
    kept = 0
    for p, grads in enumerate(body_grads):
        m, c, n = _weighted_sums(grads, body_kv[p], token_w[p], residual[p], trim)
        matrix_sum += m
        covariance_sum += c
        kept += n
    matrix = matrix_sum / (kept * continuation_tokens)      # full Fisher per head; its diagonal is F_c
    channel = np.diagonal(matrix, axis1=-2, axis2=-1)
    correlations, covariances = [_correlation(matrix)], [covariance_sum / kept]
    # the keys' Fisher matrix depends on where the queries sit (RoPE turns them with their absolute position):
    # passages of other context lengths give the basis the correlations of queries further on
    for length, group in (long_passages or {}).items():
        corr, cov = _long_context_matrices(model, group, length, continuation_tokens, sink_tokens, trim, generator,
                                           edges, profile, sink_key, s_edges, s_profile)
        correlations.append(corr)
        covariances.append(cov)
        if progress:
            progress(f"basis: {len(group)} passages of {length} tokens ({time.perf_counter() - started:.0f} s)")
    scale = np.sqrt(channel)
    mixed = np.mean(correlations, axis=0) * scale[..., :, None] * scale[..., None, :]
    basis, synthesis = fit_basis(mixed, np.mean(covariances, axis=0), basis_shrink)
    return SensitivityTable(
        model=fingerprint.to_dict(), kv_signature=fingerprint.kv_signature,
        key=channel[0].astype(np.float32), value=channel[1].astype(np.float32),
        distance_edges=edges, distance_profile=profile,
        sink_key=sink_key, score_edges=s_edges, score_profile=s_profile, basis=basis, synthesis=synthesis,
        meta={"source": source, "passages": len(passages), "context_tokens": context_tokens,
              "continuation_tokens": continuation_tokens, "sink_tokens": sink_tokens, "seed": seed, "trim": trim,
              "basis_shrink": basis_shrink,
              "basis_context_tokens": [context_tokens, *(long_passages or {})],
              "basis_passages": [len(passages), *(len(v) for v in (long_passages or {}).values())],
              "estimator": "squared gradient of log p(sampled continuation token) w.r.t. the KV, per "
                           "continuation token",
              "seconds": round(time.perf_counter() - started, 1)})


def _kv_and_gradients(model: Any, ids: torch.Tensor, context_tokens: int, continuation_tokens: int,
                      generator: torch.Generator) -> tuple[list, torch.Tensor]:
    """The context's KV and the gradient ``[2, L, H, T, D]`` of the log-likelihood of model-sampled
    continuation tokens with respect to it."""
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
    return kv, torch.stack([torch.stack([k.grad[0], v.grad[0]]) for k, v in leaves], 1)


def _body_kv(kv: list, sink_tokens: int) -> torch.Tensor:
    """Keys and values past the sink tokens, ``[2, L, H, T, D]``."""
    return torch.stack([torch.stack([k[0] for k, _ in kv]), torch.stack([v[0] for _, v in kv])])[:, :, :, sink_tokens:]


def _weighted_sums(grads: np.ndarray, body: np.ndarray, weight: np.ndarray, residual: np.ndarray,
                   trim: float) -> tuple[np.ndarray, np.ndarray, int]:
    """One passage's sums over its kept tokens (all but the `trim` fraction with the largest `residual`): the
    Fisher matrix per head of the gradients divided by the token weight, the covariance per head of the
    centred keys and values, and the number of tokens kept."""
    keep = residual <= np.quantile(residual, 1.0 - trim) if trim > 0 else np.ones(len(residual), bool)
    g = grads[:, :, :, keep].astype(np.float64) / np.sqrt(weight[keep])[:, None]
    x = body[:, :, :, keep].astype(np.float64)
    x -= x.mean(3, keepdims=True)
    return np.einsum("klhtd,klhte->klhde", g, g), np.einsum("klhtd,klhte->klhde", x, x), int(keep.sum())


def _correlation(matrix: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.maximum(np.diagonal(matrix, axis1=-2, axis2=-1), 1e-300))
    return matrix / d[..., :, None] / d[..., None, :]


def _long_context_matrices(model: Any, passages: list[torch.Tensor], context_tokens: int, continuation_tokens: int,
                           sink_tokens: int, trim: float, generator: torch.Generator, edges, profile, sink_key,
                           s_edges, s_profile) -> tuple[np.ndarray, np.ndarray]:
    """Fisher correlation matrices and data covariances per head from passages of `context_tokens`, with the
    token weights of the profiles already fitted; one passage at a time (long contexts' gradients are large)."""
    matrix_sum = covariance_sum = None
    kept = 0
    distance = np.arange(context_tokens - sink_tokens - 1, -1, -1)
    for ids in passages:
        kv, grads = _kv_and_gradients(model, ids, context_tokens, continuation_tokens, generator)
        g = grads[:, :, :, sink_tokens:].double().numpy()
        body = _body_kv(kv, sink_tokens).double().numpy()
        weight = binned(edges, profile, distance) * binned(s_edges, s_profile, sink_scores(body[0], sink_key))
        m, c, n = _weighted_sums(g, body, weight, np.square(g).sum((0, 1, 2, 4)) / weight, trim)
        matrix_sum = m if matrix_sum is None else matrix_sum + m
        covariance_sum = c if covariance_sum is None else covariance_sum + c
        kept += n
    return _correlation(matrix_sum), covariance_sum / kept


def calibrate_model(model: str = _CAL.model, *, split: str = _CAL.split, passages: int = _CAL.passages,
                    context_tokens: int = _CAL.context_tokens, continuation_tokens: int = _CAL.continuation_tokens,
                    trim: float = DEFAULT_TRIM, basis_shrink: float = _CAL.basis_shrink,
                    basis_long_tokens: tuple[int, ...] = _CAL.basis_long_tokens,
                    basis_long_passages: int = _CAL.basis_long_passages,
                    out_dir: Path | None = _CAL.out_dir,
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
    window = int(getattr(loaded.model.config, "max_position_embeddings", 0) or 0)
    long_passages = {}
    for length in basis_long_tokens:
        if basis_long_passages > 0 and length != context_tokens and (
                not window or length + continuation_tokens <= window):
            long_passages[length] = [p.token_ids for p in passages_from_text(
                read_text(source), loaded.tokenizer, basis_long_passages, length + continuation_tokens,
                source=str(source))]
    table = calibrate(loaded.model, [p.token_ids for p in found], name=loaded.name, context_tokens=context_tokens,
                      continuation_tokens=continuation_tokens, trim=trim, basis_shrink=basis_shrink,
                      long_passages=long_passages, source=f"{source.parent.name}/{source.name}", progress=note)
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
