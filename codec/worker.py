"""Coder worker process: ``python -m kvcast.codec.worker`` runs coder ops sent over its stdin/stdout.

torchac holds the GIL, so parallel coding needs processes. Workers are plain subprocesses started by
`kvcast.codec.pool.CoderPool`, speaking the framed protocol of `kvcast.codec.protocol` (no pickle, no
re-import of the caller's main module). Requests are those of `kvcast.codec.ops.handle` (``encode_layer``,
``decode_layer``, ``encode_grid``, ``decode_grid``, ``ping``). Errors reply ``{"error": "..."}`` and the
worker keeps serving. Nothing in the codec imports this module; it is only run as ``__main__``.
"""

from __future__ import annotations

import sys

import torch

from kvcast.codec.errors import CodecError
from kvcast.codec.ops import handle
from kvcast.codec.protocol import read_message, write_message
from kvcast.codec.rangecoder import torchac_backend
from kvcast.codec.rans import cpu_backend


def main() -> None:
    """Serve requests until stdin closes."""
    torch.set_num_threads(1)
    cpu_backend()
    try:
        torchac_backend()  # format-1 objects only: a host without torchac still codes format 2
    except CodecError:
        pass
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
