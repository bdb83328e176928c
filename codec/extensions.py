"""Building the codec's C++ and CUDA extensions at run time, once, cached per torch version.

`build_extension` compiles sources with torch's extension builder (``torch.utils.cpp_extension.load``) into
``$KVCAST_CACHE_DIR/torch_extensions/torch-<version>/<name>`` (default ``~/.cache/kvcast``), under a
``flock`` so that concurrent processes (the coder workers, pytest-xdist) build once and wait for each other.
A build that fails raises `CodecError` with the compiler's message: a machine without a C++ compiler, or
without a CUDA toolchain for the GPU coder, gets a clear error, never a half-built module.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from kvcast.codec.errors import CodecError

CSRC = Path(__file__).resolve().parent / "csrc"
"""The codec's C++/CUDA sources (shipped with the package)."""


def cache_root() -> Path:
    """``$KVCAST_CACHE_DIR`` (default ``~/.cache/kvcast``)."""
    return Path(os.environ.get("KVCAST_CACHE_DIR") or Path.home() / ".cache" / "kvcast")


def extension_dir(name: str) -> Path:
    """Where extension `name` is built: per torch version (and CUDA version, where there is one)."""
    tag = f"torch-{torch.__version__}"
    return cache_root() / "torch_extensions" / tag / name


def build_extension(name: str, sources: Sequence[Path], *, cflags: Sequence[str] = ("-O3",),
                    cuda_cflags: Sequence[str] = (), what: str = "C++"):
    """Compile (or load the cached build of) extension `name` from `sources`; `CodecError` if it fails."""
    from torch.utils.cpp_extension import load

    build = extension_dir(name)
    build.mkdir(parents=True, exist_ok=True)
    # torch's builder guards its folder with a lock *file*; a process killed inside `load` (SIGKILL, the OOM
    # killer) leaves it behind and every later process waits for it forever. Our own flock is released by the
    # kernel when its holder dies, so while we hold it any lock file in the folder is stale: remove it.
    with open(build.parent / f"{name}.flock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (build / "lock").unlink(missing_ok=True)
        try:
            return load(name=name, sources=[str(s) for s in sources], extra_cflags=list(cflags),
                        extra_cuda_cflags=list(cuda_cflags) or None, extra_include_paths=[str(CSRC)],
                        verbose=False, build_directory=str(build))
        except Exception as exc:  # the compiler's message, whatever torch wrapped it in
            raise CodecError(f"could not build kvcast's {what} extension {name!r} in {build}: {exc}") from exc
