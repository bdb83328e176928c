"""Fixtures of the `kvcast serve` tests: an in-memory `Store`, contexts of random objects, a served app.

pytest-aiohttp is not used: each test runs its coroutine with `asyncio.run` (`run_with_client`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import MemoryStore
from tests.streamer.serve.support import (
    Fixture,
    _dir_store,
    _fill,
)


@pytest.fixture
def memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fixture:
    monkeypatch.chdir(tmp_path)  # a secret file in the working folder too: relative paths must not reach it
    return _fill(MemoryStore(), tmp_path)


@pytest.fixture(params=["memory", "dir"])
def stored(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fixture:
    """The fixture context in each backend: the in-memory store and a `DirStore` (the secret file sits beside
    the store's folder and in the working folder)."""
    monkeypatch.chdir(tmp_path)
    store = MemoryStore() if request.param == "memory" else _dir_store(tmp_path)
    return _fill(store, tmp_path)
