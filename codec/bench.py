"""`kvcast bench codec`: encode/decode speed per level, as JSON and a table.

Speed is quoted per object: Msymbols/s = KV values / second / 1e6, and MB/s of fp16 KV in (encode) and out
(decode). Times are medians over `repeats` runs, after one warm-up run that also starts the coder workers.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch


def synthetic_kv(tokens: int, layers: int = 30, heads: int = 3, dim: int = 64, seed: int = 0):
    """SmolLM2-shaped fp16 KV with per-channel outliers in keys (random, not a model's)."""
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
    from kvcast.codec.evaluate import EvalSettings, corpus_path, passages_from_text, read_text
    from kvcast.codec.hf import kv_from_cache
    from kvcast.codec.model import load_smollm2

    lm = load_smollm2(threads=os.cpu_count() or 1, progress=True)
    source = corpus_path(EvalSettings(split="test"))
    ids = passages_from_text(read_text(source), lm.tokenizer, 1, tokens, source=str(source))[0].token_ids
    with torch.no_grad():
        out = lm.model(ids, use_cache=True, logits_to_keep=1)
    return [(k.half(), v.half()) for k, v in kv_from_cache(out.past_key_values)], lm.fingerprint(torch.float16)


def run_codec_bench(*, tokens: int = 2048, levels: str = "", repeats: int = 5, workers: int = 0,
                    source: str = "synthetic", out: Path | None = None) -> dict:
    from rich.console import Console
    from rich.table import Table

    from kvcast import codec
    from kvcast.codec.api import Codec
    from kvcast.codec.entropy import CoderPool
    from kvcast.codec.sensitivity import SensitivityTable

    if source == "smollm2":
        kv, model = smollm2_kv(tokens)
        table = None  # the shipped SmolLM2 table, found by the fingerprint
    else:
        kv, model = synthetic_kv(tokens), None
        table = SensitivityTable.uniform(len(kv), kv[0][0].shape[1], kv[0][0].shape[3])
    names = [n.strip() for n in levels.split(",") if n.strip()] or codec.levels()
    values = 2 * len(kv) * kv[0][0].shape[1] * tokens * kv[0][0].shape[3]
    rows = []
    with CoderPool(workers=workers or None) as pool:
        c = Codec(pool=pool)
        pool.warm_up()
        for name in names:
            data = c.encode(kv, name, model=model, sensitivity=table)
            c.decode(data)
            enc, dec = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                data = c.encode(kv, name, model=model, sensitivity=table)
                t1 = time.perf_counter()
                c.decode(data)
                t2 = time.perf_counter()
                enc.append(t1 - t0)
                dec.append(t2 - t1)
            te, td = statistics.median(enc), statistics.median(dec)
            info = c.inspect(data)
            rows.append({"level": name, "bits_per_value": info["bits_per_value"],
                         "encode_s": te, "decode_s": td,
                         "encode_msym_per_s": values / te / 1e6, "decode_msym_per_s": values / td / 1e6,
                         "encode_mb_per_s_fp16": 2 * values / te / 1e6, "decode_mb_per_s_fp16": 2 * values / td / 1e6})
        result = {"source": source, "tokens": tokens, "values": values, "workers": pool.workers,
                  "repeats": repeats, "cpu_count": os.cpu_count(), "levels": rows}
    table = Table(title=f"codec speed: {tokens}-token object, {values / 1e6:.1f} M values, {result['workers']} workers")
    for col in ("level", "bits/value", "enc Msym/s", "dec Msym/s", "enc MB/s", "dec MB/s"):
        table.add_column(col, justify="right" if col != "level" else "left")
    for r in rows:
        table.add_row(r["level"], f"{r['bits_per_value']:.3f}", f"{r['encode_msym_per_s']:.1f}",
                      f"{r['decode_msym_per_s']:.1f}", f"{r['encode_mb_per_s_fp16']:.0f}",
                      f"{r['decode_mb_per_s_fp16']:.0f}")
    print(json.dumps(result, indent=2))
    Console().print(table)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
    return result
