"""Validation of a job's input URIs: the source (s3://bucket/prefix/, file:// under the
allowed roots, hf://org/name[@revision], upload://<id>) and the calibration text (file://,
s3://bucket/key, s3://bucket/prefix/, upload://<id>/path). Torch-free, so the API refuses a
bad request before queueing and the worker re-checks with the very same rules before it
reads anything. What a tenant may read of what these name is service/policy.py's to decide."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import unquote

from service.errors import InvalidCalibrationSource, InvalidRequest, InvalidSource
from service.locations import (
    CalibrationLocation,
    FileLocation,
    HubLocation,
    JobInputs,
    S3Location,
    SourceLocation,
    UploadLocation,
)
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


def parse_source_uri(uri: str, settings: Settings) -> SourceLocation:
    """Check a source URI and return where it points (service/locations.py); InvalidSource
    with the reason otherwise. A ``file://`` path, symlinks resolved, must lie inside one of
    ``settings.allowed_file_roots``."""
    scheme, rest = _split(uri, SCHEMES, _SOURCE_FORMS)
    if scheme == "s3":
        return parse_s3(uri, rest)
    if scheme == "file":
        return _parse_file(uri, rest, settings)
    if scheme == "upload":
        return parse_upload(uri, rest)
    return _parse_hf(uri, rest)


def resolve_again(location: FileLocation, uri: str, settings: Settings) -> FileLocation:
    """A ``file://`` location parsed earlier (at submission), resolved again now: a link made
    since then must not lead outside the allowed roots."""
    real = Path(os.path.realpath(location.path))
    if not settings.allowed_file_roots or file_root_match(real, list(settings.allowed_file_roots)) is None:
        raise InvalidSource(f"{uri!r} is outside the allowed file roots (symlinks resolved)")
    return FileLocation(path=str(real))


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


def parse_s3(uri: str, rest: str) -> S3Location:
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise InvalidSource(f"{uri!r}: an s3:// URI needs a bucket: s3://bucket/prefix")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise InvalidSource(f"{uri!r}: {bucket!r} is not a valid bucket name")
    return S3Location(bucket=bucket, key=_key_path(uri, prefix))


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


def _parse_file(uri: str, rest: str, settings: Settings) -> FileLocation:
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
    return FileLocation(path=str(real))


def parse_upload(uri: str, rest: str) -> UploadLocation:
    """``upload://<id>[/path]``: one of the caller's uploads, or a file or folder in it."""
    upload_id, _, path = rest.partition("/")
    if not UPLOAD_ID.fullmatch(upload_id):
        raise InvalidSource(f"{uri!r}: upload URIs are upload://<id>[/path] with the id POST /v1/uploads returned")
    return UploadLocation(upload=upload_id, path=_key_path(uri, path))


def _parse_hf(uri: str, rest: str) -> HubLocation:
    repo_id, at, revision = rest.partition("@")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(HF_PART.fullmatch(p) for p in parts):
        raise InvalidSource(f"{uri!r}: hf:// URIs name a repository as hf://org/name[@revision]")
    if ".." in repo_id or "--" in repo_id or len(repo_id) > 96:
        raise InvalidSource(f"{uri!r}: {repo_id!r} is not a valid repository id")
    if at and (not _HF_REVISION.fullmatch(revision) or ".." in revision.split("/") or "//" in revision):
        raise InvalidSource(f"{uri!r}: {revision!r} is not a valid revision")
    return HubLocation(repo=repo_id, revision=revision)


# --------------------------------------------------------------------------- calibration text


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
            return CalibrationLocation(scheme="file", path=_parse_file(uri, rest, settings).path)
        if scheme == "upload":
            upload = parse_upload(uri, rest)
            # An upload's id is not a bucket: it is looked up in the caller's own area.
            where, key = {"upload": upload.upload}, upload.path
        else:
            s3 = parse_s3(uri, rest)
            where, key = {"bucket": s3.bucket}, s3.key
    except InvalidSource as exc:
        raise InvalidCalibrationSource(f"calibration_data: {exc.message}") from None
    if not key or rest.endswith("/"):
        return CalibrationLocation(scheme=scheme, key=key, prefix=True, **where)
    if PurePosixPath(key).suffix.lower() not in CALIBRATION_SUFFIXES:
        raise InvalidCalibrationSource(
            f"calibration_data: {uri!r} must name a .txt or .jsonl object, or end with / to read every such object under a prefix"
        )
    return CalibrationLocation(scheme=scheme, key=key, **where)


def needs_calibration_data(request: JobCreate) -> str | None:
    """Why the request's options need calibration text (None when they do not), naming the
    field's path in the request (``options.objective='activation' fits ...``). The rule is the
    engine's (``ConvertOptions.calibration_need``)."""
    need = request.options.calibration_need
    if need is None:
        return None
    value = "" if need.value is None else f"={need.value!r}"
    return f"options.{need.field}{value} {need.message}"


def check_job_inputs(request: JobCreate, settings: Settings) -> JobInputs:
    """Everything about a job request that pydantic cannot check field by field: the source
    and calibration URIs (returned parsed, to travel with the job), the webhook's address, and
    calibration data being given when the options need it."""
    source = parse_source_uri(request.source, settings)
    if request.webhook_url is not None:
        from service.webhooks import check_submission

        check_submission(request.webhook_url, settings)
    if request.calibration_data is not None:
        return JobInputs(source=source, calibration=parse_calibration_uri(request.calibration_data, settings))
    reason = needs_calibration_data(request)
    if reason is not None:
        raise InvalidRequest(
            f"calibration_data: required: {reason}; add calibration_data ({_CALIBRATION_FORMS}), "
            "or use options.objective='weight' and options.refine='none' without evaluate"
        )
    return JobInputs(source=source)
