"""Bad input: every corrupt, truncated, forged, mismatched or foreign object raises CodecError."""

from __future__ import annotations

import json
import random
import struct

import crc32c
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcast import codec
from kvcast.codec.api import ModelFingerprint
from kvcast.codec.container import CRC, PREFIX
from tests.factories import make_kv


@pytest.fixture(scope="module")
def objects():
    kv = make_kv(3, 2, 37, 8, torch.float16, seed=5)
    table = codec.SensitivityTable.uniform(3, 2, 8)  # for the grid levels (kvcast-*); others ignore it
    return {lv: codec.encode(kv, lv, sensitivity=table) for lv in codec.levels()}


def refresh_crc(buf: bytearray) -> bytes:
    body = bytes(buf[:-CRC.size])
    return body + CRC.pack(crc32c.crc32c(body))


def test_fuzz_bit_flips_truncations_and_garbage_all_raise(objects):
    rng = random.Random(1234)
    cases = 0
    for _level, data in objects.items():
        for _ in range(300):
            buf = bytearray(data)
            kind = rng.randrange(4)
            if kind == 0:  # flip one to eight random bits
                for _ in range(rng.randint(1, 8)):
                    i = rng.randrange(len(buf))
                    buf[i] ^= 1 << rng.randrange(8)
                mutated = bytes(buf)
            elif kind == 1:  # truncate
                mutated = bytes(buf[:rng.randrange(len(buf))])
            elif kind == 2:  # append junk
                mutated = bytes(buf) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            else:  # overwrite a run with random bytes
                i = rng.randrange(len(buf))
                n = rng.randint(1, 32)
                buf[i:i + n] = bytes(rng.randrange(256) for _ in range(len(buf[i:i + n])))
                mutated = bytes(buf)
            if mutated == data:
                continue
            cases += 1
            with pytest.raises(codec.CodecError):
                codec.decode(mutated)
    assert cases > 2000


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_foreign_bytes_raise(blob):
    with pytest.raises(codec.CodecError):
        codec.decode(blob)
    with pytest.raises(codec.CodecError):
        codec.inspect(blob)


def test_forged_objects_with_valid_checksum_fail_cleanly(objects):
    """Corruption that a checksum cannot see (re-checksummed): CodecError or a well-formed result, nothing else."""
    rng = random.Random(99)
    raised = 0
    for _level, data in objects.items():
        ref = codec.decode(data)
        for _ in range(150):
            buf = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(PREFIX.size, len(buf) - CRC.size)
                buf[i] = rng.randrange(256)
            try:
                out = codec.decode(refresh_crc(buf))
            except codec.CodecError:
                raised += 1
                continue
            assert [t.shape for p in out for t in p] == [t.shape for p in ref for t in p]
    assert raised > 0


def forge_header(data: bytes, edit) -> bytes:
    magic, version, flags, hlen, blen = PREFIX.unpack_from(data, 0)
    header = json.loads(data[PREFIX.size:PREFIX.size + hlen])
    edit(header)
    hjson = json.dumps(header).encode()
    body = data[PREFIX.size + hlen:PREFIX.size + hlen + blen]
    buf = bytearray(PREFIX.pack(magic, version, flags, len(hjson), blen) + hjson + body + b"\0\0\0\0")
    return refresh_crc(buf)


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["level"].update(name="x", quantizer="nope"), "unknown quantizer"),
    (lambda h: h["model"].update(layers=4), None),
    (lambda h: h["tokens"].update(count=36), None),
    (lambda h: h.update(bins={"key": [32, 32, 32], "value": [16, 16, 16]}), "bins"),
    (lambda h: h["sections"][0].update(nbytes=3), "section"),
    (lambda h: h.update(codec="other"), "not 'kvcast'"),
    (lambda h: h.pop("model"), "fingerprint"),
])
def test_forged_headers_raise_with_a_reason(objects, edit, message):
    data = objects["cachegen-2"]
    with pytest.raises(codec.CodecError, match=message):
        codec.decode(forge_header(data, edit))


def test_version_and_magic_are_checked(objects):
    data = bytearray(objects["raw"])
    struct.pack_into("<H", data, 8, 3)
    with pytest.raises(codec.CodecError, match="version"):
        codec.decode(refresh_crc(data))
    with pytest.raises(codec.CodecError, match="magic"):
        codec.decode(b"PK\x03\x04" + bytes(objects["raw"][4:]))


def test_bad_inputs_to_encode():
    kv = make_kv(2, 2, 5, 4, torch.float16, seed=0)
    with pytest.raises(codec.CodecError, match="unknown level"):
        codec.encode(kv, "cachegen-9")
    with pytest.raises(codec.CodecError):
        codec.encode([], "raw")
    with pytest.raises(codec.CodecError, match="shape"):
        codec.encode([(kv[0][0], kv[0][1][:, :, :3])], "raw")
    with pytest.raises(codec.CodecError, match="dtype"):
        codec.encode([(kv[0][0], kv[0][1].float())], "raw")
    with pytest.raises(codec.CodecError, match="dtype"):
        codec.encode([(kv[0][0].int(), kv[0][1].int())], "raw")
    bad = kv[0][0].clone()
    bad[0, 0, 0, 0] = float("nan")
    for level in ("raw", "int8", "cachegen-2"):
        with pytest.raises(codec.CodecError, match="NaN"):
            codec.encode([(bad, kv[0][1])], level)
    huge = kv[0][0].float() * 1e6
    with pytest.raises(codec.CodecError, match="fp16"):
        codec.encode([(huge, huge)], "cachegen-2")
    with pytest.raises(codec.CodecError, match="does not match"):
        codec.encode(kv, "raw", model=ModelFingerprint("m", layers=3, kv_heads=2, head_dim=4, dtype="float16"))


def test_mismatched_model_is_refused(objects):
    fp = ModelFingerprint("smollm2", layers=30, kv_heads=3, head_dim=64, dtype="float16")
    with pytest.raises(codec.CodecError, match="expected"):
        codec.decode(objects["cachegen-2"], expect_model=fp)
    kv = make_kv(2, 2, 5, 4, torch.float16, seed=0)
    a = ModelFingerprint("m", 2, 2, 4, "float16", rope={"theta": 10000.0})
    b = ModelFingerprint("m", 2, 2, 4, "float16", rope={"theta": 500000.0})
    with pytest.raises(codec.CodecError, match="RoPE"):
        codec.decode(codec.encode(kv, "raw", model=a), expect_model=b)
    assert codec.inspect(codec.encode(kv, "raw", model=a))["model"]["rope"] == {"theta": 10000.0}
