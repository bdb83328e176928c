"""Coder worker process: ``python -m codec.worker`` codes stream groups sent over its stdin/stdout.

torchac holds the GIL, so parallel coding needs processes. Workers are plain subprocesses speaking a small
binary protocol (no pickle, no re-import of the caller's main module). Every message, both ways::

    u32 JSON length | JSON object | u64 blob length | blob

Requests are those of `kvcast.codec.pipeline.handle` (``encode_layer``, ``decode_layer``, ``ping``): the JSON holds
the op, its parameters and a description of the typed parts packed in the blob. Errors reply
``{"error": "..."}`` and the worker keeps serving.
"""

from __future__ import annotations

import json
import struct
import sys
from typing import BinaryIO


HEAD = struct.Struct("<I")
BLOB = struct.Struct("<Q")


def write_message(out: BinaryIO, meta: dict, blob: bytes | memoryview = b"") -> None:
    raw = json.dumps(meta).encode()
    out.write(HEAD.pack(len(raw)) + raw + BLOB.pack(len(blob)))
    out.write(blob)
    out.flush()


def _read_exact(inp: BinaryIO, n: int) -> bytes:
    buf = inp.read(n)
    if buf is None or len(buf) != n:
        raise EOFError("coder worker pipe closed")
    return buf


def read_message(inp: BinaryIO) -> tuple[dict, bytes]:
    (n,) = HEAD.unpack(_read_exact(inp, HEAD.size))
    meta = json.loads(_read_exact(inp, n))
    (m,) = BLOB.unpack(_read_exact(inp, BLOB.size))
    return meta, _read_exact(inp, m)


def main() -> None:
    import torch

    torch.set_num_threads(1)
    from kvcast.codec.entropy import torchac_backend
    from kvcast.codec.errors import CodecError
    from kvcast.codec.pipeline import handle

    torchac_backend()
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            meta, blob = read_message(inp)
        except EOFError:
            return
        try:
            reply, data = handle(meta, blob)
        except CodecError as exc:
            reply, data = {"error": str(exc), "codec_error": True}, b""
        except Exception as exc:  # report, keep serving
            reply, data = {"error": f"{type(exc).__name__}: {exc}"}, b""
        write_message(out, reply, data)


if __name__ == "__main__":
    main()
