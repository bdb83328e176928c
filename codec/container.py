"""The kvcast bitstream container: a small binary prefix, a JSON header, typed sections and a CRC32C.

Layout (all integers little-endian)::

    offset  size  field
    0       8     magic  b"\\x89KVCAST\\n"  (detects foreign data and text-mode mangling)
    8       2     format version (u16): 2 (1: objects whose entropy-coded levels use torchac; still read)
    10      2     flags (u16), 0
    12      4     header length H (u32): UTF-8 JSON, at most 1 MiB
    16      8     body length B (u64)
    24      H     header (JSON object; see `kvcast.codec.api` for its fields)
    24+H    B     body: the sections listed in header["sections"], back to back, in that order
    24+H+B  4     CRC32C (Castagnoli) of every byte before it

Each section entry is ``{"name", "dtype", "shape", "nbytes", "role"}`` where role is ``side`` (scales, CDFs,
stream lengths: side information) or ``payload`` (coded symbols). Offsets follow from the order. Nothing is
ever pickled; the reader checks magic, version, lengths, the checksum, and every section's size against its
dtype and shape before any byte is interpreted, and raises `CodecError` naming what is wrong.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import crc32c
import numpy as np

from kvcast.codec.errors import CodecError

MAGIC = b"\x89KVCAST\n"
FORMAT_VERSION = 2
"""The version this writer writes: 2 added kvcast's interleaved rANS coder (`kvcast.codec.rans`)."""
READABLE_VERSIONS = (1, 2)
PREFIX = struct.Struct("<8sHHIQ")
CRC = struct.Struct("<I")
MAX_HEADER_BYTES = 1 << 20
DTYPES = {"uint8": np.uint8, "int8": np.int8, "int16": np.int16, "uint16": np.uint16, "uint32": np.uint32,
          "float16": np.float16, "float32": np.float32, "bytes": np.uint8}
ROLES = ("side", "payload")


@dataclass(frozen=True)
class Section:
    """A named, typed array (or raw bytes, dtype ``bytes``) stored in the body."""

    name: str
    data: bytes | np.ndarray
    role: str = "side"

    def entry_and_bytes(self) -> tuple[dict[str, Any], bytes]:
        if isinstance(self.data, (bytes, bytearray, memoryview)):
            raw = bytes(self.data)
            return {"name": self.name, "dtype": "bytes", "shape": [len(raw)], "nbytes": len(raw),
                    "role": self.role}, raw
        arr = np.ascontiguousarray(self.data)
        dtype = arr.dtype.name
        if dtype not in DTYPES:
            raise CodecError(f"section {self.name!r}: unsupported dtype {dtype}")
        raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        return {"name": self.name, "dtype": dtype, "shape": list(arr.shape), "nbytes": len(raw),
                "role": self.role}, raw


def pack(header: dict[str, Any], sections: Sequence[Section]) -> bytes:
    """Serialize a header and sections into one self-describing, checksummed object."""
    entries, blobs = [], []
    for s in sections:
        if s.role not in ROLES:
            raise CodecError(f"section {s.name!r}: bad role {s.role!r}")
        entry, raw = s.entry_and_bytes()
        entries.append(entry)
        blobs.append(raw)
    header = dict(header, sections=entries)
    hjson = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    if len(hjson) > MAX_HEADER_BYTES:
        raise CodecError(f"header is {len(hjson)} bytes, more than {MAX_HEADER_BYTES}")
    body_len = sum(len(b) for b in blobs)
    parts = [PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(hjson), body_len), hjson, *blobs]
    buf = b"".join(parts)
    return buf + CRC.pack(crc32c.crc32c(buf))


@dataclass(frozen=True)
class Unpacked:
    """A parsed object: its header, sizes by role, and zero-copy views of its sections."""

    header: dict[str, Any]
    sections: dict[str, np.ndarray | memoryview]
    header_bytes: int
    side_bytes: int
    payload_bytes: int
    total_bytes: int
    version: int = FORMAT_VERSION


def _read_prefix(data: bytes | memoryview) -> tuple[int, int, int]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected bytes, got {type(data).__name__}")
    if len(data) < PREFIX.size + CRC.size:
        raise CodecError(f"truncated object: {len(data)} bytes, less than the {PREFIX.size + CRC.size}-byte minimum")
    magic, version, flags, hlen, blen = PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise CodecError(f"not a kvcast object: bad magic {bytes(magic)!r}")
    if version not in READABLE_VERSIONS:
        raise CodecError(f"unsupported format version {version}: this reader knows versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}; a newer kvcast made the object, update kvcast "
                         "or re-encode the context with this one")
    if flags != 0:
        raise CodecError(f"unknown flags 0x{flags:04x}")
    if hlen > MAX_HEADER_BYTES:
        raise CodecError(f"header length {hlen} exceeds {MAX_HEADER_BYTES}: corrupt prefix")
    expected = PREFIX.size + hlen + blen + CRC.size
    if len(data) < expected:
        raise CodecError(f"truncated object: {len(data)} bytes, the prefix announces {expected}")
    if len(data) > expected:
        raise CodecError(f"{len(data) - expected} trailing bytes after the object (expected {expected} bytes)")
    return hlen, blen, version


def unpack(data: bytes | memoryview, *, verify: bool = True) -> Unpacked:
    """Parse and check an object. Raises `CodecError` for anything corrupt, truncated or foreign."""
    hlen, blen, version = _read_prefix(data)
    mv = memoryview(data)
    end = PREFIX.size + hlen + blen
    if verify:
        (stored,) = CRC.unpack_from(mv, end)
        actual = crc32c.crc32c(mv[:end])
        if stored != actual:
            raise CodecError(f"checksum mismatch (stored {stored:08x}, computed {actual:08x}): corrupt object")
    try:
        header = json.loads(bytes(mv[PREFIX.size:PREFIX.size + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CodecError(f"header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("sections"), list):
        raise CodecError("header is not a JSON object with a 'sections' list")
    sections: dict[str, Any] = {}
    offset = PREFIX.size + hlen
    sizes = {"side": 0, "payload": 0}
    for entry in header["sections"]:
        try:
            name, dtype, shape, nbytes, role = (entry["name"], entry["dtype"], entry["shape"], entry["nbytes"],
                                                entry["role"])
            shape = [int(x) for x in shape]
            nbytes = int(nbytes)
        except (KeyError, TypeError, ValueError):
            raise CodecError(f"malformed section entry {entry!r}") from None
        if dtype not in DTYPES or role not in ROLES or name in sections or any(x < 0 for x in shape):
            raise CodecError(f"malformed section entry {entry!r}")
        itemsize = np.dtype(DTYPES[dtype]).itemsize
        if nbytes != int(np.prod(shape, dtype=np.int64)) * itemsize:
            raise CodecError(f"section {name!r}: {nbytes} bytes do not match shape {shape} of {dtype}")
        if offset + nbytes > end:
            raise CodecError(f"section {name!r} runs past the end of the body")
        chunk = mv[offset:offset + nbytes]
        if dtype == "bytes":
            sections[name] = chunk
        else:
            sections[name] = np.frombuffer(chunk, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<")).reshape(shape)
        sizes[role] += nbytes
        offset += nbytes
    if offset != end:
        raise CodecError(f"sections cover {offset - PREFIX.size - hlen} bytes but the body has {blen}")
    return Unpacked(header=header, sections=sections, header_bytes=PREFIX.size + hlen + CRC.size,
                    side_bytes=sizes["side"], payload_bytes=sizes["payload"], total_bytes=end + CRC.size,
                    version=version)
