"""/v1/uploads: bring a model or calibration text into the caller's own area (service/uploads.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from api.deps import ArtifactsDep, SettingsDep, StoreDep, TenantDep
from api.routes.jobs import check_submission_rate
from api.schemas import error_responses
from service.errors import (
    InvalidRequest,
    MalformedJson,
    ModelTooLarge,
    RequestTooLarge,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)
from service.storage import LocalObjectStore, StorageUnavailable
from service.uploads import (
    Upload,
    UploadConflict,
    UploadCreate,
    UploadIncomplete,
    UploadNotFound,
    UploadStore,
    complete_upload,
    create_upload,
    delete_upload,
    upload_view,
)

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])
CALLER_ERRORS = (Unauthorized, InvalidRequest, Unavailable, StorageUnavailable)
UPLOAD_ERRORS = (*CALLER_ERRORS, UploadNotFound)


def _uploads(store: StoreDep) -> UploadStore:
    return UploadStore(store.client, store.prefix)


def _view(request: Request, record, artifacts, settings) -> Upload:
    def local_url(path: str) -> str:
        route = request.url_for("put_upload_file", upload_id=record.id, path=path)
        return f"{settings.public_url.rstrip('/')}{route.path}" if settings.public_url else str(route)

    return upload_view(record, artifacts, settings, local_url)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=Upload,
    responses=error_responses(
        *CALLER_ERRORS, MalformedJson, RequestTooLarge, ModelTooLarge, UploadConflict, (TooManyRequests, "rate_limited")
    ),
)
def create(body: UploadCreate, request: Request, response: Response, store: StoreDep, artifacts: ArtifactsDep, settings: SettingsDep, tenant: TenantDep) -> Upload:
    """Declare the files of a model directory (relative paths and sizes) and get where to send
    each: presigned S3 URLs (whole files, or parts of large ones), or this API's upload route on
    local storage. Then ``POST /v1/uploads/{id}/complete``, and submit jobs with the returned
    ``source`` (``upload://<id>``). Uploads count against the tenant's submission rate."""
    check_submission_rate(store, settings, tenant)
    record = create_upload(body, tenant, _uploads(store), artifacts, settings)
    response.headers["Location"] = f"/v1/uploads/{record.id}"
    return _view(request, record, artifacts, settings)


@router.get("/{upload_id}", response_model=Upload, responses=error_responses(*UPLOAD_ERRORS))
def get(upload_id: str, request: Request, store: StoreDep, artifacts: ArtifactsDep, settings: SettingsDep, tenant: TenantDep) -> Upload:
    """The upload, with fresh URLs while it is open. Another tenant's is 404 upload_not_found."""
    return _view(request, _uploads(store).get(upload_id, tenant), artifacts, settings)


@router.post("/{upload_id}/complete", response_model=Upload, responses=error_responses(*UPLOAD_ERRORS, UploadIncomplete))
def complete(upload_id: str, request: Request, store: StoreDep, artifacts: ArtifactsDep, settings: SettingsDep, tenant: TenantDep) -> Upload:
    """Check that every declared file arrived with its size; 409 upload_incomplete naming the
    missing ones otherwise (send them and complete again). Idempotent."""
    uploads = _uploads(store)
    record = complete_upload(uploads.get(upload_id, tenant), uploads, artifacts, settings)
    return _view(request, record, artifacts, settings)


@router.delete("/{upload_id}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(*UPLOAD_ERRORS))
def delete(upload_id: str, store: StoreDep, artifacts: ArtifactsDep, tenant: TenantDep) -> Response:
    """Remove the upload's files and record; jobs that already read it keep their artifacts."""
    uploads = _uploads(store)
    delete_upload(uploads.get(upload_id, tenant), uploads, artifacts)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.put(
    "/{upload_id}/files/{path:path}",
    name="put_upload_file",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(*UPLOAD_ERRORS, RequestTooLarge),
)
async def put_file(upload_id: str, path: str, request: Request, store: StoreDep, artifacts: ArtifactsDep, tenant: TenantDep) -> Response:
    """The file's bytes as the body, exactly its declared size (local storage; S3 uploads go to
    the presigned URLs). The file appears only once all of it has arrived."""
    record = _uploads(store).get(upload_id, tenant)
    declared = next((f for f in record.files if f.path == path), None)
    if declared is None:
        raise InvalidRequest(f"{path!r} is not a file of upload {upload_id}")
    if record.state != "open" or not isinstance(artifacts, LocalObjectStore):
        raise InvalidRequest(f"upload {upload_id} takes no files here ({'complete' if record.state != 'open' else 'use its presigned URLs'})")
    received = 0
    with artifacts.writer(record.key(path)) as file:
        async for chunk in request.stream():
            received += len(chunk)
            if received > declared.size:
                raise RequestTooLarge(f"{path!r} was declared with {declared.size} bytes; more arrived")
            file.write(chunk)
        if received != declared.size:
            raise InvalidRequest(f"{path!r} was declared with {declared.size} bytes; {received} arrived")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
