"""`DirStore`: the store in a folder (``dir://PATH``; a plain path means the same).

Layout::

    PATH/objects/ab/abcdef...   one file per object, named by its key (fan-out by the key's first two digits)
    PATH/manifests/<id>.json    one manifest per context (`kvcast.streamer.store.Manifest.to_json`)
    PATH/.lock                  taken (flock) by manifest writes and by garbage collection

Every file is written to a temporary file in its own folder (``.tmp-<host>-<pid>-<random>``, a name no key or
context id can have), flushed, fsynced and renamed into place, then the folder is fsynced: a reader sees a
whole file or none, and a crash leaves at most a temporary file, which listings ignore and `collect_garbage`
removes (at once when its writer is a dead process of this host, else after `STALE_TEMP_S`). Objects are
linked into place (never replaced), so the first writer of a key wins. `put_manifest` checks, under the lock,
that every object it names exists, and garbage collection takes the same lock, so a collection never removes
an object that a manifest written meanwhile names. Paths are only ever built from validated keys and context
ids. One instance may be used from several threads and several processes may share the folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from kvcast.streamer.store.base import (
    Manifest,
    NotFound,
    Store,
    StoreError,
    check_context_id,
    check_key,
    check_range,
    is_context_id,
    is_key,
    parse_stored_manifest,
)

__all__ = ["STALE_TEMP_S", "DirStore"]

STALE_TEMP_S = 3600.0
"""A temporary file of another host, or of a process that may be alive, is removed by `collect_garbage` only
once it is this old."""
_TEMP_PREFIX = ".tmp-"
_TEMP = re.compile(r"\.tmp-(?P<host>[A-Za-z0-9_-]{0,64})-(?P<pid>[0-9]+)-[0-9a-f]{16}")
_FANOUT = re.compile(r"[0-9a-f]{2}")
_MAX_MISSING_SHOWN = 3


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64]


class DirStore(Store):
    """Content-addressed objects and manifests in a folder (see the module docstring)."""

    def __init__(self, url: str) -> None:
        if not isinstance(url, str) or not url.startswith("dir://"):
            raise StoreError(f"not a dir:// store URL: {url!r}")
        text = url[len("dir://"):]
        if not text or "?" in text or "#" in text or "\0" in text:
            raise StoreError(f"bad store URL {url!r}: expected dir://PATH (a folder)")
        root = Path(text).expanduser()
        self.root = root if root.is_absolute() else Path.cwd() / root
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store {self.root} is not a folder")
        self.url = "dir://" + str(self.root)
        self._objects = self.root / "objects"
        self._manifests = self.root / "manifests"

    def __repr__(self) -> str:
        return f"DirStore({self.url!r})"

    # -- paths (only from validated names) ------------------------------------------------------------------

    def _object_path(self, key: str) -> Path:
        key = check_key(key)
        return self._objects / key[:2] / key

    def _manifest_path(self, context_id: str) -> Path:
        return self._manifests / f"{check_context_id(context_id)}.json"

    # -- objects --------------------------------------------------------------------------------------------

    def put_object(self, key: str, data: bytes) -> None:
        path = self._object_path(key)
        data = _as_bytes(data)
        if path.is_file():
            return
        with self._errors(f"writing object {key}"):
            folder = path.parent
            folder.mkdir(parents=True, exist_ok=True)
            tmp = self._write_temp(folder, data)
            try:
                os.link(tmp, path)  # fails if the key exists: objects are never replaced
            except FileExistsError:
                pass
            except OSError as exc:  # a filesystem without hard links: rename unless present
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                if not path.exists():
                    os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            _fsync_dir(folder)

    def get_object(self, key: str, start: int = 0, stop: int | None = None) -> bytes:
        path = self._object_path(key)
        check_range(start, stop)
        try:
            with open(path, "rb") as f:
                if stop is not None and stop <= start:
                    return b""
                f.seek(start)
                return f.read() if stop is None else f.read(stop - start)
        except FileNotFoundError:
            raise NotFound(f"no object {key} in {self.url}") from None
        except OSError as exc:
            raise StoreError(f"reading object {key} in {self.url}: {exc}") from None

    def object_size(self, key: str) -> int:
        path = self._object_path(key)
        try:
            return path.stat().st_size
        except FileNotFoundError:
            raise NotFound(f"no object {key} in {self.url}") from None
        except OSError as exc:
            raise StoreError(f"reading object {key} in {self.url}: {exc}") from None

    def has_object(self, key: str) -> bool:
        return self._object_path(key).is_file()

    def delete_object(self, key: str) -> None:
        path = self._object_path(key)
        with self._errors(f"removing object {key}"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                return
            _fsync_dir(path.parent)

    def object_keys(self) -> list[str]:
        keys = []
        for folder in self._list(self._objects):
            if not _FANOUT.fullmatch(folder):
                continue
            keys.extend(name for name in self._list(self._objects / folder)
                        if is_key(name) and name[:2] == folder)
        return sorted(keys)

    # -- manifests ------------------------------------------------------------------------------------------

    def put_manifest(self, manifest: Manifest) -> None:
        if not isinstance(manifest, Manifest):
            raise StoreError(f"expected a Manifest, got {type(manifest).__name__}")
        path = self._manifest_path(manifest.context_id)
        keys = sorted(set(manifest.keys()))
        for key in keys:
            check_key(key)
        data = manifest.to_json().encode()
        Manifest.from_json(data)  # never store what could not be read back
        with self._lock():
            missing = [k for k in keys if not self._object_path(k).is_file()]
            if missing:
                raise StoreError(f"manifest of {manifest.context_id!r} names {len(missing)} missing object(s) "
                                 f"(e.g. {', '.join(missing[:_MAX_MISSING_SHOWN])}); put the objects first")
            with self._errors(f"writing the manifest of {manifest.context_id!r}"):
                self._manifests.mkdir(parents=True, exist_ok=True)
                tmp = self._write_temp(self._manifests, data)
                try:
                    os.replace(tmp, path)
                except BaseException:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                    raise
                _fsync_dir(self._manifests)

    def get_manifest(self, context_id: str) -> Manifest:
        path = self._manifest_path(context_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no context {context_id!r} in {self.url}") from None
        except OSError as exc:
            raise StoreError(f"reading the manifest of {context_id!r} in {self.url}: {exc}") from None
        return parse_stored_manifest(data, context_id, self.url)

    def delete_manifest(self, context_id: str) -> None:
        path = self._manifest_path(context_id)
        with self._errors(f"removing the manifest of {context_id!r}"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                return
            _fsync_dir(self._manifests)

    def contexts(self) -> list[str]:
        return sorted(name[:-5] for name in self._list(self._manifests)
                      if name.endswith(".json") and is_context_id(name[:-5]))

    # -- garbage collection ---------------------------------------------------------------------------------

    def _collect(self, candidates: set[str]) -> int:
        with self._lock():
            freed = super()._collect(candidates)
        return freed

    def collect_garbage(self) -> int:
        """Remove every object no manifest names and the temporary files of interrupted writes; bytes freed."""
        freed = super().collect_garbage()
        for path in self.temp_files():
            with contextlib.suppress(OSError):
                size = path.stat().st_size
                if self._temp_is_stale(path):
                    os.unlink(path)
                    freed += size
        return freed

    def temp_files(self) -> list[Path]:
        """Temporary files of writes in progress or interrupted (never listed as objects or contexts)."""
        folders = [self._manifests, self._objects]
        folders += [self._objects / f for f in self._list(self._objects) if _FANOUT.fullmatch(f)]
        return [folder / name for folder in folders for name in self._list(folder) if _TEMP.fullmatch(name)]

    def _temp_is_stale(self, path: Path) -> bool:
        match = _TEMP.fullmatch(path.name)
        if match is None:
            return False
        if match["host"] == _host() and not _pid_alive(int(match["pid"])):
            return True
        return time.time() - path.stat().st_mtime > STALE_TEMP_S

    # -- helpers --------------------------------------------------------------------------------------------

    def _write_temp(self, folder: Path, data: bytes) -> Path:
        tmp = folder / f"{_TEMP_PREFIX}{_host()}-{os.getpid()}-{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        os.close(fd)
        return tmp

    def _list(self, folder: Path) -> list[str]:
        try:
            return os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise StoreError(f"listing {folder}: {exc}") from None

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """The store-wide lock of manifest writes and garbage collection (threads and processes alike: each
        call opens its own file description)."""
        with self._errors("locking the store"):
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except StoreError:
            raise
        except OSError as exc:
            raise StoreError(f"{what} in {self.url}: {exc}") from None


def _as_bytes(data: bytes) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise StoreError(f"object data must be bytes, got {type(data).__name__}")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot fsync a folder
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
