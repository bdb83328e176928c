"""Objects of format version 1 (torchac-coded, written by kvcast before the rANS coder) still decode, to the
tensors the version-1 decoder gave (recorded when the fixtures were made, at b4d7b45)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import crc32c
import pytest
import torch

import kvcast.codec as codec
from kvcast.codec.container import unpack

FIXTURES = Path(__file__).parent / "golden" / "v1"
EXPECTED = json.loads((FIXTURES / "decoded.json").read_text())


@pytest.mark.parametrize("level", sorted(EXPECTED))
def test_version_1_objects_decode_as_before(level):
    data = (FIXTURES / f"{level}.kvc").read_bytes()
    assert unpack(data).version == 1
    kv = codec.decode(data, dtype=torch.float16)
    digest = hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for pair in kv for t in pair)).hexdigest()
    assert digest == EXPECTED[level]["decoded_sha256"]


def test_new_objects_are_version_2_and_smaller_readers_refuse_them_clearly():
    kv = codec.decode((FIXTURES / "cachegen-2.kvc").read_bytes())
    data = codec.encode(kv, "cachegen-2", token_start=2)
    assert unpack(data).version == 2
    future = bytearray(data)
    future[8:10] = (3).to_bytes(2, "little")
    with pytest.raises(codec.CodecError, match="format version 3.*re-encode"):
        codec.decode(bytes(future))


def test_a_version_1_object_naming_the_rans_coder_is_refused():
    kv = codec.decode((FIXTURES / "cachegen-2.kvc").read_bytes())
    data = bytearray(codec.encode(kv, "cachegen-2"))
    data[8:10] = (1).to_bytes(2, "little")
    data[-4:] = crc32c.crc32c(bytes(data[:-4])).to_bytes(4, "little")
    assert unpack(bytes(data)).header["level"]["coder"] == "rans"
    with pytest.raises(codec.CodecError, match="format-1 object names the rANS coder"):
        codec.decode(bytes(data))
