"""Coder ops: the requests a (K/V, layer) group is coded by, in a worker process or in-process.

A request is ``(meta, blob)``: ``meta`` a JSON-able dict with the ``op`` name, its parameters and the
description of the typed parts packed in ``blob`` (`kvcast.codec.packing.pack_parts`); the reply has the same
form. `handle` runs one request; `kvcast.codec.pool` calls it in-process, `kvcast.codec.worker` in a
subprocess.

===============  ===========================================
op               handler
===============  ===========================================
``ping``         none (replies ``{}``; starts a worker)
``encode_layer`` `kvcast.codec.pipeline.handle_encode_layer`
``decode_layer`` `kvcast.codec.pipeline.handle_decode_layer`
``encode_grid``  `kvcast.codec.grid.handle_encode_grid`
``decode_grid``  `kvcast.codec.grid.handle_decode_grid`
===============  ===========================================
"""

from __future__ import annotations

from collections.abc import Callable

from kvcast.codec.errors import CodecError
from kvcast.codec.grid import handle_decode_grid, handle_encode_grid
from kvcast.codec.pipeline import handle_decode_layer, handle_encode_layer

Handler = Callable[[dict, bytes], tuple[dict, bytes]]

HANDLERS: dict[str, Handler] = {
    "encode_layer": handle_encode_layer,
    "decode_layer": handle_decode_layer,
    "encode_grid": handle_encode_grid,
    "decode_grid": handle_decode_grid,
}


def handle(meta: dict, blob: bytes) -> tuple[dict, bytes]:
    """Run one request (in a worker or in-process); `CodecError` for an unknown op."""
    op = meta.get("op")
    if op == "ping":
        return {}, b""
    try:
        handler = HANDLERS[op]
    except (KeyError, TypeError):
        raise CodecError(f"unknown coder op {op!r}") from None
    return handler(meta, blob)
