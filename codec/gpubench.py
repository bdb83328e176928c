"""`kvcast bench gpu`: the CUDA decoder built, checked bit-exact against the CPU decoder, timed, and fuzzed.

What one run measures (device-side timings: CUDA events, medians of `repeats` after `warmup` runs):

* **copy floor**: a device-to-device copy of 2 GiB, bytes read plus written per second;
* **check**: objects made on the CPU (`check_dir`: SmolLM2 objects carried to the GPU host, with the digests
  of their CPU decoding) and random KV encoded here, decoded on the GPU, compared for equality;
* **decode**: every format-2 level on Mistral-7B-shaped contexts (32 layers x 8 KV heads x 128) of
  `contexts` tokens, as batches of `object_tokens`-token objects (one launch per batch); GB/s of fp16 output
  and the ratio to the copy floor; the time to send the same compressed bytes at 10 Gbps;
* **encode**: the CUDA rANS encoder (`kvcast.codec.gpu.encode_streams_cuda`) on the same contexts' symbols
  (quantized on the CPU), bytes compared with the CPU coder's; GB/s of fp16-equivalent input. This is the
  entropy-coding stage; quantization stays on the CPU;
* **baseline**: a kernel of the anchor's structure (CacheGen/LMCache's torchac_cuda: one launch per 256-token
  object, one thread per (layer, channel) stream, a binary search of the CDF per symbol, bytes read one at a
  time) on the same contexts' cachegen-3 symbols, written here and timed in the same run;
* **end to end** (`e2e`: a folder from ``scripts/gpu_e2e_carry.py``): SmolLM2 in fp16 on the GPU continues a
  1,024-token context from objects made on the CPU and decoded on the GPU, and from the same objects decoded
  on the CPU: the caches must be equal and the generated tokens the same (agreement with the exact fp16
  cache is reported too);
* **fuzz**: `fuzz` corrupted or truncated objects (checksum recomputed, so the decoder's own checks are what
  stands) decoded on the GPU: how many raise `CodecError`, how many decode (corruption that only touches raw
  low bits or escaped values, which no entropy decoder can see: the object's CRC32C catches those).

The KV is SmolLM2's real KV (`kv_file`, 512 tokens) tiled to Mistral's shape, with the SmolLM2 sensitivity
table mapped the same way; without `kv_file`, SmolLM2-shaped synthetic KV is tiled instead.
Run it as ``python -m kvcast.codec.gpubench`` on a GPU host (``scripts/gpu_bench.sh`` does it on the device
machine); torch is imported inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvcast.benchmark import result

MISTRAL = {"layers": 32, "kv_heads": 8, "head_dim": 128}


@dataclass(frozen=True)
class GpuBenchSettings:
    contexts: tuple[int, ...] = (2048, 8192, 32768)
    object_tokens: int = 2048
    levels: tuple[str, ...] | None = None
    repeats: int = 20
    warmup: int = 3
    kv_file: str | None = None
    check_dir: str | None = None
    fuzz: int = 10000
    no_timing: bool = False
    e2e: str | None = None


def _events_ms(fn, warmup: int, repeats: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_floor_gbs(warmup: int, repeats: int) -> float:
    import torch

    a = torch.empty(1 << 30, dtype=torch.int16, device="cuda").random_()
    b = torch.empty_like(a)
    ms = _events_ms(lambda: b.copy_(a), warmup, repeats)
    return 2 * a.numel() * 2 / ms / 1e6


def mistral_source(kv_file: str | None):
    """(SmolLM2 KV [2, 30, 3, T, 64] fp16, SmolLM2 sensitivity table)."""
    import torch

    from kvcast.codec.bench import synthetic_kv
    from kvcast.codec.fingerprint import ModelFingerprint
    from kvcast.codec.sensitivity import TableRegistry

    if kv_file:
        from safetensors.torch import load_file

        t = load_file(kv_file)
        kv = torch.stack([t["key"], t["value"]])
    else:
        pairs = synthetic_kv(512)
        kv = torch.stack([torch.stack([k[0] for k, _ in pairs]), torch.stack([v[0] for _, v in pairs])])
    table = TableRegistry().find(ModelFingerprint("SmolLM2-135M-Instruct", 30, 3, 64, "float16"))
    return kv, table


def mistral_kv(source, tokens: int, seed: int):
    """Mistral-shaped fp16 KV: SmolLM2's channels, heads, layers and tokens tiled, with a little noise."""
    import torch

    layers, heads, dim = MISTRAL["layers"], MISTRAL["kv_heads"], MISTRAL["head_dim"]
    s_layers, s_heads, s_tokens, s_dim = source.shape[1], source.shape[2], source.shape[3], source.shape[4]
    li = torch.arange(layers) * s_layers // layers
    hi = torch.arange(heads) % s_heads
    ti = (torch.arange(tokens) + 97 * seed) % s_tokens
    di = torch.arange(dim) % s_dim
    x = source[:, li][:, :, hi][:, :, :, ti][:, :, :, :, di].to(torch.float32)
    g = torch.Generator().manual_seed(seed)
    x = x * (1 + 0.05 * torch.randn(x.shape, generator=g))
    x = x.to(torch.float16)
    return [(x[0, i].unsqueeze(0).contiguous(), x[1, i].unsqueeze(0).contiguous()) for i in range(layers)]


def mistral_table(table):
    import numpy as np

    from kvcast.codec.sensitivity import SensitivityTable

    layers, heads, dim = MISTRAL["layers"], MISTRAL["kv_heads"], MISTRAL["head_dim"]
    li = np.arange(layers) * table.key.shape[0] // layers
    hi = np.arange(heads) % table.key.shape[1]
    di = np.arange(dim) % table.key.shape[2]

    def m(a):
        return None if a is None else np.ascontiguousarray(a[li][:, hi][:, :, di])

    return SensitivityTable(
        model={"name": "mistral-shaped", **MISTRAL}, key=m(table.key), value=m(table.value),
        distance_edges=table.distance_edges, distance_profile=table.distance_profile,
        sink_key=m(getattr(table, "sink_key", None)), score_edges=getattr(table, "score_edges", None),
        score_profile=getattr(table, "score_profile", None))


def digest(kv) -> str:
    """SHA-256 of a KV list's bytes (any dtype), K then V per layer."""
    import torch

    return hashlib.sha256(b"".join(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                                   for pair in kv for t in pair)).hexdigest()


def small_kv(layers: int, heads: int, tokens: int, dim: int, dtype, seed: int):
    """Random KV with per-channel scales and a far outlier (escapes), for bit-exactness checks."""
    import torch

    g = torch.Generator().manual_seed(seed)
    kv = []
    for _ in range(layers):
        pair = []
        for _ in range(2):
            t = torch.randn(1, heads, tokens, dim, generator=g) * (0.05 + 2 * torch.rand(1, heads, 1, dim, generator=g))
            pair.append(t.to(dtype))
        kv.append(tuple(pair))
    kv[-1][0][0, 0, tokens // 2, 1] = 300.0
    return kv


def check_rows(check_dir: str | None, levels: list[str], log) -> list[dict[str, Any]]:
    """GPU vs CPU decoding: carried CPU-made objects (by digest), and random KV encoded here with the
    built-in levels and with many-lane variants (`lane_symbols` 64), in three output dtypes."""
    import dataclasses

    import torch

    from kvcast.codec.api import Codec
    from kvcast.codec.gpu import decode_batch
    from kvcast.codec.levels import LevelRegistry
    from kvcast.codec.sensitivity import SensitivityTable

    rows = []
    if check_dir and (Path(check_dir) / "digests.json").exists():
        expected = json.loads((Path(check_dir) / "digests.json").read_text())
        for name, info in expected.items():
            data = (Path(check_dir) / name).read_bytes()
            for dname, want in info["digests"].items():
                got = digest(decode_batch([data], "cuda", getattr(torch, dname))[0])
                rows.append({"check": "carried", "object": name, "dtype": dname, "equal": got == want})
        log(f"carried objects: {sum(r['equal'] for r in rows)}/{len(rows)} equal")
    base = LevelRegistry.default()
    many = LevelRegistry()
    for name in levels:
        many.add(dataclasses.replace(base.get(name), lane_symbols=64))
    for label, registry in (("built-in", base), ("lane_symbols=64", many)):
        codec = Codec(registry)
        for seed, (layers, heads, tokens, dim) in enumerate([(2, 3, 700, 16), (3, 2, 1500, 32)]):
            table = SensitivityTable.uniform(layers, heads, dim, fisher=1e-3)
            kv = small_kv(layers, heads, tokens, dim, torch.float16, seed)
            for name in levels:
                kw = {"sensitivity": table} if registry.get(name).quantizer == "grid" else {}
                objs = [codec.encode(kv, name, token_start=seed, **kw),
                        codec.encode(small_kv(layers, heads, tokens, dim, torch.float16, seed + 10), name,
                                     token_start=seed, **kw)]
                for dtype in (torch.float16, torch.bfloat16, torch.float32):
                    gpu = decode_batch(objs, "cuda", dtype)
                    equal = all(torch.equal(a.cpu(), b) for o, kvg in zip(objs, gpu)
                                for p, q in zip(kvg, codec.decode(o, dtype=dtype)) for a, b in zip(p, q))
                    rows.append({"check": f"random {label}", "object": f"{name} {layers}x{heads}x{tokens}x{dim}",
                                 "dtype": str(dtype).removeprefix("torch."), "equal": equal})
    log(f"all checks: {sum(r['equal'] for r in rows)}/{len(rows)} equal")
    for r in [r for r in rows if not r["equal"]][:12]:
        log(f"  NOT EQUAL: {r}")
    return rows


def plan_geometry(plan):
    """The coder's `StreamGeometry` of a GPU plan's streams (symbols back to back in stream order)."""
    import numpy as np

    from kvcast.codec.rans import StreamGeometry

    st = plan.streams
    start = np.concatenate([[0], np.cumsum(st["count"].astype(np.int64))])
    return StreamGeometry(start, st["lanes"], st["row0"], st["period"])


def plan_symbols(plan):
    """Every stream's symbols of `plan` (the CPU coder decodes them), their geometry and their expected bytes."""
    from kvcast.codec.rans import decode_streams

    st = plan.streams
    geometry = plan_geometry(plan)
    symbols = decode_streams(plan.payload, geometry, plan.cum, plan.nsym, st["rans_begin"], st["rans_end"])
    expected = b"".join(plan.payload[b:e].tobytes() for b, e in zip(st["rans_begin"], st["rans_end"]))
    return symbols, geometry, expected


def _greedy(model, cache, suffix, steps: int) -> list[int]:
    """Greedy continuation: `suffix` (ids, on the model's device) fed over `cache`, then `steps` tokens."""
    import torch

    tokens: list[int] = []
    with torch.no_grad():
        out = model(suffix, past_key_values=cache, use_cache=True)
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            tokens.append(int(nxt))
            cache = getattr(out, "cache", None) or out.past_key_values
            out = model(nxt, past_key_values=cache, use_cache=True)
    return tokens


def e2e_rows(folder: str, log, steps: int = 32) -> list[dict[str, Any]]:
    """SmolLM2 (fp16, on the GPU) continues the carried context from GPU- and CPU-decoded objects."""
    import torch

    from kvcast.codec.api import Codec
    from kvcast.codec.hf import cache_from_kv, kv_from_cache
    from kvcast.codec.model import load_smollm2

    spec = json.loads((Path(folder) / "ids.json").read_text())
    lm = load_smollm2(progress=False)
    model = lm.model.to(device="cuda", dtype=torch.float16).eval()
    ids = torch.tensor([spec["context"]], device="cuda")
    suffix = torch.tensor([spec["suffix"]], device="cuda")
    with torch.no_grad():
        out = model(ids, use_cache=True)
    exact_kv = [(k.clone(), v.clone()) for k, v in kv_from_cache(getattr(out, "cache", None) or out.past_key_values)]
    exact = _greedy(model, cache_from_kv(exact_kv, model.config), suffix, steps)
    log(f"e2e: exact fp16 cache continues with {exact[:8]}...")
    cpu, rows = Codec(), []
    for level in spec["levels"]:
        blobs = [(Path(folder) / f"{level}-{part}.kvc").read_bytes() for part in ("a", "b")]

        def joined(parts):
            return [(torch.cat([p[layer][0] for p in parts], 2), torch.cat([p[layer][1] for p in parts], 2))
                    for layer in range(len(parts[0]))]

        on_cpu = joined([cpu.decode(b, dtype=torch.float16) for b in blobs])
        torch.cuda.synchronize()
        t = time.perf_counter()
        on_gpu = joined([cpu.decode(b, device="cuda", dtype=torch.float16) for b in blobs])
        torch.cuda.synchronize()
        gpu_s = time.perf_counter() - t
        equal = all(torch.equal(a.cuda(), g) and torch.equal(b.cuda(), h) for (a, b), (g, h) in zip(on_cpu, on_gpu))
        from_gpu = _greedy(model, cache_from_kv(on_gpu, model.config), suffix, steps)
        from_cpu = _greedy(model, cache_from_kv([(k.cuda(), v.cuda()) for k, v in on_cpu], model.config), suffix,
                           steps)
        agree = sum(a == b for a, b in zip(from_gpu, exact)) / steps
        rows.append({"level": level, "context_tokens": len(spec["context"]), "cache_equal": equal,
                     "same_tokens_gpu_vs_cpu_decoded": from_gpu == from_cpu, "tokens": steps,
                     "agreement_with_exact_fp16": agree, "gpu_decode_wall_s": gpu_s})
        log(f"e2e {level:12s}: GPU cache == CPU cache: {equal}; same {steps} tokens: {from_gpu == from_cpu}; "
            f"agreement with the exact cache {agree:.0%}")
    return rows


def baseline_data(kv, object_tokens: int):
    """cachegen-3 symbols of `kv` as single-lane streams of 256 symbols, one per (256-token block, K/V,
    layer, channel): the anchor's layout. Returns (payload, begin, cum, nsym, row, symbols, streams per launch)."""
    import numpy as np
    import torch

    from kvcast.codec.api import stack_kv
    from kvcast.codec.pipeline import quantize_absmax
    from kvcast.codec.rangecoder import cachegen_cdf
    from kvcast.codec.rans import StreamGeometry, cum_tables, encode_streams

    x, _ = stack_kv(kv)                                     # [2, L, T, C]
    two, layers, tokens, channels = x.shape
    q, _ = quantize_absmax(x, 15.0)                         # 32 bins: symbols 0..30
    q = q.view(2 * layers, tokens, channels)
    idx = q.to(torch.int64) + torch.arange(channels) * 31
    cdfs = [cachegen_cdf(torch.bincount(idx[g].reshape(-1), minlength=channels * 31).view(channels, 31)).numpy()
            for g in range(2 * layers)]
    blocks = tokens // 256
    sym = q.view(2 * layers, blocks, 256, channels).permute(1, 0, 3, 2).contiguous().numpy().reshape(-1)
    streams = blocks * 2 * layers * channels
    row = np.tile(np.arange(2 * layers * channels, dtype=np.int32), blocks)
    geometry = StreamGeometry.of(counts=np.full(streams, 256), row0=row, period=np.ones(streams, np.int32),
                                 lane_symbols=1 << 30, max_lanes=1)
    cum, nsym = cum_tables(cdfs)
    data, lengths = encode_streams(sym.astype(np.int16), geometry, cum, nsym)
    begin = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return np.frombuffer(data, np.uint8), begin, cum, nsym, row, sym.astype(np.uint8), 2 * layers * channels


def _compare(gpu, cpu) -> str:
    """How a GPU decoding compares with the CPU's (None: the CPU refused the object): bit for bit, equal but
    for the bits of NaNs (a NaN escape value or scale), or unlike."""
    import torch

    if cpu is None:
        return "decoded_but_cpu_refuses"
    pairs = [(a.cpu(), b) for p, q in zip(gpu, cpu) for a, b in zip(p, q)]
    if all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in pairs):
        return "decoded_equal_to_cpu"
    if all(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)) for a, b in pairs):
        return "decoded_equal_but_nan_bits"
    return "decoded_unlike_cpu"


def fuzz_rows(objects: list[bytes], n: int, seed: int, log) -> dict[str, Any]:
    """Corrupt (checksum recomputed) or truncate objects and decode them on the GPU."""
    import random

    import crc32c

    from kvcast import codec
    from kvcast.codec.errors import CodecError
    from kvcast.codec.gpu import decode_batch

    rng = random.Random(seed)
    counts = {"codec_error": 0, "decoded": 0, "other_error": 0, "decoded_equal_to_cpu": 0,
              "decoded_equal_but_nan_bits": 0, "decoded_unlike_cpu": 0, "decoded_but_cpu_refuses": 0,
              "refused_but_cpu_decodes": 0}
    kinds = {"flip_payload": 0, "flip_body": 0, "truncate": 0}
    others = []
    for i in range(n):
        data = bytearray(rng.choice(objects))
        kind = rng.choice(list(kinds))
        kinds[kind] += 1
        hlen = int.from_bytes(data[12:16], "little")
        body = 24 + hlen
        if kind == "truncate":
            data = data[:rng.randrange(len(data))]
        else:
            lo = body if kind == "flip_body" else max(body, len(data) - 4 - rng.randrange(1, max(2, len(data) // 3)))
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(lo, len(data) - 4)] ^= rng.randrange(1, 256)
            data[-4:] = crc32c.crc32c(bytes(data[:-4])).to_bytes(4, "little")
        try:
            cpu = codec.decode(bytes(data))
        except CodecError:
            cpu = None
        try:
            gpu = decode_batch([bytes(data)], "cuda")[0]
            counts["decoded"] += 1
            counts[_compare(gpu, cpu)] += 1
        except CodecError:
            counts["codec_error"] += 1
            if cpu is not None:
                counts["refused_but_cpu_decodes"] += 1
        except Exception as exc:  # anything else is a bug: counted and shown
            counts["other_error"] += 1
            others.append(f"{type(exc).__name__}: {exc}"[:200])
        if (i + 1) % 2000 == 0:
            log(f"fuzz {i + 1}/{n}: {counts}")
    return {"objects": n, **counts, "kinds": kinds, "other_errors": others[:5]}


def run_gpu_bench(s: GpuBenchSettings, log=print) -> dict[str, Any]:
    import numpy as np
    import torch

    from kvcast import codec as kvcodec
    from kvcast.codec.api import Codec
    from kvcast.codec.gpu import (
        cuda_backend,
        decode_plan_cuda,
        encode_streams_cuda,
        encode_tables,
        plan_batch,
        raise_device_error,
        upload_plan,
    )
    from kvcast.codec.sensitivity import SensitivityTable

    if not torch.cuda.is_available():
        raise kvcodec.CodecError("kvcast bench gpu needs a CUDA device")
    t0 = time.perf_counter()
    backend = cuda_backend()
    build_s = time.perf_counter() - t0
    device = torch.cuda.get_device_name()
    log(f"{device}: CUDA extension ready in {build_s:.1f} s")
    # the basis levels run the grid kernel, then a matrix product per head (scripts/gpu_basis_check.py checks
    # and times them on SmolLM2's own table; the Mistral-shaped timing KV here has no basis)
    levels = list(s.levels or [lv for lv in kvcodec.levels()
                               if kvcodec.describe(lv)["coder"] == "rans" and not kvcodec.describe(lv).get("basis")])
    summary: dict[str, Any] = {"device": device, "build_s": build_s}
    rows: list[dict[str, Any]] = []
    uniform = SensitivityTable.uniform(2, 3, 16, fisher=1e-3)
    small_objects = [kvcodec.encode(small_kv(2, 3, 200, 16, torch.float16, i), lv, **(
        {"sensitivity": uniform} if kvcodec.describe(lv)["quantizer"] == "grid" else {}))
        for i, lv in enumerate(levels)]
    if not s.no_timing:
        floor = copy_floor_gbs(s.warmup, s.repeats)
        summary["copy_floor_gbs"] = floor
        log(f"copy floor: {floor:.0f} GB/s")
        checks = check_rows(s.check_dir, levels, log)
        summary["checks"] = {"total": len(checks), "equal": sum(r["equal"] for r in checks),
                             "failed": [r for r in checks if not r["equal"]][:10]}
        source, table = mistral_source(s.kv_file)
        mtable = mistral_table(table)
        cpu = Codec()
        kvs = [mistral_kv(source, s.object_tokens, seed) for seed in range(2)]
        for level in levels:
            kw = {"sensitivity": mtable} if kvcodec.describe(level)["quantizer"] == "grid" else {}
            t = time.perf_counter()
            objs = [cpu.encode(kv, level, **kw) for kv in kvs]
            enc_s = (time.perf_counter() - t) / len(objs)
            plan = plan_batch(objs[:1], torch.float16)
            gpu_kv = decode_plan_cuda(plan, "cuda")
            t = time.perf_counter()
            ref = cpu.decode(objs[0])
            cpu_dec_s = time.perf_counter() - t
            equal = all(torch.equal(gpu_kv[(i * plan.layers + layer)].cpu(), ref[layer][i][0])
                        for i in range(2) for layer in range(plan.layers))
            del gpu_kv
            per_object = [plan_symbols(plan_batch([o], torch.float16)) for o in objs]
            for ctx in s.contexts:
                n = max(1, ctx // s.object_tokens)
                batch = [objs[i % len(objs)] for i in range(n)]
                t = time.perf_counter()
                plan = plan_batch(batch, torch.float16)
                plan_s = time.perf_counter() - t
                dev = upload_plan(plan)
                ms = _events_ms(lambda plan=plan, dev=dev: decode_plan_cuda(plan, uploaded=dev, check=False),
                                s.warmup, s.repeats)
                raise_device_error(dev["error"])
                values = 2 * plan.layers * plan.channels * plan.tokens * n
                nbytes = sum(len(o) for o in batch)
                gbs = 2 * values / ms / 1e6
                transfer_ms = nbytes * 8 / 10e9 * 1e3
                rows.append({"level": level, "context_tokens": n * s.object_tokens, "objects": n,
                             "bits_per_value": 8 * nbytes / values, "decode_ms": ms, "gbs_fp16": gbs,
                             "ratio_to_copy_floor": gbs / floor, "transfer_10gbps_ms": transfer_ms,
                             "decode_share_of_transfer": ms / transfer_ms, "plan_s": plan_s,
                             "bit_exact_vs_cpu": equal, "cpu_encode_s_per_object": enc_s,
                             "cpu_decode_s_per_object": cpu_dec_s})
                log(f"{level:18s} {n * s.object_tokens:6d} tokens: {ms:8.3f} ms  {gbs:7.1f} GB/s  "
                    f"{ms / transfer_ms:6.2%} of 10 Gbps transfer  exact={equal}")
                del dev
                # the encoder on the same symbols (the batch's objects alternate between the two encoded)
                geometry = plan_geometry(plan)
                symbols = np.concatenate([per_object[i % len(objs)][0] for i in range(n)])
                tables = encode_tables(geometry, plan.cum, plan.nsym)
                d_sym = torch.from_numpy(symbols).cuda()
                data, _ = encode_streams_cuda(d_sym, tables)
                expected = b"".join(per_object[i % len(objs)][2] for i in range(n))
                enc_equal = data.cpu().numpy().tobytes() == expected
                enc_ms = _events_ms(lambda d_sym=d_sym, tables=tables: encode_streams_cuda(d_sym, tables, check=False),
                                    s.warmup, s.repeats)
                rows[-1].update({"encode_ms": enc_ms, "encode_gbs_fp16": 2 * values / enc_ms / 1e6,
                                 "encode_bytes_equal_cpu": enc_equal})
                log(f"{'':18s} {'':6s}   encode {enc_ms:8.3f} ms  {2 * values / enc_ms / 1e6:7.1f} GB/s  "
                    f"bytes equal CPU={enc_equal}")
                del d_sym, tables, data, plan
                torch.cuda.empty_cache()
        # the anchor's structure, on the same contexts' cachegen-3 symbols
        payload, begin, cum, nsym, row, sym, per_launch = baseline_data(kvs[0], s.object_tokens)
        d_payload = torch.from_numpy(payload).cuda()
        d_cum, d_nsym = torch.from_numpy(cum).cuda(), torch.from_numpy(nsym).cuda()
        d_begin, d_row = torch.from_numpy(begin).cuda(), torch.from_numpy(row).cuda()
        launches = len(begin) // per_launch
        first = backend.baseline(d_payload, d_begin[:per_launch], d_cum, d_nsym, d_row[:per_launch], 256)
        base_ok = bool(np.array_equal(first.cpu().numpy().reshape(-1), sym[:per_launch * 256]))
        for ctx in s.contexts:
            n = max(1, ctx // s.object_tokens) * launches

            def run(n=n):
                for b in range(n):
                    lo = (b % launches) * per_launch
                    backend.baseline(d_payload, d_begin[lo:lo + per_launch], d_cum, d_nsym, d_row[lo:lo + per_launch],
                                     256)

            ms = _events_ms(run, s.warmup, s.repeats)
            values = n * 256 * per_launch
            ours = next((r for r in rows if r["level"] == "cachegen-3" and r["context_tokens"] == n * 256), None)
            rows.append({"level": "baseline (anchor's structure, cachegen-3 symbols)", "context_tokens": n * 256,
                         "objects": n, "decode_ms": ms, "gbs_fp16": 2 * values / ms / 1e6,
                         "ratio_to_copy_floor": 2 * values / ms / 1e6 / floor, "bit_exact_vs_cpu": base_ok,
                         "speedup_cachegen3_over_baseline": (ms / ours["decode_ms"]) if ours else None})
            log(f"baseline           {n * 256:6d} tokens: {ms:8.3f} ms  {2 * values / ms / 1e6:7.1f} GB/s")
        by = {(r["level"], r["context_tokens"]): r for r in rows}
        for r in rows:
            b = by.get(("baseline (anchor's structure, cachegen-3 symbols)", r["context_tokens"]))
            if b and not r["level"].startswith("baseline"):
                r["speedup_over_baseline"] = b["decode_ms"] / r["decode_ms"]
    if s.e2e:
        summary["e2e"] = e2e_rows(s.e2e, log)
    if s.fuzz:
        summary["fuzz"] = fuzz_rows(small_objects, s.fuzz, 0, log)
        log(f"fuzz: {summary['fuzz']}")
    return result("gpu", asdict(s), rows, summary)


def table(res: dict[str, Any]) -> str:
    lines = [f"device: {res['summary'].get('device')}  copy floor: {res['summary'].get('copy_floor_gbs', 0):.0f} GB/s",
             f"{'level':50s} {'tokens':>7s} {'ms':>9s} {'GB/s':>8s} {'x floor':>8s} {'x base':>7s} "
             f"{'% 10Gbps':>9s} exact {'enc GB/s':>9s} enc-exact"]
    for r in res["rows"]:
        lines.append(f"{r['level']:50s} {r['context_tokens']:7d} {r['decode_ms']:9.3f} {r['gbs_fp16']:8.1f} "
                     f"{r['ratio_to_copy_floor']:8.3f} {r.get('speedup_over_baseline') or 0:7.2f} "
                     f"{100 * (r.get('decode_share_of_transfer') or 0):8.2f}% {r.get('bit_exact_vs_cpu')!s:5s} "
                     f"{r.get('encode_gbs_fp16') or 0:9.1f} {r.get('encode_bytes_equal_cpu')}")
    if "checks" in res["summary"]:
        c = res["summary"]["checks"]
        lines.append(f"bit-exact checks: {c['equal']}/{c['total']}")
    if "fuzz" in res["summary"]:
        lines.append(f"fuzz: {res['summary']['fuzz']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default="2048,8192,32768")
    p.add_argument("--levels", default="")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--kv-file")
    p.add_argument("--check-dir")
    p.add_argument("--fuzz", type=int, default=10000)
    p.add_argument("--no-timing", action="store_true", help="skip the copy floor, checks and timings")
    p.add_argument("--e2e", help="folder from scripts/gpu_e2e_carry.py: SmolLM2 on the GPU end to end")
    p.add_argument("--out", default="gpu_bench.json")
    a = p.parse_args(argv)
    settings = GpuBenchSettings(contexts=tuple(int(c) for c in a.contexts.split(",")), repeats=a.repeats,
                                levels=tuple(a.levels.split(",")) if a.levels else None, kv_file=a.kv_file,
                                check_dir=a.check_dir, fuzz=a.fuzz, no_timing=a.no_timing, e2e=a.e2e)
    res = run_gpu_bench(settings, log=lambda m: print(m, file=sys.stderr, flush=True))
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
