"""Where a job's inputs lie, as typed values: parsed once from the request's URIs at submission
(service/uris.py), stored with the job, and checked again, not parsed again, by the worker
(service/policy.py). Plain data, so the job record can carry them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Location(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class S3Location(_Location):
    """``s3://bucket[/key]``: every object under the key prefix (no slashes at its ends)."""

    scheme: Literal["s3"] = "s3"
    bucket: str
    key: str = ""


class FileLocation(_Location):
    """``file:///path``: ``path`` with its symlinks resolved, inside an allowed root."""

    scheme: Literal["file"] = "file"
    path: str


class HubLocation(_Location):
    """``hf://org/name[@revision]`` ("" = the default branch)."""

    scheme: Literal["hf"] = "hf"
    repo: str
    revision: str = ""


class UploadLocation(_Location):
    """``upload://<id>[/path]``: one of the tenant's own uploads, or a file or folder in it."""

    scheme: Literal["upload"] = "upload"
    upload: str
    path: str = ""


SourceLocation = Annotated[S3Location | FileLocation | HubLocation | UploadLocation, Field(discriminator="scheme")]


class CalibrationLocation(_Location):
    """Where a job's calibration text lies. ``file``: ``path`` is the real local path (a file or
    a directory). ``s3``: ``key`` is one object, or with ``prefix`` every .txt/.jsonl object
    under ``key/`` ("" = the whole bucket). ``upload``: the same, ``key`` relative to the
    caller's upload ``upload``."""

    scheme: Literal["file", "s3", "upload"]
    path: str = ""
    bucket: str = ""
    key: str = ""
    prefix: bool = False
    upload: str = ""


class JobInputs(_Location):
    """A job's inputs as the API parsed them at submission."""

    source: SourceLocation
    calibration: CalibrationLocation | None = None
