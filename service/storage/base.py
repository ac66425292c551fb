"""What every artifact store offers, and the key rules they all enforce.

Keys are POSIX relative paths ("jobs/<id>/manifest.json"); every backend refuses keys that
could escape its root ("..", absolute paths, NUL), so a key that is safe for one is safe for
the others.

The key check is stricter than ``loftq.storage.safe_relative``: it refuses non-canonical
spellings instead of normalising them, because S3 treats them as other keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from loftq.errors import LoftQError, UnsafePath
from loftq.storage import canonical_relative
from service.errors import ServiceError

COPY_CHUNK = 8 << 20
"""Bytes copied or hashed at a time, so no object is ever whole in memory."""


class UnsafeKey(LoftQError, ValueError):
    """A key that could escape the storage root. A LoftQError, so the engine reports it like
    ``loftq.storage.safe_relative`` does, and a ValueError for callers that are not the engine."""

    code = "unsafe_key"


class StorageUnavailable(ServiceError):
    """Object storage kept failing (5xx, throttling, connection errors or resets) after every
    retry. A ServiceError, so a job fails with this code and the API answers 503; the message
    names the operation, the object and the attempts made."""

    code = "storage_unavailable"


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int


class ObjectStore(Protocol):
    def upload_file(self, path: Path, key: str, *, sha256: str | None = None) -> None: ...

    def download_file(self, key: str, path: Path) -> None: ...

    def read_bytes(self, key: str) -> bytes | None: ...

    def sha256(self, key: str) -> str | None: ...

    def list(self, prefix: str) -> list[StoredObject]: ...

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> None: ...

    def presigned_url(self, key: str, expires_in: int) -> str | None: ...

    def presigned_put_url(self, key: str, expires_in: int) -> str | None: ...

    def open_read(self, key: str) -> BinaryIO: ...

    def ping(self) -> bool: ...


def safe_key(key: str) -> str:
    """``key`` unchanged if it is a canonical relative POSIX path; UnsafeKey otherwise.

    Non-canonical spellings ("a//b", "./a", "a/") are refused rather than normalised: on S3
    they name different objects than their normal form, so accepting them would make the
    backends disagree."""
    if not isinstance(key, str) or "\\" in key:
        raise UnsafeKey(f"unsafe storage key {key!r}")
    try:
        return canonical_relative(key)
    except UnsafePath:
        raise UnsafeKey(f"unsafe storage key {key!r}") from None


def safe_prefix(prefix: str, *, allow_empty: bool = True) -> str:
    """A key prefix: a safe key, optionally ending in "/", or "" (everything) when allowed."""
    if prefix == "":
        if not allow_empty:
            raise UnsafeKey("an empty prefix would name every object")
        return prefix
    safe_key(prefix.removesuffix("/"))
    return prefix
