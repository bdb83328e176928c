"""Every docstring example of kvcast runs: the doctests of each module, under its kvcast.* name."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("kvcast", "kvcast.codec", "kvcast.streamer", "kvcast.netsim", "kvcast.policies", "kvcast.traces")


def _modules() -> list[str]:
    # Each part is walked from its own package: in a source checkout they live beside kvcast/, not in it.
    names = set(PACKAGES)
    for package in PACKAGES:
        path = importlib.import_module(package).__path__
        names |= {info.name for info in pkgutil.walk_packages(path, package + ".")}
    return sorted(n for n in names if not n.endswith("__main__"))


MODULES = _modules()


# Modules whose docstrings show how to use them: their examples must exist (and run, below).
WITH_EXAMPLES = {
    "kvcast.codec": 10, "kvcast.codec.hf": 5, "kvcast.policies.base": 3, "kvcast.policies.registry": 2,
    "kvcast.policies.dryrun": 2, "kvcast.policies.planning.model": 1, "kvcast.policies.planning.options": 1,
    "kvcast.netsim.virtual_time": 3, "kvcast.netsim.trace_link": 3, "kvcast.traces.trace": 2,
}


def test_modules_are_found():
    assert {"kvcast.codec", "kvcast.streamer.engine", "kvcast.policies.base", "kvcast.traces.trace"} <= set(MODULES)
    assert set(WITH_EXAMPLES) <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True,
                             verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
    assert result.attempted >= WITH_EXAMPLES.get(name, 0), f"{name} lost its usage examples"
