"""Typed binary parts and stream geometry shared by the level pipelines, the coder ops and `kvcast.codec.api`.

* `pack_parts` / `unpack_parts`: named tensors, arrays and bytes as one JSON-able description plus one blob (how
  a (K/V, layer) group travels to and from a coder worker; no pickle).
* `split_payload`: cut concatenated streams back into streams.
* `block_rows`: coded tokens per stream block.
* dtype tables (`TORCH_DTYPES`, `NUMPY_DTYPES`) and `FP16_MAX`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvcast.codec.errors import CodecError

FP16_MAX = 65504.0
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "int8": torch.int8, "int16": torch.int16, "uint32": torch.int32}
NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32, "int8": np.int8, "int16": np.int16,
                "uint32": np.uint32, "uint8": np.uint8}


def pack_parts(parts: dict[str, torch.Tensor | np.ndarray | bytes]) -> tuple[list, bytes]:
    """Describe and concatenate named arrays/bytes: ``([[name, dtype, shape, nbytes], ...], blob)``."""
    meta, blobs = [], []
    for name, value in parts.items():
        if isinstance(value, (bytes, bytearray, memoryview)):
            raw, dtype, shape = bytes(value), "bytes", [len(value)]
        elif isinstance(value, torch.Tensor):
            t = value.contiguous().cpu()
            dtype = str(t.dtype).removeprefix("torch.")
            shape = list(t.shape)
            raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        else:
            arr = np.ascontiguousarray(value)
            raw, dtype, shape = arr.tobytes(), arr.dtype.name, list(arr.shape)
        meta.append([name, dtype, shape, len(raw)])
        blobs.append(raw)
    return meta, b"".join(blobs)


def unpack_parts(meta: list, blob: bytes) -> dict[str, Any]:
    """Inverse of `pack_parts`: torch tensors (float/bf16), numpy arrays (ints) or bytes."""
    out: dict[str, Any] = {}
    pos = 0
    for name, dtype, shape, n in meta:
        chunk = blob[pos:pos + n]
        pos += n
        if dtype == "bytes":
            out[name] = chunk
        elif dtype == "bfloat16":
            out[name] = torch.frombuffer(bytearray(chunk), dtype=torch.bfloat16).reshape(shape)
        elif dtype in ("float16", "float32"):
            out[name] = torch.from_numpy(np.frombuffer(chunk, dtype=NUMPY_DTYPES[dtype]).reshape(shape).copy())
        else:
            out[name] = np.frombuffer(chunk, dtype=NUMPY_DTYPES[dtype]).reshape(shape)
    if pos != len(blob):
        raise CodecError("worker message parts do not cover the blob")
    return out


def split_payload(payload: bytes | memoryview, lengths: Sequence[int]) -> list:
    """Cut a concatenation of streams back into streams of the given lengths."""
    out, pos = [], 0
    for n in lengths:
        out.append(payload[pos:pos + n])
        pos += n
    return out


def block_rows(coded: torch.Tensor, tokens_per_stream: int) -> tuple[int, ...]:
    """Coded tokens per stream block of `tokens_per_stream` tokens (`coded`: bool per token)."""
    tokens = coded.shape[0]
    counts = torch.zeros(-(-tokens // tokens_per_stream), dtype=torch.int64)
    counts.index_add_(0, torch.arange(tokens) // tokens_per_stream, coded.to(torch.int64))
    return tuple(int(c) for c in counts)
