"""Validation of a job's input URIs: the source (s3://bucket/prefix/, file:// under the
allowed roots, hf://org/name[@revision], upload://<id>) and the calibration text (file://,
s3://bucket/key, s3://bucket/prefix/, upload://<id>/path). Torch-free, so the API refuses a
bad request before queueing and the worker re-checks with the very same rules before it
reads anything. What a tenant may read of what these name is service/policy.py's to decide."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote

from service.errors import InvalidCalibrationSource, InvalidRequest, InvalidSource
from service.settings import Settings
from service.text import unsafe_character

if TYPE_CHECKING:
    from service.models import JobCreate

SCHEMES = ("s3", "file", "hf", "upload")
CALIBRATION_SUFFIXES = (".txt", ".jsonl")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
HF_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HF_REVISION = re.compile(r"[A-Za-z0-9._/-]+")
_BARE_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
UPLOAD_ID = re.compile(r"upl_[0-9a-f]{20}")


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
    * ``("upload", id, path)`` for ``upload://<id>[/path]`` (the caller's own upload; path "" = all of it)
    """
    scheme, rest = _split(uri, SCHEMES, _SOURCE_FORMS)
    if scheme == "s3":
        return parse_s3(uri, rest)
    if scheme == "file":
        return _parse_file(uri, rest, settings)
    if scheme == "upload":
        return parse_upload(uri, rest)
    return _parse_hf(uri, rest)


_SOURCE_FORMS = "s3://bucket/prefix, file:///path, hf://org/name[@revision] or upload://<id> (POST /v1/uploads)"


def _split(uri: str, schemes: tuple[str, ...], forms: str) -> tuple[str, str]:
    """(scheme in lower case, the rest after ://) of a URI free of control characters."""
    if not isinstance(uri, str) or not uri:
        raise InvalidSource("the URI is empty")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
        raise InvalidSource("the URI contains NUL or control characters")
    character = unsafe_character(uri)
    if character is not None:  # bidi overrides and invisible characters would disguise the URI in logs
        raise InvalidSource(f"the URI contains {character}; write it without format or control characters")
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in schemes:
        bare = _BARE_SCHEME.match(uri)  # data:..., mailto:... have no "//"
        shown = scheme if sep else bare.group(1).lower() if bare else "(none)"
        if shown in schemes:
            raise InvalidSource(f"{uri!r}: '//' is missing after '{shown}:'; use {forms}")
        raise InvalidSource(f"{uri!r}: unsupported scheme {shown}; use {forms}")
    return scheme, rest


def parse_s3(uri: str, rest: str) -> tuple[str, ...]:
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise InvalidSource(f"{uri!r}: an s3:// URI needs a bucket: s3://bucket/prefix")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise InvalidSource(f"{uri!r}: {bucket!r} is not a valid bucket name")
    return ("s3", bucket, _key_path(uri, prefix))


def _key_path(uri: str, path: str) -> str:
    """The object-key part of an s3:// or upload:// URI, without slashes at the ends: no
    query, fragment, '.', '..' or empty segments."""
    if "?" in path or "#" in path:
        raise InvalidSource(f"{uri!r}: query strings and fragments are not allowed")
    path = path.strip("/")
    _segments_ok(uri, path)
    if "//" in path:
        raise InvalidSource(f"{uri!r}: empty path segments are not allowed")
    return path


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
        raise InvalidSource(f"{uri!r}: file:// URIs are disabled (no allowed_file_roots are configured)")
    real = Path(os.path.realpath(path))
    if file_root_match(real, list(settings.allowed_file_roots)) is None:
        # The resolved path is not echoed: it would tell any caller where links on the server lead.
        raise InvalidSource(f"{uri!r} is outside the allowed file roots (symlinks resolved)")
    return ("file", str(real))


def parse_upload(uri: str, rest: str) -> tuple[str, ...]:
    """``upload://<id>[/path]``: one of the caller's uploads, or a file or folder in it."""
    upload_id, _, path = rest.partition("/")
    if not UPLOAD_ID.fullmatch(upload_id):
        raise InvalidSource(f"{uri!r}: upload URIs are upload://<id>[/path] with the id POST /v1/uploads returned")
    return ("upload", upload_id, _key_path(uri, path))


def _parse_hf(uri: str, rest: str) -> tuple[str, ...]:
    repo_id, at, revision = rest.partition("@")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(HF_PART.fullmatch(p) for p in parts):
        raise InvalidSource(f"{uri!r}: hf:// URIs name a repository as hf://org/name[@revision]")
    if ".." in repo_id or "--" in repo_id or len(repo_id) > 96:
        raise InvalidSource(f"{uri!r}: {repo_id!r} is not a valid repository id")
    if at and (not _HF_REVISION.fullmatch(revision) or ".." in revision.split("/") or "//" in revision):
        raise InvalidSource(f"{uri!r}: {revision!r} is not a valid revision")
    return ("hf", repo_id, revision)


# --------------------------------------------------------------------------- calibration text


@dataclass(frozen=True)
class CalibrationLocation:
    """Where a job's calibration text lies, as ``parse_calibration_uri`` checked it.

    ``file``: ``path`` is the real local path (a file or a directory). ``s3``: ``key`` is one
    object, or with ``prefix`` every .txt/.jsonl object under ``key/`` ("" = the whole bucket).
    ``upload``: the same, ``key`` relative to the caller's upload ``upload``."""

    scheme: Literal["file", "s3", "upload"]
    path: str = ""
    bucket: str = ""
    key: str = ""
    prefix: bool = False
    upload: str = ""


_CALIBRATION_FORMS = (
    "file:///path, s3://bucket/key.txt (one object), s3://bucket/prefix/ (every .txt/.jsonl under it) "
    "or upload://<id>[/path] (an upload of yours)"
)


def parse_calibration_uri(uri: str, settings: Settings) -> CalibrationLocation:
    """Check a ``calibration_data`` URI with the source's rules (allowed file roots, no '..',
    valid bucket names); InvalidCalibrationSource naming the field otherwise. A trailing slash
    makes an s3:// URI a prefix; without one it must name a .txt or .jsonl object."""
    try:
        scheme, rest = _split(uri, ("file", "s3", "upload"), _CALIBRATION_FORMS)
        if scheme == "file":
            return CalibrationLocation("file", path=_parse_file(uri, rest, settings)[1])
        _, bucket, key = (parse_upload if scheme == "upload" else parse_s3)(uri, rest)
    except InvalidSource as exc:
        raise InvalidCalibrationSource(f"calibration_data: {exc.message}") from None
    # An upload's id is not a bucket: it is looked up in the caller's own area.
    where = {"upload": bucket} if scheme == "upload" else {"bucket": bucket}
    if not key or rest.endswith("/"):
        return CalibrationLocation(scheme, key=key, prefix=True, **where)
    if PurePosixPath(key).suffix.lower() not in CALIBRATION_SUFFIXES:
        raise InvalidCalibrationSource(
            f"calibration_data: {uri!r} must name a .txt or .jsonl object, or end with / to read every such object under a prefix"
        )
    return CalibrationLocation(scheme, key=key, **where)


def needs_calibration_data(request: JobCreate) -> str | None:
    """Why the request's options need calibration text (None when they do not), naming the
    field's path in the request (``options.objective='activation' fits ...``). The rule is the
    engine's (``ConvertOptions.calibration_need``)."""
    need = request.options.calibration_need
    if need is None:
        return None
    value = "" if need.value is None else f"={need.value!r}"
    return f"options.{need.field}{value} {need.message}"


def check_job_inputs(request: JobCreate, settings: Settings) -> None:
    """Everything about a job request that pydantic cannot check field by field: the source
    and calibration URIs, the webhook's address, and calibration data being given when the
    options need it."""
    parse_source_uri(request.source, settings)
    if request.webhook_url is not None:
        from service.webhooks import check_submission

        check_submission(request.webhook_url, settings)
    if request.calibration_data is not None:
        parse_calibration_uri(request.calibration_data, settings)
        return
    reason = needs_calibration_data(request)
    if reason is not None:
        raise InvalidRequest(
            f"calibration_data: required: {reason}; add calibration_data ({_CALIBRATION_FORMS}), "
            "or use options.objective='weight' and options.refine='none' without evaluate"
        )
