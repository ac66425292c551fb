"""Artifacts as files in a directory on local disk: one machine, or a shared volume.

Writes are atomic (a temporary file, then a rename), so a reader never sees half an object;
symlinks planted under the root cannot lead out of it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from loftq.storage import sha256_file
from service.settings import Settings
from service.storage.base import COPY_CHUNK, StoredObject, UnsafeKey, safe_key, safe_prefix


class LocalObjectStore:
    """Objects are files under ``root``; writes are atomic (temporary file, then rename)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = self.root / safe_key(key)
        # A symlink planted under the root must not lead out of it.
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise UnsafeKey(f"storage key {key!r} leads outside the storage root")
        return path

    def upload_file(self, path: Path, key: str, *, sha256: str | None = None) -> None:
        with open(path, "rb") as src, self.writer(key) as dst:
            shutil.copyfileobj(src, dst, COPY_CHUNK)

    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        """A file to write the object into; it appears under ``key`` only once the block
        completes (a write that fails or is cut off leaves nothing behind)."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".upload")
        try:
            with os.fdopen(fd, "wb") as dst:
                yield dst
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def download_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise FileNotFoundError(f"no object {key!r}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)

    def read_bytes(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None

    def sha256(self, key: str) -> str | None:
        path = self._path(key)
        return sha256_file(path) if path.is_file() else None

    def list(self, prefix: str) -> list[StoredObject]:
        prefix = safe_prefix(prefix)
        # Walk only the directory the prefix lies in, then match the rest as a string prefix.
        base = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        found = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for filename in filenames:
                path = Path(dirpath) / filename
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix) and not _is_upload_temp(filename):
                    found.append(StoredObject(key, path.stat().st_size))
        return sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_file() or path.is_symlink():
            path.unlink(missing_ok=True)
            self._prune(path.parent)

    def delete_prefix(self, prefix: str) -> None:
        prefix = safe_prefix(prefix, allow_empty=False)
        for obj in self.list(prefix):
            self.delete(obj.key)

    def _prune(self, directory: Path) -> None:
        """Remove directories left empty, up to (not including) the root."""
        root = self.root.resolve()
        while directory.resolve() != root and directory.resolve().is_relative_to(root):
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    def presigned_url(self, key: str, expires_in: int) -> str | None:
        safe_key(key)
        return None  # the API streams local artifacts itself (open_read)

    def presigned_put_url(self, key: str, expires_in: int) -> str | None:
        safe_key(key)
        return None  # the API receives local uploads itself (writer)

    def open_read(self, key: str) -> BinaryIO:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no object {key!r}")
        return open(path, "rb")

    def ping(self) -> bool:
        return self.root.is_dir() and os.access(self.root, os.W_OK)


def _is_upload_temp(filename: str) -> bool:
    return filename.startswith(".") and filename.endswith(".upload")


def local_store(settings: Settings) -> LocalObjectStore:
    """The artifact directory the settings name (``storage=local``)."""
    return LocalObjectStore(settings.local_storage_root)
