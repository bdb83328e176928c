"""Make what `kvcast bench gpu` checks on a GPU host that has no model: SmolLM2's real KV (512 tokens of
WikiText-2 test, fp16 safetensors) and SmolLM2 objects of every format-2 level encoded here on the CPU, with
the SHA-256 of their CPU decoding in fp16 and bf16 (`digests.json`). Usage:
``python scripts/gpu_carry.py .gpu_carry`` (needs the model and ../shared/datasets)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from kvcast import codec
from kvcast.codec.bench import smollm2_kv
from kvcast.codec.gpubench import digest


def main(out: Path) -> None:
    (out / "check").mkdir(parents=True, exist_ok=True)
    kv, fingerprint = smollm2_kv(1024)
    first = [(k[:, :, :512].contiguous(), v[:, :, :512].contiguous()) for k, v in kv]
    save_file({"key": torch.stack([k[0] for k, _ in first]), "value": torch.stack([v[0] for _, v in first])},
              str(out / "smollm2_kv_512.safetensors"))
    second = [(k[:, :, 512:].contiguous(), v[:, :, 512:].contiguous()) for k, v in kv]
    digests = {}
    for level in codec.levels():
        if codec.describe(level)["coder"] != "rans":
            continue
        for name, part, start in (("a", first, 0), ("b", second, 512)):
            data = codec.encode(part, level, model=fingerprint, token_start=start, **(
                {"context_end": 1024} if codec.describe(level)["quantizer"] == "grid" else {}))
            file = f"{level}-{name}.kvc"
            (out / "check" / file).write_bytes(data)
            digests[file] = {"digests": {d: digest(codec.decode(data, dtype=getattr(torch, d)))
                                         for d in ("float16", "bfloat16")}}
            print(file, len(data), flush=True)
    (out / "check" / "digests.json").write_text(json.dumps(digests, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".gpu_carry"))
