"""Fixtures of the store tests: a real redis-server, stores of both backends, a reference store in memory, a
tiny causal LM saved to a folder (the ``--model`` of ``kvcast store put``), and consistency checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kvcast.streamer.store import Store, open_store
from tests.factories import (
    REDIS_BINARY,
    RedisServer,
    free_port,
    save_tiny_model,
)
from tests.streamer.store.support import (
    unique_prefix,
)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> RedisServer:
    """A real redis-server for the session (skips only when the binary is missing)."""
    pytest.importorskip("redis", reason="the redis package (kvcast[redis]) is not installed")
    binary = shutil.which(REDIS_BINARY)
    if binary is None:
        pytest.skip(f"{REDIS_BINARY} not found on PATH (apt-get install redis-server): Redis store tests skipped")
    server = RedisServer(binary, free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_store(redis_server) -> Store:
    """A `RedisStore` under a prefix of its own."""
    store = open_store(redis_server.url(unique_prefix()))
    yield store
    store.close()


@pytest.fixture
def dir_store(tmp_path) -> Store:
    store = open_store(tmp_path / "store")
    yield store
    store.close()


@pytest.fixture(params=["dir", "redis"])
def any_store(request) -> Store:
    """Each backend in turn."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The folder of the tiny model (``--model DIR``)."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")  # a Llama (tests.factories)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """The tiny model loaded (`kvcast.codec.model.load_model`), once per test process."""
    from kvcast.codec.model import load_model

    return load_model(tiny_model_dir, progress=False)
