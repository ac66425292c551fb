"""Uploads: a tenant brings a model (or calibration text) into its own area of the artifact
store, without a bucket shared with the service, then names it as ``upload://<id>``.

``POST /v1/uploads`` declares the files (relative paths and sizes) and answers with where to
send each: on S3, presigned URLs straight to the bucket (one PUT per file, or one per part of
``upload_part_bytes`` for larger files, as S3 multipart uploads the API starts and finishes);
on local storage, the API's own ``PUT /v1/uploads/{id}/files/{path}``. ``POST .../complete``
checks every declared file arrived with its declared size (finishing the multipart uploads)
and only then may a job read it. The files lie under ``<tenant area>inputs/<id>/``
(service/policy.py ``upload_prefix``), where only their tenant's jobs read them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import PurePosixPath
from typing import Annotated, Literal

import redis
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from service.errors import InvalidCalibrationSource, InvalidSource, ModelTooLarge, ServiceError
from service.policy import upload_prefix
from service.settings import Settings
from service.storage import ObjectStore, S3ObjectStore

MAX_FILES = 1000  # with paths of at most 512 characters, the declaration fits the 1 MiB request limit
MAX_PARTS = 10_000  # S3's limit per multipart upload
_SEGMENT = r"[A-Za-z0-9_+=@,~ -][A-Za-z0-9._+=@,~ -]*"
_PATH = rf"^{_SEGMENT}(/{_SEGMENT})*$"
"""Upload paths: plain names (no hidden files, no '..', nothing that could disguise a name)."""


class UploadNotFound(ServiceError):
    code = "upload_not_found"


class UploadIncomplete(ServiceError):
    """Files of the upload have not arrived (or with another size); or, for a job, an upload
    that was never completed."""

    code = "upload_incomplete"


UploadPath = Annotated[
    str,
    StringConstraints(strict=True, max_length=512, pattern=_PATH),
    Field(
        description=(
            "Relative POSIX path inside the model directory, e.g. config.json or 1_Pooling/config.json: ASCII letters, "
            "digits, spaces and ._-+=@,~ in each segment, which may not start with a dot."
        )
    ),
]
def _whole_number(value: object) -> object:
    """JSON's integers (12, also 12.0), never a string or a boolean that pydantic would coerce."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("a size is a whole number of bytes")
    return value


UploadSize = Annotated[int, Field(ge=0, le=5 * 2**40, description="Bytes."), BeforeValidator(_whole_number)]


class UploadFile(BaseModel):
    """One declared file, as the record keeps it."""

    path: str
    size: int


class UploadCreate(BaseModel):
    """Body of ``POST /v1/uploads``: every file of the directory, path → size."""

    model_config = ConfigDict(extra="forbid")

    files: dict[UploadPath, UploadSize] = Field(
        min_length=1,
        max_length=MAX_FILES,
        # pydantic states the key pattern as patternProperties only; without this, other names
        # would look valid to a client reading the schema.
        json_schema_extra={"additionalProperties": False, "propertyNames": {"maxLength": 512, "pattern": _PATH}},
    )

    def declared(self) -> list[UploadFile]:
        return [UploadFile(path=path, size=size) for path, size in sorted(self.files.items())]


class UploadConflict(ServiceError):
    """Declared paths that cannot all be files: one is a folder of another."""

    code = "upload_conflict"


class UploadPart(BaseModel):
    number: int
    size: int
    url: str


class UploadTarget(BaseModel):
    """Where to send one file: ``url`` (one PUT of the whole file) or ``parts`` (one PUT per
    part, in any order, each exactly ``size`` bytes of the file from the part's offset)."""

    path: str
    size: int
    url: str | None = None
    parts: list[UploadPart] | None = None


class Upload(BaseModel):
    """An upload as ``POST /v1/uploads`` and ``GET /v1/uploads/{id}`` return it."""

    id: str
    state: Literal["open", "complete"]
    source: str = Field(description="What to give as a job's source (or, for text, calibration_data).")
    created_at: datetime
    completed_at: datetime | None = None
    urls_expire_at: datetime | None = Field(None, description="Open uploads: when the URLs below stop working (GET for new ones).")
    size: int
    files: list[UploadTarget]


class UploadRecord(BaseModel):
    """What the job store keeps of an upload; ``multipart`` maps a path to its S3 upload id."""

    id: str
    tenant: str
    state: Literal["open", "complete"] = "open"
    created_at: datetime
    completed_at: datetime | None = None
    files: list[UploadFile]
    multipart: dict[str, str] = Field(default_factory=dict)

    def key(self, path: str) -> str:
        return f"{upload_prefix(self.tenant, self.id)}/{path}"


def new_upload_id() -> str:
    return "upl_" + os.urandom(10).hex()


class UploadStore:
    """Upload records in the job store's Redis, beside the jobs (``<prefix>upload:<id>``)."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client, self.prefix = client, prefix

    def _key(self, upload_id: str) -> str:
        return f"{self.prefix}upload:{upload_id}"

    def save(self, record: UploadRecord) -> None:
        self.client.set(self._key(record.id), record.model_dump_json())

    def get(self, upload_id: str, tenant: str) -> UploadRecord:
        """Another tenant's upload is not found, as if it did not exist."""
        raw = self.client.get(self._key(upload_id)) if upload_id.startswith("upl_") else None
        record = UploadRecord.model_validate(json.loads(raw)) if raw else None
        if record is None or record.tenant != tenant:
            raise UploadNotFound(f"no upload {upload_id!r}")
        return record

    def delete(self, upload_id: str) -> None:
        self.client.delete(self._key(upload_id))


# --------------------------------------------------------------------------- operations


def part_size(size: int, settings: Settings) -> int:
    """The part size of a multipart file: the setting, larger where S3's 10 000 parts need it."""
    return max(settings.upload_part_bytes, math.ceil(size / MAX_PARTS / 2**20) * 2**20)


def create_upload(body: UploadCreate, tenant: str, store: UploadStore, artifacts: ObjectStore, settings: Settings) -> UploadRecord:
    files = body.declared()
    folders = {str(parent) for f in files for parent in PurePosixPath(f.path).parents}
    clash = next((f.path for f in files if f.path in folders), None)
    if clash is not None:
        raise UploadConflict(f"{clash!r} is declared as a file and is a folder of another declared file")
    total = sum(f.size for f in files)
    if total > settings.max_model_bytes:
        raise ModelTooLarge(f"the upload declares {total} bytes, above this service's limit of {settings.max_model_bytes}")
    record = UploadRecord(id=new_upload_id(), tenant=tenant, created_at=datetime.now(timezone.utc), files=files)
    if isinstance(artifacts, S3ObjectStore):
        for file in files:
            if file.size > settings.upload_part_bytes:
                record.multipart[file.path] = artifacts.start_multipart(record.key(file.path))
    store.save(record)
    return record


def upload_view(record: UploadRecord, artifacts: ObjectStore, settings: Settings, local_url: Callable[[str], str]) -> Upload:
    """The record with fresh URLs for the files of an open upload; ``local_url(path)`` is the
    API's own upload route, for storage that has no presigned URLs."""
    expiry = settings.upload_url_expiry_seconds
    targets = []
    for file in record.files:
        target = UploadTarget(path=file.path, size=file.size)
        if record.state == "open":
            upload_id = record.multipart.get(file.path)
            if upload_id is not None:
                step = part_size(file.size, settings)
                target.parts = [
                    UploadPart(
                        number=number,
                        size=min(step, file.size - (number - 1) * step),
                        url=artifacts.presigned_part_url(record.key(file.path), upload_id, number, expiry),  # type: ignore[attr-defined]
                    )
                    for number in range(1, math.ceil(file.size / step) + 1)
                ]
            else:
                target.url = artifacts.presigned_put_url(record.key(file.path), expiry) or local_url(file.path)
        targets.append(target)
    return Upload(
        id=record.id,
        state=record.state,
        source=f"upload://{record.id}",
        created_at=record.created_at,
        completed_at=record.completed_at,
        urls_expire_at=datetime.now(timezone.utc) + timedelta(seconds=expiry) if record.state == "open" else None,
        size=sum(f.size for f in record.files),
        files=targets,
    )


def complete_upload(record: UploadRecord, store: UploadStore, artifacts: ObjectStore, settings: Settings) -> UploadRecord:
    """Check that every declared file is there with its size, finishing multipart files whose
    parts have all arrived; UploadIncomplete naming what is missing otherwise (the upload
    stays open, so the client can send those and complete again)."""
    if record.state == "complete":
        return record
    problems = []
    for path, upload_id in list(record.multipart.items()):
        size = next(f.size for f in record.files if f.path == path)
        parts = artifacts.uploaded_parts(record.key(path), upload_id)  # type: ignore[attr-defined]
        if parts is None:  # finished by an earlier completion that did not get to save the record
            del record.multipart[path]
            continue
        step = part_size(size, settings)
        expected = math.ceil(size / step)
        numbers = [number for number, _, _ in parts]
        if numbers != list(range(1, expected + 1)) or sum(part_size for _, part_size, _ in parts) != size:
            problems.append(f"{path} ({len(parts)} of {expected} parts)")
            continue
        artifacts.finish_multipart(record.key(path), upload_id, parts)  # type: ignore[attr-defined]
        del record.multipart[path]
        store.save(record)
    stored = {obj.key: obj.size for obj in artifacts.list(upload_prefix(record.tenant, record.id) + "/")}
    for file in record.files:
        if file.path in record.multipart:
            continue
        size = stored.get(record.key(file.path))
        if size is None:
            problems.append(f"{file.path} (not uploaded)")
        elif size != file.size:
            problems.append(f"{file.path} ({size} bytes, {file.size} declared)")
    if problems:
        shown = ", ".join(problems[:10]) + (f" and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise UploadIncomplete(
            f"upload {record.id} is not complete: {shown}; send them (GET /v1/uploads/{record.id} has fresh URLs) and complete again"
        )
    record.state, record.completed_at = "complete", datetime.now(timezone.utc)
    store.save(record)
    return record


def delete_upload(record: UploadRecord, store: UploadStore, artifacts: ObjectStore) -> None:
    """Unfinished multipart uploads are aborted (S3 keeps their parts otherwise), then every file goes."""
    for path, upload_id in record.multipart.items():
        artifacts.abort_multipart(record.key(path), upload_id)  # type: ignore[attr-defined]
    artifacts.delete_prefix(upload_prefix(record.tenant, record.id) + "/")
    store.delete(record.id)


def require_complete(uri: str | None, field: str, tenant: str, store: UploadStore) -> None:
    """A job may name an upload only once it is complete, and only its own."""
    if uri is None or not uri.lower().startswith("upload://"):
        return
    upload_id = uri.split("://", 1)[1].split("/", 1)[0]
    try:
        record = store.get(upload_id, tenant)
    except UploadNotFound:
        error = InvalidSource if field == "source" else InvalidCalibrationSource
        raise error(f"{field}: no upload {upload_id!r} (POST /v1/uploads makes one)") from None
    if record.state != "complete":
        raise UploadIncomplete(f"{field}: upload {upload_id} is not complete yet: POST /v1/uploads/{upload_id}/complete first")
