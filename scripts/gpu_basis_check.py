"""The basis levels on a CUDA device: real SmolLM2 KV (`.gpu_carry/smollm2_kv_512.safetensors`, made by
`scripts/gpu_carry.py`) encoded on the CPU with the shipped table at every `kvcast-basis-*` level, decoded on
the GPU (`kvcast.codec.decode(..., device="cuda")`: the grid kernel, then the synthesis per head) and on the
CPU. Reports, per level and output dtype, whether the two agree within the synthesis' float32 rounding, the
largest difference, and the GPU decode time (median of 20 after 3 warm-ups). Writes JSON to argv[2].

    python scripts/gpu_basis_check.py .gpu_carry/smollm2_kv_512.safetensors out/gpu/basis_check.json
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from kvcast import codec
from kvcast.codec.fingerprint import ModelFingerprint

SMOLLM2 = ModelFingerprint(name="SmolLM2-135M-Instruct", layers=30, kv_heads=3, head_dim=64, dtype="float16",
                           rope={"theta": 100000.0, "type": "default"})


def main(kv_file: str, out: str) -> None:
    tensors = load_file(kv_file)
    keys, values = tensors["key"], tensors["value"]                    # [L, H, T, D] fp16
    kv = [(keys[layer].unsqueeze(0), values[layer].unsqueeze(0)) for layer in range(keys.shape[0])]
    rows = []
    for level in [lv for lv in codec.levels() if codec.describe(lv).get("basis")]:
        data = codec.encode(kv, level, model=SMOLLM2)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            cpu = codec.decode(data, dtype=dtype)
            gpu = codec.decode(data, device="cuda", dtype=dtype)
            diff = max(float((a.float() - b.cpu().float()).abs().max()) for p, q in zip(cpu, gpu) for a, b in zip(p, q))
            scale = max(float(a.float().abs().max()) for p in cpu for a in p)
            ulp = torch.finfo(dtype).eps
            ok = all(torch.allclose(b.cpu().float(), a.float(), rtol=2 * ulp, atol=2 * ulp * scale)
                     for p, q in zip(cpu, gpu) for a, b in zip(p, q))
            times = []
            for i in range(23):
                torch.cuda.synchronize()
                t = time.perf_counter()
                codec.decode(data, device="cuda", dtype=dtype)
                torch.cuda.synchronize()
                if i >= 3:
                    times.append(time.perf_counter() - t)
            values_n = 2 * 30 * 3 * 64 * keys.shape[2]
            row = {"level": level, "dtype": str(dtype).removeprefix("torch."), "bytes": len(data),
                   "bits_per_value": codec.inspect(data)["bits_per_value"], "within_rounding": ok,
                   "max_abs_diff": diff, "max_abs_value": scale, "gpu_decode_ms": 1e3 * statistics.median(times),
                   "gpu_values_per_s": values_n / statistics.median(times)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                     "rows": rows}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
