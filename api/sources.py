"""Validation of job source URIs: s3://bucket/prefix/, file:// under the allowed roots,
hf://org/name[@revision]. Torch-free, so the API refuses a bad source before queueing."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote

from api.errors import InvalidSource
from api.settings import Settings

SCHEMES = ("s3", "file", "hf")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_HF_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HF_REVISION = re.compile(r"[A-Za-z0-9._/-]+")


# --------------------------------------------------------------------------- URIs


def _segments_ok(uri: str, path: str) -> None:
    if any(part in ("..", ".") for part in path.split("/")):
        raise InvalidSource(f"{uri!r}: '.' and '..' path segments are not allowed")


def file_root_match(path: Path, roots: list[Path]) -> Path | None:
    for root in roots:
        real_root = Path(os.path.realpath(root))
        if path == real_root or path.is_relative_to(real_root):
            return real_root
    return None


def parse_source_uri(uri: str, settings: Settings) -> tuple[str, ...]:
    """Check a source URI and return its parts; InvalidSource with the reason otherwise.

    * ``("s3", bucket, prefix)`` for ``s3://bucket[/prefix]`` (prefix without slashes at the ends)
    * ``("file", real_path)`` for ``file:///abs/path``; the path with symlinks resolved must lie
      inside one of ``settings.allowed_file_roots``
    * ``("hf", "org/name", revision)`` for ``hf://org/name[@revision]`` (revision "" = default branch)
    """
    if not isinstance(uri, str) or not uri:
        raise InvalidSource("the source URI is empty")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
        raise InvalidSource("the source URI contains NUL or control characters")
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        shown = scheme if sep else "(none)"
        raise InvalidSource(f"{uri!r}: unsupported scheme {shown}; use s3://bucket/prefix, file:///path or hf://org/name[@revision]")
    if scheme == "s3":
        return _parse_s3(uri, rest)
    if scheme == "file":
        return _parse_file(uri, rest, settings)
    return _parse_hf(uri, rest)


def _parse_s3(uri: str, rest: str) -> tuple[str, ...]:
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise InvalidSource(f"{uri!r}: an s3:// URI needs a bucket: s3://bucket/prefix")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise InvalidSource(f"{uri!r}: {bucket!r} is not a valid bucket name")
    if "?" in prefix or "#" in prefix:
        raise InvalidSource(f"{uri!r}: query strings and fragments are not allowed")
    prefix = prefix.strip("/")
    _segments_ok(uri, prefix)
    if "//" in prefix:
        raise InvalidSource(f"{uri!r}: empty path segments are not allowed")
    return ("s3", bucket, prefix)


def _parse_file(uri: str, rest: str, settings: Settings) -> tuple[str, ...]:
    if not rest.startswith("/"):
        raise InvalidSource(f"{uri!r}: file URIs must be local absolute paths: file:///abs/path")
    if "?" in rest or "#" in rest:
        raise InvalidSource(f"{uri!r}: query strings and fragments are not allowed")
    _segments_ok(uri, rest)
    path = unquote(rest)
    if "\x00" in path:
        raise InvalidSource(f"{uri!r}: the path contains NUL")
    _segments_ok(uri, path)  # again after decoding: %2e%2e is '..'
    if not settings.allowed_file_roots:
        raise InvalidSource(f"{uri!r}: file:// sources are disabled (no allowed_file_roots are configured)")
    real = Path(os.path.realpath(path))
    if file_root_match(real, list(settings.allowed_file_roots)) is None:
        raise InvalidSource(f"{uri!r}: {real} is outside the allowed file roots")
    return ("file", str(real))


def _parse_hf(uri: str, rest: str) -> tuple[str, ...]:
    repo_id, at, revision = rest.partition("@")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(_HF_PART.fullmatch(p) for p in parts):
        raise InvalidSource(f"{uri!r}: hf:// URIs name a repository as hf://org/name[@revision]")
    if ".." in repo_id or "--" in repo_id or len(repo_id) > 96:
        raise InvalidSource(f"{uri!r}: {repo_id!r} is not a valid repository id")
    if at and (not _HF_REVISION.fullmatch(revision) or ".." in revision.split("/") or "//" in revision):
        raise InvalidSource(f"{uri!r}: {revision!r} is not a valid revision")
    return ("hf", repo_id, revision)
