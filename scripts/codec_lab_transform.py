"""Codec experiment: per-head sensitivity transforms (full Fisher matrices instead of per-channel weights).

``fisher``: per (K/V, layer, KV head) the 64x64 matrix ``E[g g^T / w_t]`` of the continuation's gradients (model-
sampled targets, as `kvcast calibrate`), ``w_t`` the table's token weight, and the data covariance.
``sim``: simulated grid quantizer in a transformed basis ``y = A (x - mu)``, uniform step ``lambda * m_t``,
empirical-entropy rates with class-pooled CDFs; quality as `kvcast eval codec` measures it.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import codec_lab as lab
import numpy as np
import torch

from kvcast.codec.grid import token_multipliers
from kvcast.codec.hf import cache_from_kv
from kvcast.codec.model import load_smollm2
from kvcast.codec.sensitivity import TableRegistry

SINK = 4


def token_weights(table, keys: np.ndarray, tokens: int) -> np.ndarray:
    distance = np.arange(tokens - 1, -1, -1)
    return table.distance_weight(distance) * table.score_weight(table.sink_scores(keys))


def fisher_matrices(model, table, passages, ctx=2048, cont=256, trim=0.01):
    S = None
    C = None
    n = 0
    for i, p in enumerate(passages):
        t0 = time.time()
        kv = lab.exact_kv(model, p.token_ids, ctx)
        keys = torch.stack([k[0] for k, _ in kv]).float().numpy()
        w = torch.from_numpy(token_weights(table, keys, ctx)).float()
        leaves = [(k.clone().requires_grad_(True), v.clone().requires_grad_(True)) for k, v in kv]
        cache = cache_from_kv(leaves, model.config, dtype=model.dtype)
        fed = p.token_ids[:, ctx:ctx + cont]
        with torch.enable_grad():
            logp = torch.log_softmax(model(fed, cache=cache, use_cache=True).logits[0].float(), -1)
            y = torch.multinomial(logp.detach().exp(), 1, generator=torch.Generator().manual_seed(i))
            logp.gather(-1, y).sum().backward()
        g = torch.stack([torch.stack([a.grad[0] for a, _ in leaves]), torch.stack([b.grad[0] for _, b in leaves])])
        g = g[:, :, :, SINK:].double() / w[SINK:].double().sqrt().view(1, 1, 1, -1, 1)   # [2, L, H, T, D]
        x = torch.stack([torch.stack([a[0] for a, _ in kv]), torch.stack([b[0] for _, b in kv])])
        x = x[:, :, :, SINK:].double()
        # trim: leave out the tokens with the largest normalized Fisher (summed over everything)
        per_token = (g ** 2).sum((0, 1, 2, 4))
        keep = per_token <= torch.quantile(per_token, 1 - trim) if trim else torch.ones_like(per_token, dtype=bool)
        g, xk = g[:, :, :, keep], x[:, :, :, keep]
        s = torch.einsum("ilhtd,ilhte->ilhde", g, g)
        xc = xk - xk.mean(3, keepdim=True)
        c = torch.einsum("ilhtd,ilhte->ilhde", xc, xc)
        S = s if S is None else S + s
        C = c if C is None else C + c
        n += int(keep.sum())
        print(f"passage {i}: {time.time() - t0:.1f}s", flush=True)
    return S / n, C / n


def gains(S, C):
    """High-rate coding gains (bits per value) of decorrelating the sensitivity and the (weighted) data."""
    out = {}
    for i, name in enumerate(("key", "value")):
        sens, data = [], []
        for layer in range(S.shape[1]):
            for h in range(S.shape[2]):
                s, c = S[i, layer, h], C[i, layer, h]
                d = torch.diagonal(s)
                sens.append(0.5 * float((torch.log2(d).sum() - torch.logdet(s) / math.log(2)) / s.shape[0]))
                # data decorrelation in the sensitivity-whitened domain
                ev, U = torch.linalg.eigh(s)
                A = (U * ev.clamp_min(1e-30).sqrt()).T
                cy = A @ c @ A.T
                data.append(0.5 * float((torch.log2(torch.diagonal(cy)).sum() - torch.logdet(cy) / math.log(2))
                                        / s.shape[0]))
        out[name] = {"sensitivity_bits": round(float(np.mean(sens)), 3), "data_bits": round(float(np.mean(data)), 3),
                     "sens_by_layer": [round(x, 2) for x in np.mean(np.array(sens).reshape(-1, S.shape[2]), 1)]}
    return out


def transforms(S, C, mode: str, shrink: float):
    """A [2, L, H, D, D] with y = A x: 'diag' (per-channel sqrt F), 'sens' (S^1/2 eigenbasis), 'sens+pca'."""
    D = S.shape[-1]
    A = torch.zeros_like(S)
    for idx in np.ndindex(*S.shape[:3]):
        s = S[idx]
        d = torch.diagonal(s)
        if mode == "diag":
            A[idx] = torch.diag(d.sqrt())
            continue
        s = (1 - shrink) * s + shrink * torch.diag(d)
        ev, U = torch.linalg.eigh(s)
        a = (U * ev.clamp_min(d.max() * 1e-8).sqrt()).T
        if mode == "sens+pca":
            cy = a @ C[idx] @ a.T
            _, V = torch.linalg.eigh(cy)
            a = V.T @ a
        A[idx] = a
    assert A.shape[-1] == D
    return A.float()


def sim(kv, A, lam, mult, sink=SINK):
    out, bits, nvals = [], 0.0, 0
    for layer, pair in enumerate(kv):
        rec = []
        for i, x in enumerate(pair):
            x = x[0].float()                        # [H, T, D]
            body = x[:, sink:]
            mu = body.mean(1, keepdim=True).half().float()
            a = A[i, layer]                          # [H, D, D]
            y = torch.einsum("hde,hte->htd", a, body - mu)
            st = lam * mult[sink:].float().view(1, -1, 1)
            q = torch.round(y / st)
            yh = q * st
            xh = torch.einsum("hde,hte->htd", torch.linalg.inv(a), yh) + mu
            qq = q.permute(0, 2, 1).reshape(-1, body.shape[1])
            sd = qq.std(1).clamp_min(0.05)
            classes = torch.round(torch.log2(sd) * 2)
            bits += lab.pooled_bits(qq, classes) + 32 * qq.shape[0] + 16 * x[:, :sink].numel()
            nvals += x.numel()
            rec.append(torch.cat([x[:, :sink].half().float(), xh], 1).unsqueeze(0))
        out.append(tuple(rec))
    return out, bits / nvals


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd")
    ap.add_argument("--out", default="/tmp/lab")
    ap.add_argument("--passages", type=int, default=8)
    ap.add_argument("--split", default="test")
    ap.add_argument("--count", type=int, default=6)
    ap.add_argument("--mode", default="sens")
    ap.add_argument("--shrink", type=float, default=0.0)
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--trim", type=float, default=0.01)
    ap.add_argument("--lams", type=float, nargs="*", default=[3.5e-5])
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_smollm2()
    model, tok = lm.model, lm.tokenizer
    from kvcast.codec.calibrate import table_filename  # noqa: F401
    table = TableRegistry().tables()[0]
    fpath = out / f"fullfisher{a.passages}_t{a.trim}.pt"
    if a.cmd == "fisher":
        ps = lab.load_passages("valid", a.passages, tok)
        S, C = fisher_matrices(model, table, ps, trim=a.trim)
        torch.save({"S": S, "C": C}, fpath)
        print(json.dumps(gains(S, C)))
        return
    F = torch.load(fpath)
    S, C = F["S"], F["C"]
    A = transforms(S, C, a.mode, a.shrink)
    items = lab.prepare(model, tok, a.split, a.count, out)
    for lam in a.lams:
        def fn(kv, lam=lam):
            keys = torch.stack([k[0] for k, _ in kv]).float().numpy()
            mult = token_multipliers(table, 0, keys.shape[2], keys.shape[2], a.strength, keys)
            return sim(kv, A, lam, mult)
        r, s = lab.evaluate(model, items, fn)
        print(json.dumps({"mode": a.mode, "shrink": a.shrink, "lam": lam, "strength": a.strength,
                          "bits": round(r[0], 3),
                          "top1": round(s["top1_agreement"], 4), "kl": round(s["kl_per_token"], 5),
                          "ppl": round(s["ppl_change"], 4)}), flush=True)


if __name__ == "__main__":
    main()
