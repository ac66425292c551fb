"""/v1/jobs: submit, inspect, list, cancel, delete and follow jobs, and see their webhook deliveries."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status
from fastapi.responses import StreamingResponse

from api.deps import ArtifactsDep, EventHubDep, LifecycleDep, PolicyDep, QueueDep, SettingsDep, StoreDep, TenantDep
from api.event_stream import EventStreamResponse
from api.schemas import error_responses
from service import deletion
from service.errors import (
    IdempotencyKeyReused,
    InvalidCalibrationSource,
    InvalidRequest,
    InvalidSource,
    JobNotFound,
    MalformedJson,
    RequestTooLarge,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)
from service.models import ErrorInfo, Event, EventPage, Job, JobCreate, JobPage, JobState, WebhookDeliveryList
from service.policy import SourceNotAllowed
from service.settings import Settings
from service.storage import StorageUnavailable
from service.store import JobStore
from service.tenants import DEFAULT_TENANT, tenant_prefix
from service.text import unsafe_message
from service.uploads import UploadIncomplete, UploadStore, require_complete
from service.uris import check_job_inputs
from service.webhooks import WebhookNotAllowed, retry_window

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
EVENT_CURSOR = r"^\d+-\d+$"  # a Redis stream id
_STREAM_ID_PART_MAX = 2**64 - 1
CALLER_ERRORS = (Unauthorized, InvalidRequest, Unavailable)
"""What any /v1/jobs route may answer: no valid key, a malformed request, the job store down."""
JOB_ERRORS = (*CALLER_ERRORS, JobNotFound)
SSE_EVENT = {
    "type": "object",
    "required": ["id", "event", "data"],
    "properties": {
        "id": {"type": "string"},
        "event": {"type": "string"},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": Event.model_json_schema()},
    },
}
"""One event of the stream (OpenAPI 3.2's itemSchema): ``data`` is the Event as JSON."""
SUBMIT_RESPONSES = {
    202: {
        "headers": {
            "Location": {"description": "The job's URL, /v1/jobs/{id}.", "schema": {"type": "string"}},
            "Idempotent-Replayed": {
                "description": "true when an Idempotency-Key replay returned the job created before.",
                "schema": {"type": "string", "enum": ["true"]},
            },
        }
    },
    **error_responses(
        *CALLER_ERRORS,
        MalformedJson,
        InvalidSource,
        InvalidCalibrationSource,
        SourceNotAllowed,
        WebhookNotAllowed,
        UploadIncomplete,
        IdempotencyKeyReused,
        RequestTooLarge,
        (TooManyRequests, "rate_limited"),
        (TooManyRequests, "too_many_queued_jobs"),
    ),
}


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=Job, responses=SUBMIT_RESPONSES)
def create_job(
    body: JobCreate,
    response: Response,
    store: StoreDep,
    lifecycle: LifecycleDep,
    queue: QueueDep,
    settings: SettingsDep,
    policy: PolicyDep,
    tenant: TenantDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            description="Retrying with the same key and body returns the same job (header Idempotent-Replayed: true); "
            "the same key with another body is 409 idempotency_key_reused.",
        ),
    ] = None,
) -> Job:
    """Queue a conversion. Returns at once; poll the job or follow its events. Bad URIs and
    options that need calibration data without it are 422 here, not a failed job later,
    and so is a source or calibration text the tenant may not read (service/policy.py)."""
    inputs = check_job_inputs(body, settings)
    policy.check_inputs(body, inputs, tenant)
    uploads = UploadStore(store.client, store.prefix)
    require_complete(body.source, "source", tenant, uploads)
    require_complete(body.calibration_data, "calibration_data", tenant, uploads)
    if idempotency_key is not None:
        _check_idempotency_key(idempotency_key)
    if tenant == DEFAULT_TENANT and body.output and body.output.split("/", 1)[0] == "tenants":
        raise InvalidRequest("output: the tenants/ prefix is reserved for the artifacts of API-key tenants")
    job, created = lifecycle.submit(
        body,
        tenant=tenant,
        prefix=tenant_prefix(tenant),
        idempotency_key=idempotency_key,
        admit=lambda: _check_limits(store, settings, tenant),
        inputs=inputs,
    )
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
        return job
    try:
        queue.enqueue(job.id)
    except Exception as exc:  # the broker is down: the job must not sit queued forever
        lifecycle.finish(job.id, JobState.failed, error=ErrorInfo(code="queue_unavailable", message=str(exc)))
        if idempotency_key is not None:  # a retry with the same key must queue a new job
            store.release_idempotency_key(idempotency_key, tenant=tenant)
        raise Unavailable("the job queue is unreachable; try again") from exc
    return job


def _check_idempotency_key(key: str) -> None:
    """422 for a key with format or control characters: it reaches logs and the job store.
    Header values arrive decoded as Latin-1; a client's UTF-8 is decoded back first so that the
    message names the character it sent."""
    try:
        text = key.encode("latin-1").decode("utf-8")
    except UnicodeError:
        text = key
    problem = unsafe_message(text)
    if problem:
        raise InvalidRequest(f"Idempotency-Key: {problem}")


def check_submission_rate(store: JobStore, settings: Settings, tenant: str) -> None:
    """429 ``rate_limited`` with Retry-After above LOFTQ_SUBMISSIONS_PER_MINUTE; counts this
    submission otherwise (new jobs and new uploads share the budget)."""
    wait = store.take_submission(tenant, settings.submissions_per_minute)
    if wait:
        raise TooManyRequests(
            f"more than {settings.submissions_per_minute} submissions in a minute (LOFTQ_SUBMISSIONS_PER_MINUTE)",
            code="rate_limited",
            retry_after=wait,
        )


def _check_limits(store: JobStore, settings: Settings, tenant: str) -> None:
    """Per-tenant limits on new jobs: 429 with Retry-After, before anything is created (a
    replayed Idempotency-Key request returns its job and is not counted)."""
    check_submission_rate(store, settings, tenant)
    if store.count_queued(tenant) >= settings.max_queued_jobs_per_tenant:
        raise TooManyRequests(
            f"{settings.max_queued_jobs_per_tenant} jobs are queued already (LOFTQ_MAX_QUEUED_JOBS_PER_TENANT); "
            "retry when some have started",
            code="too_many_queued_jobs",
            retry_after=30,
        )


@router.get("", response_model=JobPage, responses=error_responses(*CALLER_ERRORS))
def list_jobs(
    store: StoreDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[
        str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="next_after of the previous page (a job id)")
    ] = None,
    state: JobState | None = None,
) -> JobPage:
    """The caller's jobs, newest first, with cursor pagination."""
    return store.list(limit=limit, after=after, state=state, tenant=tenant)


@router.get("/{job_id}", response_model=Job, responses=error_responses(*JOB_ERRORS))
def get_job(job_id: str, store: StoreDep, tenant: TenantDep) -> Job:
    """Another tenant's job is 404 job_not_found, as if it did not exist."""
    return store.get(job_id, tenant=tenant)


@router.post(
    "/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=Job, responses=error_responses(*JOB_ERRORS)
)
def cancel_job(job_id: str, store: StoreDep, lifecycle: LifecycleDep, tenant: TenantDep) -> Job:
    """Ask a job to stop (checked between layers). Idempotent; a no-op on finished jobs."""
    store.get(job_id, tenant=tenant)  # a job never changes tenant, so checking first is enough
    return lifecycle.cancel(job_id)


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={
        202: {"model": Job, "description": "The job was running: it is cancelling, and is removed once it has stopped."},
        **error_responses(*JOB_ERRORS, StorageUnavailable),
    },
)
def delete_job(
    job_id: str, store: StoreDep, lifecycle: LifecycleDep, artifacts: ArtifactsDep, settings: SettingsDep, tenant: TenantDep
) -> Response:
    """Remove a job: its artifacts, its record, its events. A queued or finished job is removed
    at once (204); a running one is cancelled first and removed when its worker has stopped
    (202 with the cancelling job). Deleting again, or a job already gone, is 404."""
    job = store.get(job_id, tenant=tenant)
    stopping = deletion.delete_job(lifecycle, artifacts, job, keep_deliveries_seconds=retry_window(settings))
    if stopping is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    return Response(stopping.model_dump_json(), status_code=status.HTTP_202_ACCEPTED, media_type="application/json")


@router.get("/{job_id}/webhooks", response_model=WebhookDeliveryList, responses=error_responses(*JOB_ERRORS))
def list_webhook_deliveries(job_id: str, store: StoreDep, tenant: TenantDep) -> WebhookDeliveryList:
    """Every webhook delivery of the job (its own webhook_url and its tenant's), oldest first:
    state (pending, delivered, failed), attempts, the last answer or error."""
    store.get(job_id, tenant=tenant)
    return WebhookDeliveryList(job_id=job_id, deliveries=store.deliveries(job_id))


def _event_cursor(after: str | None) -> str | None:
    """422 for a cursor no event can follow: Redis stream ids are two 64-bit numbers, and
    the store would refuse a larger one (or the largest) with an error, not an answer."""
    if after is not None:
        parts = [int(part) for part in after.split("-")]
        if max(parts) > _STREAM_ID_PART_MAX or min(parts) == _STREAM_ID_PART_MAX:
            raise InvalidRequest(f"after: {after!r} is not an event id (two numbers below 2^64, as in next_after)")
    return after


@router.get("/{job_id}/events", response_model=EventPage, responses=error_responses(*JOB_ERRORS))
def list_events(
    job_id: str,
    store: StoreDep,
    tenant: TenantDep,
    after: Annotated[str | None, Query(max_length=64, pattern=EVENT_CURSOR)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> EventPage:
    """Per-layer progress and state changes; pass ``next_after`` back as ``after``."""
    after = _event_cursor(after)
    store.get(job_id, tenant=tenant)
    return store.events(job_id, after=after, limit=limit)


@router.get(
    "/{job_id}/events/stream",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-sent events (id, event, data: the event as JSON) and heartbeat comments.",
            "content": {"text/event-stream": {"itemSchema": SSE_EVENT}},
        },
        **error_responses(*JOB_ERRORS, (TooManyRequests, "too_many_streams")),
    },
)
async def stream_events(
    job_id: str,
    hub: EventHubDep,
    tenant: TenantDep,
    after: Annotated[str | None, Query(max_length=64, pattern=EVENT_CURSOR)] = None,
) -> StreamingResponse:
    """The same events as server-sent events; the stream ends when the job has ended. Served
    by the process's event hub (api/event_stream.py): a follower holds no thread, and at most
    LOFTQ_MAX_EVENT_STREAMS_PER_TENANT streams per tenant are open at once (429 above)."""
    after = _event_cursor(after)
    await hub.job(job_id, tenant=tenant)
    release = hub.slots.take(tenant)
    return EventStreamResponse(hub.frames(job_id, after), on_close=release)
