"""Golden bitstreams: every level's bytes for fixed inputs equal those recorded in `golden/bitstreams.json`.

The digests were recorded at commit 5b7c536, before the namespace and module refactoring, and re-recorded
when format version 2 (the rANS coder) replaced torchac in the entropy-coded levels; the tensors those levels
decode to did not change (`tests/codec/test_rans.py` checks both coders decode to equal tensors). This test pins
"no behaviour change" for every level and three input dtypes (the grid levels with SmolLM2's shipped sensitivity
table, a token offset and a context end). A deliberate format change bumps the container's format version
and re-records the file: ``python -m tests.codec.test_golden > tests/codec/golden/bitstreams.json``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from kvcast import codec
from kvcast.codec.fingerprint import ModelFingerprint

GOLDEN = Path(__file__).with_name("golden") / "bitstreams.json"
SMOLLM2 = dict(name="SmolLM2-135M-Instruct", layers=30, kv_heads=3, head_dim=64, dtype="float16",
               rope={"theta": 100000.0, "type": "default"})
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
OTHER_DTYPE_LEVELS = ("raw", "int8", "cachegen-2", "cachegen-delta-2", "kvcast-2")


def golden_kv(dtype: torch.dtype, tokens: int = 40, seed: int = 7) -> list:
    """SmolLM2-shaped KV with per-channel outliers and a sink-like first token."""
    g = torch.Generator().manual_seed(seed)
    kv = []
    for _ in range(SMOLLM2["layers"]):
        pair = []
        for _ in range(2):
            t = torch.randn(1, SMOLLM2["kv_heads"], tokens, SMOLLM2["head_dim"], generator=g)
            t = t * (1 + 4 * torch.rand(1, SMOLLM2["kv_heads"], 1, SMOLLM2["head_dim"], generator=g))
            t[:, :, 0] *= 8
            pair.append(t.to(dtype))
        kv.append(tuple(pair))
    return kv


def cases() -> list[tuple[str, str]]:
    return [(level, dname) for dname in DTYPES for level in codec.levels()
            if dname == "float16" or level in OTHER_DTYPE_LEVELS]


def digest(level: str, dname: str, kv: list) -> str:
    kw = {}
    if level.startswith("kvcast"):
        kw = dict(model=ModelFingerprint(**SMOLLM2), token_start=100, context_end=400)
    return hashlib.sha256(codec.encode(kv, level, **kw)).hexdigest()


@pytest.fixture(scope="module")
def inputs() -> dict[str, list]:
    return {dname: golden_kv(dtype) for dname, dtype in DTYPES.items()}


def test_golden_file_covers_every_level():
    recorded = json.loads(GOLDEN.read_text())
    assert set(recorded) == {f"{level}/{dname}" for level, dname in cases()}


@pytest.mark.parametrize("level, dname", cases())
def test_bitstream_bytes_are_unchanged(level, dname, inputs):
    recorded = json.loads(GOLDEN.read_text())
    assert digest(level, dname, inputs[dname]) == recorded[f"{level}/{dname}"], \
        f"{level} ({dname}) encodes to different bytes than recorded"


if __name__ == "__main__":
    kv_by_dtype = {dname: golden_kv(dtype) for dname, dtype in DTYPES.items()}
    json.dump({f"{lv}/{d}": digest(lv, d, kv_by_dtype[d]) for lv, d in cases()}, sys.stdout, indent=1,
              sort_keys=True)
    print()
