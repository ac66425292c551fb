"""Where a conversion reads from and writes to.

The converter sees two small protocols so the same code streams from a local directory or
(in the service) from object storage one file at a time: a source hands out one file as a
local path for the duration of a ``with`` block; a destination hands out a local staging
path and is told when the file is complete, so it can upload it right away.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Protocol

from loftq.errors import SourceNotFound, UnsafePath

MANIFEST_NAME = "manifest.json"
"""Written last, listing every file with its sha256: a destination holding it holds a complete
checkpoint (here, torch-free, for the service's destinations as well as the converter)."""

REPORT_NAME = "loftq_report.json"
"""The conversion's report (``loftq.report.Report.to_dict``), listed in the manifest."""


class Source(Protocol):
    name: str  # recorded as base_model_name_or_path

    def list_files(self) -> list[str]:
        """Relative POSIX paths of every file of the checkpoint."""

    def open_local(self, name: str) -> contextlib.AbstractContextManager[Path]:
        """A local path holding file ``name``, valid inside the ``with`` block."""


class Destination(Protocol):
    def staging_path(self, name: str) -> Path:
        """A local path to write file ``name`` to; parent directories exist."""

    def publish(self, name: str, sha256: str | None = None) -> None:
        """The staged file is complete: make it part of the output (upload it, for object
        storage). ``sha256``, when the caller already has it, spares a second read."""

    def read_text(self, name: str) -> str | None:
        """The published file's text, or None when it does not exist."""

    def open_local(self, name: str) -> contextlib.AbstractContextManager[Path]:
        """A local path holding the published file ``name``, valid inside the ``with`` block."""

    def sha256(self, name: str) -> str | None:
        """The published file's sha256, or None when it does not exist."""

    def remove(self, name: str) -> None:
        """Delete a published file or directory if present."""


def canonical_relative(name: str) -> str:
    """``name`` unchanged if it is a canonical relative POSIX path ("a/b.json"): not empty, no
    NUL, not absolute, no "..", and spelled as its normal form; UnsafePath otherwise. The one
    check behind every name the service reads or writes (object keys, listed files)."""
    path = PurePosixPath(name)
    if not name or "\x00" in name or path.is_absolute() or ".." in path.parts or str(path) != name or name == ".":
        raise UnsafePath(f"unsafe file name {name!r} in checkpoint")
    return name


def safe_relative(name: str) -> str:
    """Refuse names that would escape the checkpoint directory. Names from a checkpoint's own
    files ("./model.safetensors", "a//b") are normalised first, then held to ``canonical_relative``."""
    if "\x00" in name:
        raise UnsafePath(f"unsafe file name {name!r} in checkpoint")
    return canonical_relative(str(PurePosixPath(name)))


class LocalSource:
    """A checkpoint directory on local disk."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.name = str(root)
        if not self.root.is_dir():
            raise SourceNotFound("no such checkpoint directory", path=str(root))

    def list_files(self) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())

    @contextlib.contextmanager
    def open_local(self, name: str) -> Iterator[Path]:
        path = self.root / safe_relative(name)
        if not path.is_file():
            raise SourceNotFound("file is missing from the checkpoint", path=str(path))
        yield path


class LocalDestination:
    """An output directory on local disk: staging paths are the final paths."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def staging_path(self, name: str) -> Path:
        path = self.root / safe_relative(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, name: str, sha256: str | None = None) -> None:
        pass

    def read_text(self, name: str) -> str | None:
        path = self.root / safe_relative(name)
        return path.read_text() if path.is_file() else None

    @contextlib.contextmanager
    def open_local(self, name: str) -> Iterator[Path]:
        path = self.root / safe_relative(name)
        if not path.is_file():
            raise SourceNotFound("file is missing from the output", path=str(path))
        yield path

    def sha256(self, name: str) -> str | None:
        path = self.root / safe_relative(name)
        return sha256_file(path) if path.is_file() else None

    def remove(self, name: str) -> None:
        path = self.root / safe_relative(name)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def sha256_file(path: str | os.PathLike[str], chunk: int = 8 << 20) -> str:
    """sha256 hex digest of a file, read in ``chunk``-byte pieces so memory stays flat."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()
