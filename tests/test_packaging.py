"""One import namespace: the wheel installs only `kvcast`, and no code imports a bare part name."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.factories import REPO_ROOT

ROOT = REPO_ROOT
PARTS = ("codec", "streamer", "netsim", "policies", "traces")
SOURCE_FOLDERS = ("kvcast", *PARTS, "tests", "scripts")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy of the sources: an in-tree build would leave build/ behind, and a stale build/lib could
    # slip deleted modules into the wheel.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    for folder in ("kvcast", *PARTS):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(src)], check=True, capture_output=True, cwd=out)
    (found,) = out.glob("kvcast-*.whl")
    return found


def test_wheel_holds_only_the_kvcast_package(wheel):
    tops = {name.split("/", 1)[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"kvcast"}
    names = zipfile.ZipFile(wheel).namelist()
    for part in PARTS:
        assert f"kvcast/{part}/__init__.py" in names
    assert "kvcast/codec/tables/smollm2-135m-instruct.safetensors" in names
    assert "kvcast/streamer/default_profile.json" in names
    # Every module of the source folders (a new subpackage must be listed in pyproject's packages).
    for part in PARTS:
        for path in sorted((ROOT / part).rglob("*.py")):
            assert f"kvcast/{path.relative_to(ROOT).as_posix()}" in names, f"{path} is not in the wheel"
    for path in sorted((ROOT / "kvcast").rglob("*.py")):
        assert f"kvcast/{path.relative_to(ROOT / 'kvcast').as_posix()}" in names, f"{path} is not in the wheel"


def test_installed_wheel_imports_every_module_and_no_bare_name(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = f"""
import importlib, importlib.util, json, pkgutil, sys
sys.path.insert(0, {str(site)!r})
import kvcast
assert kvcast.__file__.startswith({str(site)!r}), kvcast.__file__
modules = []
for info in pkgutil.walk_packages(kvcast.__path__, "kvcast."):
    if info.name.endswith("__main__"):
        continue
    mod = importlib.import_module(info.name)
    assert mod.__file__.startswith({str(site)!r}), (info.name, mod.__file__)
    modules.append(info.name)
# Package resources are found under the kvcast names.
from kvcast.streamer.profile import default_profile
from kvcast.streamer.menus import recompute_cost
from kvcast.traces.defaults import default_traces
assert default_profile().levels and default_traces()
assert recompute_cost("h100/mistral-7b").a_s_per_token > 0
bare = {{}}
for name in {PARTS!r}:
    spec = importlib.util.find_spec(name)
    if spec is not None:
        bare[name] = spec.origin
print(json.dumps({{"modules": modules, "bare": bare}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    for part in PARTS:
        assert f"kvcast.{part}" in result["modules"]
    assert "kvcast.codec.api" in result["modules"] and "kvcast.streamer.engine" in result["modules"]
    # A same-named package of someone else's may exist in a user's environment, but never one of ours.
    ours = [n for n, origin in result["bare"].items() if origin and (str(ROOT) in origin or str(site) in origin)]
    assert not ours, f"bare top-level names importable from kvcast's files: {ours}"


def _python_files():
    for folder in SOURCE_FOLDERS:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_no_code_imports_a_bare_part_name():
    bad = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            bad += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in PARTS]
        text = path.read_text()
        bad += [f"{path.relative_to(ROOT)}: module string {m!r}"
                for m in re.findall(rf"[\"'](?:-m\s+)?(?:{'|'.join(PARTS)})\.[a-z_]+[\"']", text)]
        bad += [f"{path.relative_to(ROOT)}: package name {m!r}"
                for m in re.findall(rf"(?:files|import_module|find_spec)\(\s*[\"']({'|'.join(PARTS)})[\"']", text)]
    assert not bad, "bare imports (use kvcast.<part>):\n" + "\n".join(bad)
