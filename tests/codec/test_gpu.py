"""The GPU decoder: its plan and kernel logic emulated with NumPy on the CPU (bit-exact with the CPU decoder
for every format-2 level, output dtype, lane count and batch), its checks on corrupt input, and on a CUDA
machine the kernels themselves (skipped without CUDA)."""

from __future__ import annotations

import dataclasses

import crc32c
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcast import codec
from kvcast.codec.api import Codec
from kvcast.codec.gpu import (
    decode_batch,
    emulate_encode,
    emulate_plan,
    encode_streams_cuda,
    encode_tables,
    lookup_packed,
    packed_tables,
    plan_batch,
    split_kv,
    synthesize,
)
from kvcast.codec.gpubench import small_kv
from kvcast.codec.levels import LevelRegistry
from kvcast.codec.rans import encode_streams
from tests.codec.test_grid import random_table
from tests.codec.test_rans import random_streams

RANS = [lv for lv in codec.levels() if codec.describe(lv)["coder"] == "rans"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def codec_with_lanes(lane_symbols: int) -> Codec:
    registry = LevelRegistry()
    for name in LevelRegistry.default().names():
        registry.add(dataclasses.replace(LevelRegistry.default().get(name), lane_symbols=lane_symbols))
    return Codec(registry)


def encode_pair(c: Codec, level: str, shape=(2, 3, 600, 16), token_start=2):
    layers, heads, tokens, dim = shape
    kw = {"sensitivity": random_table(layers, heads, dim)} if level.startswith("kvcast") else {}
    return [c.encode(small_kv(*shape, torch.float16, seed), level, token_start=token_start, **kw) for seed in (5, 6)]


def assert_same(objects, kvs, c: Codec, dtype, table=None):
    for data, kv in zip(objects, kvs):
        for pair, ref in zip(kv, c.decode(data, dtype=dtype, sensitivity=table)):
            assert all(torch.equal(a.cpu(), b) for a, b in zip(pair, ref))


@pytest.mark.parametrize("level", RANS)
@pytest.mark.parametrize("lane_symbols", [4096, 48])
def test_emulated_kernel_is_bit_exact_with_the_cpu_decoder(level, lane_symbols):
    c = codec_with_lanes(lane_symbols)
    objects = encode_pair(c, level)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        plan = plan_batch(objects, dtype)
        if lane_symbols == 48:
            assert plan.streams["lanes"].max() >= 8   # many lanes per stream, several streams per warp
        assert len(plan.stream_of) % 32 == 0
        out, table = emulate_plan(plan), None
        if plan.basis is not None:   # components back to keys and values, as decode_batch does after the kernel
            table = random_table(2, 3, 16)
            out = synthesize(plan, out, torch.from_numpy(table.synthesis))
        assert_same(objects, split_kv(plan, out), c, dtype, table)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2 ** 32 - 1))
def test_packed_tables_find_every_slot_s_symbol(seed):
    _, _, cum, nsym = random_streams(seed)
    entry, lut = packed_tables(cum, nsym)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(nsym), 4000)
    slots = np.concatenate([rng.integers(0, 65536, 4000 - 2), [0, 65535]])
    sym, start, freq = lookup_packed(entry, lut, rows, slots)
    assert np.all(sym < nsym[rows])
    assert np.array_equal(start, cum[rows, sym]) and np.array_equal(freq, cum[rows, sym + 1] - cum[rows, sym])
    assert np.all((start <= slots) & (slots < start + freq))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2 ** 32 - 1))
def test_emulated_gpu_encoder_writes_the_cpu_encoder_s_bytes(seed):
    symbols, geometry, cum, nsym = random_streams(seed, max_symbols=1500)
    data, lengths = encode_streams(symbols, geometry, cum, nsym)
    gpu_data, gpu_lengths = emulate_encode(symbols, geometry, cum, nsym)
    assert gpu_data == data
    assert np.array_equal(gpu_lengths, lengths)


def test_emulated_gpu_encoder_refuses_symbols_outside_their_cdf():
    symbols, geometry, cum, nsym = random_streams(3)
    assert symbols.size
    symbols = symbols.copy()
    symbols[len(symbols) // 2] = 300
    with pytest.raises(codec.CodecError, match="outside|out of"):
        emulate_encode(symbols, geometry, cum, nsym)


def test_warps_hold_whole_streams():
    plan = plan_batch(encode_pair(codec_with_lanes(40), "kvcast-2"))
    live = plan.stream_of >= 0
    for t in np.flatnonzero(live & (plan.lane_of == 0)):
        lanes = plan.streams["lanes"][plan.stream_of[t]]
        assert t // 32 == (t + lanes - 1) // 32
        assert (plan.stream_of[t:t + lanes] == plan.stream_of[t]).all()
        assert plan.lane_of[t:t + lanes].tolist() == list(range(lanes))


def corrupt_payload(data: bytes, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = bytearray(data)
    for _ in range(3):
        buf[int(rng.integers(len(buf) * 2 // 3, len(buf) - 4))] ^= int(rng.integers(1, 256))
    buf[-4:] = crc32c.crc32c(bytes(buf[:-4])).to_bytes(4, "little")
    return bytes(buf)


@pytest.mark.parametrize("level", ["kvcast-2", "cachegen-2", "cachegen-delta-1"])
def test_emulated_kernel_refuses_corrupt_streams_as_the_cpu_decoder_does(level):
    c = codec_with_lanes(64)
    data = encode_pair(c, level)[0]
    refused = 0
    for seed in range(12):
        bad = corrupt_payload(data, seed)
        try:
            c.decode(bad)
            cpu_ok = True
        except codec.CodecError:
            cpu_ok = False
        try:
            out = split_kv(plan := plan_batch([bad]), emulate_plan(plan))
        except codec.CodecError:
            assert not cpu_ok  # the GPU refuses only what the CPU refuses
            refused += 1
        else:
            assert cpu_ok
            assert_same([bad], out, c, torch.float16)
    assert refused >= 6


def test_batches_need_one_level_and_shape_and_format_2():
    c = Codec()
    a = encode_pair(c, "cachegen-2")[0]
    b = c.encode(small_kv(2, 3, 300, 16, torch.float16, 1), "cachegen-2")
    with pytest.raises(codec.CodecError, match="one level, model shape and token count"):
        plan_batch([a, b])
    with pytest.raises(codec.CodecError, match="not entropy-coded with rANS"):
        plan_batch([c.encode(small_kv(2, 3, 30, 16, torch.float16, 1), "int8")])
    with pytest.raises(codec.CodecError, match="empty batch"):
        plan_batch([])


def test_format_1_objects_are_sent_to_the_cpu():
    from pathlib import Path

    data = (Path(__file__).parent / "golden" / "v1" / "cachegen-2.kvc").read_bytes()
    with pytest.raises(codec.CodecError, match="decodes on the CPU"):
        plan_batch([data])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_decoding_on_a_gpu_without_cuda_is_a_clear_error():
    with pytest.raises(codec.CodecError, match="CUDA"):
        decode_batch(encode_pair(Codec(), "cachegen-2")[:1])


@CUDA
@pytest.mark.parametrize("level", RANS)
def test_cuda_kernel_is_bit_exact_with_the_cpu_decoder(level):
    c = codec_with_lanes(48)
    objects = encode_pair(c, level)
    if codec.describe(level).get("basis"):
        # the symbols and components are bit-exact (the emulation test); the synthesis is a float32 matrix
        # product per head, whose rounding differs between cuBLAS and the CPU
        table = random_table(2, 3, 16)
        for data, kv in zip(objects, decode_batch(objects, "cuda", torch.float32,
                                                  synthesis=lambda digest: table.synthesis)):
            for pair, ref in zip(kv, c.decode(data, dtype=torch.float32, sensitivity=table)):
                for a, b in zip(pair, ref):
                    assert torch.allclose(a.cpu(), b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
        return
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert_same(objects, decode_batch(objects, "cuda", dtype), c, dtype)


@CUDA
def test_cuda_kernel_refuses_corrupt_streams():
    c = Codec()
    data = encode_pair(c, "kvcast-2")[0]
    for seed in range(20):
        bad = corrupt_payload(data, seed)
        try:
            c.decode(bad)
        except codec.CodecError:
            with pytest.raises(codec.CodecError):
                decode_batch([bad], "cuda")


@CUDA
@pytest.mark.parametrize("seed", range(20))
def test_cuda_encoder_writes_the_cpu_encoder_s_bytes(seed):
    symbols, geometry, cum, nsym = random_streams(seed)
    data, lengths = encode_streams(symbols, geometry, cum, nsym)
    gpu_data, gpu_lengths = encode_streams_cuda(torch.from_numpy(symbols).cuda(), encode_tables(geometry, cum, nsym))
    assert gpu_data.cpu().numpy().tobytes() == data
    assert np.array_equal(gpu_lengths.cpu().numpy(), lengths)
