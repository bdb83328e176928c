"""`raw`: fetch the uncompressed KV of every chunk (the ``raw`` codec level)."""

from __future__ import annotations

from kvcast.policies.fixed import FixedLevelPolicy


class RawPolicy(FixedLevelPolicy):
    """Every chunk at level ``raw``: lossless, largest. The I/O-only baseline (LMCache without a codec)."""

    name = "raw"

    def __init__(self) -> None:
        super().__init__("raw")
