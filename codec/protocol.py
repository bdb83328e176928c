"""The coder worker's wire protocol: framed messages over a pipe (no pickle).

Every message, both ways::

    u32 JSON length | JSON object | u64 blob length | blob

The JSON object is a coder request or reply (`kvcast.codec.ops`); errors reply ``{"error": "..."}`` (with
``"codec_error": true`` for a `CodecError`). `kvcast.codec.pool` writes requests and reads replies,
`kvcast.codec.worker` the reverse. This module imports nothing of the codec, so the pool can speak the
protocol without importing the worker's ``__main__`` module.
"""

from __future__ import annotations

import json
import struct
from typing import BinaryIO

HEAD = struct.Struct("<I")
BLOB = struct.Struct("<Q")


def write_message(out: BinaryIO, meta: dict, blob: bytes | memoryview = b"") -> None:
    """Write one framed message and flush."""
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
    """Read one framed message; `EOFError` when the pipe closes."""
    (n,) = HEAD.unpack(_read_exact(inp, HEAD.size))
    meta = json.loads(_read_exact(inp, n))
    (m,) = BLOB.unpack(_read_exact(inp, BLOB.size))
    return meta, _read_exact(inp, m)
