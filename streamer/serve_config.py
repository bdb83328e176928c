"""Settings and constants of `kvcast serve` (standard library only, so the CLI reads its defaults without
importing aiohttp; `kvcast.streamer.serve` re-exports them)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = [
    "ACCESS_LOGGER", "ACCESS_LOG_FIELDS", "DEFAULT_HOST", "DEFAULT_LIMITS", "DEFAULT_PORT", "ERROR_KINDS",
    "MIN_TOKEN_CHARS", "TOKEN_ENV", "ServeLimits", "check_token",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8470
TOKEN_ENV = "KVCAST_TOKEN"
ACCESS_LOGGER = "kvcast.serve"
ACCESS_LOG_FIELDS = ("time", "remote", "method", "path", "status", "bytes", "duration_s", "context_id", "chunk",
                     "level", "error")
ERROR_KINDS = {"bad_request": 400, "unauthorized": 401, "not_found": 404, "range_not_satisfiable": 416,
               "too_large": 413, "busy": 503, "rate_limited": 429, "store_unavailable": 503, "internal": 500}
MIN_TOKEN_CHARS = 16
_TOKEN = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True)
class ServeLimits:
    """Caps of `make_app` (defaults are `kvcast serve`'s)."""

    max_line_size: int = 8190
    """Longest request line (bytes); longer is 400 (aiohttp's parser)."""
    max_field_size: int = 8190
    """Longest header line (bytes); longer is 400."""
    max_headers: int = 64
    """Most header lines per request."""
    max_streams: int = 64
    """Chunk streams in flight at once; one more is 503 ``busy`` with ``Retry-After``."""
    rate_per_s: float = 100.0
    """Requests per second per client address (token bucket; 0: no limit); beyond it 429 ``rate_limited``."""
    burst: int = 200
    """Requests a client may make at once (the bucket's depth)."""
    piece_bytes: int = 256 * 1024
    """Bytes paced and written per step of a chunk stream."""
    read_bytes: int = 1024 * 1024
    """Bytes read from the store per call, one read ahead of the writes (written in pieces of at most
    `piece_bytes`)."""
    store_threads: int = 16
    """Threads running the store's (blocking) calls."""
    retry_after_s: int = 1
    """``Retry-After`` of a 503 ``busy``."""
    max_tracked_clients: int = 10_000
    """Client addresses whose rate-limit buckets are kept (idle full buckets are dropped first)."""

    def __post_init__(self) -> None:
        for name in ("max_line_size", "max_field_size", "max_headers", "max_streams", "burst", "piece_bytes",
                     "read_bytes", "store_threads", "retry_after_s", "max_tracked_clients"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not (isinstance(self.rate_per_s, (int, float)) and 0 <= self.rate_per_s < math.inf):
            raise ValueError(f"rate_per_s must be a finite number >= 0 (0: no limit), got {self.rate_per_s!r}")


def check_token(token: str, min_chars: int = 1) -> str:
    """`token` if it is at least `min_chars` printable ASCII characters without spaces; `ValueError` otherwise
    (the message never contains the token). The CLI asks for `MIN_TOKEN_CHARS`."""
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise ValueError("the token must be printable ASCII without spaces")
    if len(token) < min_chars:
        raise ValueError(f"the token is too short: at least {min_chars} characters")
    return token


DEFAULT_LIMITS = ServeLimits()
