"""/v1/jobs/{id}/artifacts: the finished checkpoint's files, with sha256 and a download URL."""

from __future__ import annotations

import hashlib
import json

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from api.deps import ArtifactsDep, SettingsDep, StoreDep, TenantDep
from api.routes.jobs import JOB_ERRORS
from api.schemas import error_responses
from loftq.storage import MANIFEST_NAME
from service.errors import ArtifactNotFound, JobNotFinished
from service.models import Artifact, ArtifactList, Job, JobState
from service.storage import ObjectStore, StorageUnavailable

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"])
CHUNK = 1 << 20
ARTIFACT_ERRORS = error_responses(*JOB_ERRORS, ArtifactNotFound, JobNotFinished, StorageUnavailable)


def _manifest(job: Job, artifacts: ObjectStore) -> tuple[dict[str, Artifact], bytes]:
    if job.state is not JobState.succeeded:
        raise JobNotFinished(f"job {job.id} is {job.state.value}; artifacts exist once it has succeeded")
    raw = artifacts.read_bytes(job.output + MANIFEST_NAME)
    if raw is None:
        raise ArtifactNotFound(f"job {job.id} has no {MANIFEST_NAME} (artifacts were removed)")
    files = {f["path"]: Artifact(path=f["path"], size=f["size"], sha256=f["sha256"]) for f in json.loads(raw)["files"]}
    files[MANIFEST_NAME] = Artifact(path=MANIFEST_NAME, size=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    return files, raw


@router.get("/{job_id}/artifacts", response_model=ArtifactList, responses=ARTIFACT_ERRORS)
def list_artifacts(
    job_id: str, request: Request, store: StoreDep, artifacts: ArtifactsDep, settings: SettingsDep, tenant: TenantDep
) -> ArtifactList:
    """Every file of the checkpoint (from its manifest) with a download URL: presigned for S3
    (valid LOFTQ_PRESIGN_EXPIRY_SECONDS), an API route for local storage (needs the API key)."""
    job = store.get(job_id, tenant=tenant)
    files, _ = _manifest(job, artifacts)
    listed = []
    for path, artifact in sorted(files.items()):
        url = artifacts.presigned_url(job.output + path, settings.presign_expiry_seconds)
        if url is None:
            route = request.url_for("download_artifact", job_id=job_id, path=path)
            # Behind a proxy the request's host is an internal one; LOFTQ_PUBLIC_URL is what clients reach.
            url = f"{settings.public_url.rstrip('/')}{route.path}" if settings.public_url else str(route)
        listed.append(artifact.model_copy(update={"url": url}))
    return ArtifactList(job_id=job_id, artifacts=listed)


@router.get(
    "/{job_id}/artifacts/files/{path:path}",
    name="download_artifact",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The file's bytes.",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "headers": {
                "X-Checksum-SHA256": {"description": "sha256 of the file, from the manifest.", "schema": {"type": "string"}},
            },
        },
        **ARTIFACT_ERRORS,
    },
)
def download_artifact(job_id: str, path: str, store: StoreDep, artifacts: ArtifactsDep, tenant: TenantDep) -> StreamingResponse:
    """Stream one file from storage. Only files named by the manifest are served."""
    job = store.get(job_id, tenant=tenant)
    files, raw = _manifest(job, artifacts)
    if path not in files:
        raise ArtifactNotFound(f"{path!r} is not an artifact of job {job_id}")
    artifact = files[path]
    if path == MANIFEST_NAME:
        body = iter([raw])
    else:
        try:
            handle = artifacts.open_read(job.output + path)
        except FileNotFoundError:
            raise ArtifactNotFound(f"{path!r} is listed in the manifest but missing from storage") from None

        def chunks():
            with handle:
                while block := handle.read(CHUNK):
                    yield block

        body = chunks()
    headers = {"Content-Length": str(artifact.size), "X-Checksum-SHA256": artifact.sha256}
    return StreamingResponse(body, media_type="application/octet-stream", headers=headers)
