"""Helpers of the tests in tests/streamer/serve/ (plain code; the fixtures are in conftest.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from kvcast.streamer.store import (
    Manifest,
    Store,
    StoreError,
)
from tests.factories import SERVE_TOKEN as TOKEN
from tests.factories import MemoryStore
from tests.factories import put_synthetic_context as put_context

AUTH = {"Authorization": f"Bearer {TOKEN}"}


SECRET = b"TOP-SECRET-FILE-CONTENT"


class BrokenStore(MemoryStore):
    """A store whose backend is down: every call raises `StoreError`."""

    def __getattribute__(self, name: str) -> Any:
        if name in ("get_object", "object_size", "get_manifest", "contexts", "object_keys", "has_object"):
            def down(*args: Any, **kwargs: Any) -> Any:
                raise StoreError("connection refused (test)")
            return down
        return super().__getattribute__(name)


@dataclass
class Fixture:
    """A store holding context ``ctx-1`` (3 chunks at raw and int8) and its objects."""

    store: Store
    manifest: Manifest
    objects: list[dict[str, bytes]]
    secret: Path


def _fill(store: Store, root: Path) -> Fixture:
    rng = os.urandom
    objects = [{"raw": rng(700_000), "int8": rng(350_000)}, {"raw": rng(10_000), "int8": rng(5_000)},
               {"raw": rng(1), "int8": b""}]
    manifest = put_context(store, "ctx-1", objects)
    secret = root / "secret.txt"
    secret.write_bytes(SECRET)
    return Fixture(store, manifest, objects, secret)


def _dir_store(tmp_path: Path) -> Store:
    try:
        from kvcast.streamer.store.dir import DirStore
    except ImportError:
        pytest.skip("kvcast.streamer.store.dir is not there yet")
    return DirStore("dir://" + str(tmp_path / "store"))


def run_with_client(app: web.Application, body: Callable[[TestClient], Awaitable[Any]], timeout: float = 20.0) -> Any:
    """Serve `app` on a loopback port and run ``body(client)`` in a fresh event loop (bounded by `timeout`)."""

    async def main() -> Any:
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            return await asyncio.wait_for(body(client), timeout)

    return asyncio.run(main())


async def raw_request(client: TestClient, head: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send `head` (a request's bytes, verbatim: no URL normalisation) and read the answer until the server
    closes the connection. Returns (status, headers with lowercase names, body)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(head)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    header, _, body = data.partition(b"\r\n\r\n")
    lines = header.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body
