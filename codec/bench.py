"""`kvcast bench codec`: encode/decode speed per level, returned as a `kvcast.benchmark.result` dict.

Speed is quoted per object: Msymbols/s = KV values / second / 1e6, and MB/s of fp16 KV in (encode) and out
(decode). Times are medians over `repeats` runs, after one warm-up run that also starts the coder workers.
One row per level. torch is imported inside the functions; printing is the CLI's job (`kvcast.codec.cli`).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from kvcast.benchmark import result

__all__ = ["CodecBenchSettings", "bench_codec", "smollm2_kv", "synthetic_kv"]

SOURCES = ("synthetic", "smollm2")


@dataclass(frozen=True)
class CodecBenchSettings:
    """Inputs of `bench_codec`."""

    tokens: int = 2048
    """Tokens per object."""
    levels: tuple[str, ...] | None = None
    """Levels timed, in this order (None: every level of the codec)."""
    repeats: int = 5
    """Timed repetitions per level; the median is reported."""
    workers: int = 0
    """Coder processes (0: one per core)."""
    source: str = "synthetic"
    """``synthetic`` (SmolLM2-shaped random KV) or ``smollm2`` (the model's KV of WikiText-2 test)."""

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.repeats < 1 or self.workers < 0:
            raise ValueError("tokens and repeats must be >= 1, workers >= 0")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}")


def synthetic_kv(tokens: int, layers: int = 30, heads: int = 3, dim: int = 64, seed: int = 0):
    """SmolLM2-shaped fp16 KV with per-channel outliers in keys (random, not a model's)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    kv = []
    for _ in range(layers):
        k = torch.randn(1, heads, tokens, dim, generator=g) * (0.5 + 4 * torch.rand(1, heads, 1, dim, generator=g))
        v = torch.randn(1, heads, tokens, dim, generator=g)
        kv.append((k.half(), v.half()))
    return kv


def smollm2_kv(tokens: int):
    """fp16 KV of SmolLM2-135M over `tokens` tokens of WikiText-2, and the model's fingerprint (needs the
    model and ../shared/datasets)."""
    import torch

    from kvcast.codec.evaluate import EvalSettings, corpus_path, passages_from_text, read_text
    from kvcast.codec.hf import kv_from_cache
    from kvcast.codec.model import load_smollm2

    lm = load_smollm2(threads=os.cpu_count() or 1, progress=True)
    source = corpus_path(EvalSettings(split="test"))
    ids = passages_from_text(read_text(source), lm.tokenizer, 1, tokens, source=str(source))[0].token_ids
    with torch.no_grad():
        out = lm.model(ids, use_cache=True, logits_to_keep=1)
    return [(k.half(), v.half()) for k, v in kv_from_cache(out.cache)], lm.fingerprint(torch.float16)


def bench_codec(settings: CodecBenchSettings = CodecBenchSettings()) -> dict[str, Any]:
    """Encode and decode one `settings.tokens`-token object at every level; one row per level."""
    from kvcast import codec
    from kvcast.codec.api import Codec
    from kvcast.codec.pool import CoderPool
    from kvcast.codec.sensitivity import SensitivityTable

    tokens, repeats = settings.tokens, settings.repeats
    if settings.source == "smollm2":
        kv, model = smollm2_kv(tokens)
        table = None  # the shipped SmolLM2 table, found by the fingerprint
    else:
        kv, model = synthetic_kv(tokens), None
        table = SensitivityTable.uniform(len(kv), kv[0][0].shape[1], kv[0][0].shape[3])
    names = list(settings.levels) if settings.levels else codec.levels()
    unknown = [n for n in names if n not in codec.levels()]
    if unknown:
        raise ValueError(f"unknown level(s) {', '.join(unknown)}; the codec has {', '.join(codec.levels())}")
    values = 2 * len(kv) * kv[0][0].shape[1] * tokens * kv[0][0].shape[3]
    rows = []
    with CoderPool(workers=settings.workers or None) as pool:
        c = Codec(pool=pool)
        pool.warm_up()
        for name in names:
            data = c.encode(kv, name, model=model, sensitivity=table)
            c.decode(data, sensitivity=table)
            enc, dec = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                data = c.encode(kv, name, model=model, sensitivity=table)
                t1 = time.perf_counter()
                c.decode(data, sensitivity=table)
                t2 = time.perf_counter()
                enc.append(t1 - t0)
                dec.append(t2 - t1)
            te, td = statistics.median(enc), statistics.median(dec)
            info = c.inspect(data)
            rows.append({"level": name, "bits_per_value": info["bits_per_value"],
                         "encode_s": te, "decode_s": td,
                         "encode_msym_per_s": values / te / 1e6, "decode_msym_per_s": values / td / 1e6,
                         "encode_mb_per_s_fp16": 2 * values / te / 1e6, "decode_mb_per_s_fp16": 2 * values / td / 1e6})
        workers = pool.workers
    summary = {"values": values, "layers": len(kv), "kv_heads": kv[0][0].shape[1],
               "head_dim": kv[0][0].shape[3], "workers": workers, "levels": len(rows)}
    return result("codec", asdict(settings), rows, summary)
