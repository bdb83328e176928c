"""Codec experiments on SmolLM2 (issue 4): sensitivity (Fisher) calibration and simulated quantizers.

Quality is measured exactly as `kvcast eval codec` does (same passages, same continuation scoring); rates are
empirical entropies of the symbols plus an estimate of side information, checked later by the real codec.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvcast.codec.evaluate import (
    EvalSettings,
    QualitySums,
    continuation_logits,
    corpus_path,
    passages_from_text,
    read_text,
)
from kvcast.codec.hf import cache_from_kv, kv_from_cache
from kvcast.codec.model import load_smollm2

SINK = 4


def load_passages(split, count, tok, ctx=2048, cont=256):
    s = EvalSettings(split=split, passages=count)
    text = read_text(corpus_path(s))
    return passages_from_text(text, tok, count, ctx + cont + 1, source=split)


def exact_kv(model, ids, ctx=2048):
    with torch.inference_mode():
        return kv_from_cache(model(ids[:, :ctx], use_cache=True, logits_to_keep=1).cache)


def fisher(model, passages, ctx=2048, cont=256):
    """Mean squared gradient of the continuation's NLL (model-sampled targets) w.r.t. every KV entry."""
    acc_k = acc_v = None
    pos_k = pos_v = None
    for i, p in enumerate(passages):
        kv = exact_kv(model, p.token_ids, ctx)
        leaves = [(k.clone().requires_grad_(True), v.clone().requires_grad_(True)) for k, v in kv]
        cache = cache_from_kv(leaves, model.config, dtype=model.dtype)
        fed = p.token_ids[:, ctx:ctx + cont]
        with torch.enable_grad():
            logits = model(fed, cache=cache, use_cache=True).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            with torch.no_grad():
                y = torch.multinomial(logp.exp(), 1, generator=torch.Generator().manual_seed(i))
            loss = -logp.gather(-1, y).sum()
            loss.backward()
        gk = torch.stack([a.grad[0] for a, _ in leaves])  # [L, H, T, D]
        gv = torch.stack([b.grad[0] for _, b in leaves])
        sk, sv = (gk[:, :, SINK:] ** 2).sum(2), (gv[:, :, SINK:] ** 2).sum(2)  # [L,H,D] summed over tokens
        tk, tv = (gk ** 2).sum((0, 1, 3)), (gv ** 2).sum((0, 1, 3))  # per token
        acc_k = sk if acc_k is None else acc_k + sk
        acc_v = sv if acc_v is None else acc_v + sv
        pos_k = tk if pos_k is None else pos_k + tk
        pos_v = tv if pos_v is None else pos_v + tv
        print(f"fisher passage {i} loss/token {loss.item() / cont:.3f}", flush=True)
    n = len(passages) * (ctx - SINK) * cont
    return acc_k / n, acc_v / n, pos_k / len(passages), pos_v / len(passages)


# ------------------------------------------------------------------------------------------ simulation


def prepare(model, tok, split, count, out):
    path = out / f"{split}{count}.pt"
    if path.exists():
        return torch.load(path)
    items = []
    for p in load_passages(split, count, tok):
        kv = exact_kv(model, p.token_ids)
        fed = p.token_ids[:, 2048:2048 + 256]
        targets = p.token_ids[0, 2049:2048 + 257]
        exact = continuation_logits(model, kv, fed)
        items.append({"kv": kv, "fed": fed, "targets": targets, "exact": exact})
    torch.save(items, path)
    return items


def entropy_bits(q):
    """Empirical entropy (bits, total) of integer symbols in each row of q [rows, n]."""
    total = 0.0
    for row in q:
        _, counts = torch.unique(row, return_counts=True)
        p = counts.double() / row.numel()
        total += float(-(counts.double() * torch.log2(p)).sum())
    return total


def pooled_bits(q, classes):
    """Bits when rows sharing a class share one empirical distribution, + CDF side info (16 bits/symbol)."""
    total = 0.0
    for c in torch.unique(classes):
        rows = q[classes == c].flatten()
        vals, counts = torch.unique(rows, return_counts=True)
        p = counts.double() / rows.numel()
        total += float(-(counts.double() * torch.log2(p)).sum()) + 16 * (int(vals.max() - vals.min()) + 2)
    return total


def quantize_tensor(x, step, mean=True, weight=None):
    """x [H, T, D], step [H, D]: uniform grid per channel. Returns x_hat, symbols [H*D, T]."""
    mu = x.mean(1, keepdim=True) if mean else torch.zeros_like(x[:, :1])
    mu = mu.half().float()
    st = step.unsqueeze(1)
    if weight is not None:
        st = st / weight.sqrt().view(1, -1, 1)
    q = torch.round((x - mu) / st)
    xh = q * st + mu
    return xh, q.permute(0, 2, 1).reshape(-1, x.shape[1])


def recency(tokens, alpha, tau):
    d = torch.arange(tokens - 1, -1, -1, dtype=torch.float64)  # distance from the context's last token
    return ((1 + d / tau) ** -alpha).float()


def sim_level(kv, fk, fv, lam, sink=SINK, kscale=1.0, alpha=0.0, tau=16.0):
    out = []
    bits_c = bits_p = 0.0
    nvals = 0
    for layer, (k, v) in enumerate(kv):
        rec = []
        for x, f, s in ((k, fk[layer], kscale), (v, fv[layer], 1.0)):
            x = x[0].float()
            body = x[:, sink:]
            step = s * lam / f.clamp_min(1e-30).sqrt()
            r = recency(x.shape[1], alpha, tau)[sink:] if alpha else None
            xh, q = quantize_tensor(body, step, weight=r)
            bits_c += entropy_bits(q) + 40 * q.shape[0]
            sd = q.std(1).clamp_min(1e-3)
            classes = torch.round(torch.log2(sd) * 4)
            bits_p += pooled_bits(q, classes) + 40 * q.shape[0]
            full = torch.cat([x[:, :sink].half().float(), xh], 1)
            bits_c += 16 * x[:, :sink].numel()
            bits_p += 16 * x[:, :sink].numel()
            nvals += x.numel()
            rec.append(full.unsqueeze(0))
        out.append(tuple(rec))
    return out, bits_c / nvals, bits_p / nvals


def evaluate(model, items, fn):
    sums = QualitySums()
    rates = []
    for it in items:
        dec, *r = fn(it["kv"])
        rates.append(r)
        sums.add(it["exact"], continuation_logits(model, dec, it["fed"]), it["targets"])
    s = sums.summary()
    r = [sum(x[i] for x in rates) / len(rates) for i in range(len(rates[0]))]
    return r, s



def table_variant(table, profile: str):
    """The table with another distance profile: 'data' (as calibrated), 'flat', or 'pow:ALPHA:TAU'."""
    import numpy as np

    from kvcast.codec.sensitivity import SensitivityTable

    if profile == "data":
        return table
    edges = np.arange(0, 8193, dtype=np.float32)
    d = edges[:-1].astype(np.float64)
    if profile == "flat":
        prof = np.ones_like(d)
    else:
        _, alpha, tau = profile.split(":")
        prof = (1 + d / float(tau)) ** -float(alpha)
        prof = prof / prof[:2044].mean()
    return SensitivityTable(model=table.model, key=table.key, value=table.value, distance_edges=edges,
                            distance_profile=prof.astype(np.float32), meta=table.meta)


def real_eval(model, items, spec, table, fingerprint):
    from kvcast import codec as kvc
    sums = QualitySums()
    bits = []
    for it in items:
        data = kvc.encode(it["kv"], spec.name, model=fingerprint, sensitivity=table) if isinstance(spec, str) else \
            kvc.default_codec().encode(it["kv"], spec, model=fingerprint, sensitivity=table)
        dec = kvc.decode(data, dtype=torch.float32)
        info = kvc.inspect(data)
        bits.append((info["bits_per_value"], info["bits_per_value_payload"]))
        sums.add(it["exact"], continuation_logits(model, dec, it["fed"]), it["targets"])
    s = sums.summary()
    return {"bits": round(sum(b for b, _ in bits) / len(bits), 3),
            "payload": round(sum(p for _, p in bits) / len(bits), 3),
            "top1": round(s["top1_agreement"], 4), "kl": round(s["kl_per_token"], 5), "ppl": round(s["ppl_change"], 4)}


def run_real(a, model, tok, out):

    from kvcast.codec.levels import LevelSpec
    from kvcast.codec.sensitivity import SensitivityTable

    items = prepare(model, tok, a.split, a.count, out)
    fingerprint = load_fp(model)
    base = SensitivityTable.load(Path(a.table))
    table = table_variant(base, a.profile)
    for lam in a.lams:
        spec = LevelSpec("lab", "grid", coder="torchac", step=lam, recency=a.recency, sink_tokens=a.sink,
                         rounding=a.rounding)
        r = real_eval(model, items, spec, table, fingerprint)
        print(json.dumps({"split": a.split, "lam": lam, "recency": a.recency, "profile": a.profile,
                          "rounding": a.rounding, "sink": a.sink, **r}), flush=True)


def load_fp(model):
    from kvcast.codec.hf import fingerprint_from_config
    from kvcast.codec.model import SMOLLM2_NAME

    return fingerprint_from_config(model.config, name=SMOLLM2_NAME, dtype=model.dtype)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd")
    ap.add_argument("--passages", type=int, default=4)
    ap.add_argument("--out", default="/tmp/lab")
    ap.add_argument("--split", default="test")
    ap.add_argument("--count", type=int, default=6)
    ap.add_argument("--fisher", default="fisher4.pt")
    ap.add_argument("--kscale", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, default=0.0)
    ap.add_argument("--recency", type=float, default=1.0)
    ap.add_argument("--profile", default="data")
    ap.add_argument("--rounding", type=float, default=0.5)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--table", default="codec/tables/smollm2-135m-instruct.safetensors")
    ap.add_argument("--tau", type=float, default=16.0)
    ap.add_argument("--lams", type=float, nargs="*", default=[1e-3])
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_smollm2()
    model, tok = lm.model, lm.tokenizer
    if a.cmd == "fisher":
        ps = load_passages("valid", a.passages, tok)
        t = time.time()
        fk, fv, pk, pv = fisher(model, ps)
        torch.save({"fk": fk, "fv": fv, "pk": pk, "pv": pv}, out / f"fisher{a.passages}.pt")
        print("time", time.time() - t)
    elif a.cmd == "real":
        run_real(a, model, tok, out)
    elif a.cmd == "sim":
        items = prepare(model, tok, a.split, a.count, out)
        F = torch.load(out / a.fisher)
        for lam in a.lams:
            r, s = evaluate(model, items, lambda kv, lam=lam: sim_level(kv, F["fk"], F["fv"], lam, kscale=a.kscale,
                                                                               alpha=a.alpha, tau=a.tau))
            print(json.dumps({"lam": lam, "kscale": a.kscale, "alpha": a.alpha, "tau": a.tau,
                              "bits_chan": round(r[0], 3), "bits_pooled": round(r[1], 3),
                              "top1": round(s["top1_agreement"], 4), "kl": round(s["kl_per_token"], 5),
                              "ppl": round(s["ppl_change"], 4)}), flush=True)


if __name__ == "__main__":
    main()
