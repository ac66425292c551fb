"""Artifact storage shared by the API (download links, local downloads) and the worker (uploads).

Two backends behind one small protocol: a directory on local disk, and an S3-compatible
bucket (AWS, MinIO, moto). Keys are POSIX relative paths ("jobs/<id>/manifest.json"); both
backends refuse keys that could escape their root ("..", absolute paths, NUL), so a key that
is safe for one is safe for the other.

No torch here. The key check is stricter than ``loftq.storage.safe_relative``: it refuses
non-canonical spellings instead of normalising them, because S3 treats them as other keys.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol

from loftq.errors import LoftQError
from loftq.storage import sha256_file

from api.settings import Settings

_COPY_CHUNK = 8 << 20
MULTIPART_THRESHOLD = 64 * 2**20
"""Files above this size are uploaded (and downloaded) in parts by the transfer manager."""



class UnsafeKey(LoftQError, ValueError):
    """A key that could escape the storage root. A LoftQError, so the engine reports it like
    ``loftq.storage.safe_relative`` does, and a ValueError for callers that are not the engine."""

    code = "unsafe_key"


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

    def open_read(self, key: str) -> BinaryIO: ...

    def ping(self) -> bool: ...


def safe_key(key: str) -> str:
    """``key`` unchanged if it is a canonical relative POSIX path; UnsafeKey otherwise.

    Non-canonical spellings ("a//b", "./a", "a/") are refused rather than normalised: on S3
    they name different objects than their normal form, so accepting them would make the two
    backends disagree."""
    if not isinstance(key, str) or not key or "\x00" in key or "\\" in key:
        raise UnsafeKey(f"unsafe storage key {key!r}")
    path = PurePosixPath(key)
    if path.is_absolute() or ".." in path.parts or str(path) != key or key == ".":
        raise UnsafeKey(f"unsafe storage key {key!r}")
    return key


def safe_prefix(prefix: str, *, allow_empty: bool = True) -> str:
    """A key prefix: a safe key, optionally ending in "/", or "" (everything) when allowed."""
    if prefix == "":
        if not allow_empty:
            raise UnsafeKey("an empty prefix would name every object")
        return prefix
    safe_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


# --------------------------------------------------------------------------- local disk


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
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".upload")
        try:
            with open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst, _COPY_CHUNK)
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

    def open_read(self, key: str) -> BinaryIO:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no object {key!r}")
        return open(path, "rb")

    def ping(self) -> bool:
        return self.root.is_dir() and os.access(self.root, os.W_OK)


def _is_upload_temp(filename: str) -> bool:
    return filename.startswith(".") and filename.endswith(".upload")


# --------------------------------------------------------------------------- S3


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _is_missing(exc: Exception) -> bool:
    return _error_code(exc) in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


class S3ObjectStore:
    """An S3-compatible bucket. Uploads and downloads go through boto3's transfer manager,
    multipart above ``multipart_threshold``; every upload carries its sha256 in the object's
    metadata ("sha256"), so checking a file never needs to read it back."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        client: Any = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        max_concurrency: int = 8,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.region = region
        if client is None:
            config = Config(
                signature_version="s3v4",
                retries={"max_attempts": 5, "mode": "standard"},
                # MinIO, moto and other endpoints given by address serve buckets by path.
                s3={"addressing_style": "path" if endpoint_url else "auto"},
            )
            client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        self.client = client
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=max(multipart_threshold, 5 * 2**20),  # S3's smallest part is 5 MiB
            max_concurrency=max_concurrency,
        )

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if not _is_missing(exc):
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self.client.create_bucket(**kwargs)
        except ClientError as exc:
            if _error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def upload_file(self, path: Path, key: str, *, sha256: str | None = None) -> None:
        safe_key(key)
        digest = sha256 or sha256_file(path)
        self.client.upload_file(
            str(path), self.bucket, key, ExtraArgs={"Metadata": {"sha256": digest}}, Config=self.transfer_config
        )

    def download_file(self, key: str, path: Path) -> None:
        from botocore.exceptions import ClientError

        safe_key(key)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, key, str(path), Config=self.transfer_config)
        except ClientError as exc:
            if _is_missing(exc):
                raise FileNotFoundError(f"no object {key!r} in bucket {self.bucket!r}") from exc
            raise

    def read_bytes(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        safe_key(key)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise
        with response["Body"] as body:
            return body.read()

    def sha256(self, key: str) -> str | None:
        from botocore.exceptions import ClientError

        safe_key(key)
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise
        recorded = head.get("Metadata", {}).get("sha256")
        if recorded:
            return recorded
        # Written by someone else: hash it as a stream (never whole in memory).
        digest = hashlib.sha256()
        with self.open_read(key) as body:
            while chunk := body.read(_COPY_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def list(self, prefix: str) -> list[StoredObject]:
        prefix = safe_prefix(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        found = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                found.append(StoredObject(item["Key"], int(item["Size"])))
        return sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        safe_key(key)
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def delete_prefix(self, prefix: str) -> None:
        prefix = safe_prefix(prefix, allow_empty=False)
        keys = [obj.key for obj in self.list(prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            response = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise OSError(f"could not delete {len(errors)} objects, e.g. {first.get('Key')!r}: {first.get('Message')}")

    def presigned_url(self, key: str, expires_in: int) -> str | None:
        safe_key(key)
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=int(expires_in)
        )

    def open_read(self, key: str) -> BinaryIO:
        from botocore.exceptions import ClientError

        safe_key(key)
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        except ClientError as exc:
            if _is_missing(exc):
                raise FileNotFoundError(f"no object {key!r} in bucket {self.bucket!r}") from exc
            raise

    def ping(self) -> bool:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception:
            return False
        return True


def store_from_settings(settings: Settings) -> ObjectStore:
    if settings.storage == "s3":
        return S3ObjectStore(settings.s3_bucket, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    return LocalObjectStore(settings.local_storage_root)
