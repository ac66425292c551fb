"""/v1/jobs: submit, inspect, list, cancel, and follow jobs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status
from fastapi.responses import StreamingResponse

from api.auth import DEFAULT_TENANT, tenant_prefix
from api.deps import QueueDep, SettingsDep, StoreDep, TenantDep
from api.errors import (
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
from api.jobstore import JobStore
from api.schemas import ErrorInfo, Event, EventPage, Job, JobCreate, JobPage, JobState, error_responses
from api.settings import Settings
from api.sources import check_job_inputs

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
HEARTBEAT_MS = 15_000
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
    queue: QueueDep,
    settings: SettingsDep,
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
    options that need calibration data without it are 422 here, not a failed job later."""
    check_job_inputs(body, settings)
    if tenant == DEFAULT_TENANT and body.output and body.output.split("/", 1)[0] == "tenants":
        raise InvalidRequest("output: the tenants/ prefix is reserved for the artifacts of API-key tenants")
    if idempotency_key is None:
        _check_limits(store, settings, tenant)
        job, created = store.create(body, tenant=tenant, prefix=tenant_prefix(tenant)), True
    else:
        job, created = store.create_idempotent(
            body, idempotency_key, tenant=tenant, prefix=tenant_prefix(tenant), admit=lambda: _check_limits(store, settings, tenant)
        )
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
        return job
    try:
        queue.enqueue(job.id)
    except Exception as exc:  # the broker is down: the job must not sit queued forever
        store.transition(job.id, JobState.failed, error=ErrorInfo(code="queue_unavailable", message=str(exc)))
        if idempotency_key is not None:  # a retry with the same key must queue a new job
            store.release_idempotency_key(idempotency_key, tenant=tenant)
        raise Unavailable("the job queue is unreachable; try again") from exc
    return job


def _check_limits(store: JobStore, settings: Settings, tenant: str) -> None:
    """Per-tenant limits on new jobs: 429 with Retry-After, before anything is created (a
    replayed Idempotency-Key request returns its job and is not counted)."""
    wait = store.take_submission(tenant, settings.submissions_per_minute)
    if wait:
        raise TooManyRequests(
            f"more than {settings.submissions_per_minute} submissions in a minute (LOFTQ_SUBMISSIONS_PER_MINUTE)",
            code="rate_limited",
            retry_after=wait,
        )
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
    after: Annotated[str | None, Query(max_length=64, description="next_after of the previous page")] = None,
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
def cancel_job(job_id: str, store: StoreDep, tenant: TenantDep) -> Job:
    """Ask a job to stop (checked between layers). Idempotent; a no-op on finished jobs."""
    store.get(job_id, tenant=tenant)  # a job never changes tenant, so checking first is enough
    return store.request_cancel(job_id)


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
        **error_responses(*JOB_ERRORS),
    },
)
def stream_events(
    job_id: str,
    store: StoreDep,
    tenant: TenantDep,
    after: Annotated[str | None, Query(max_length=64, pattern=EVENT_CURSOR)] = None,
) -> StreamingResponse:
    """The same events as server-sent events; the stream ends when the job has ended."""
    after = _event_cursor(after)
    store.get(job_id, tenant=tenant)

    def frames() -> Iterator[str]:
        cursor = after
        while True:
            # Read the state before the events: a job that ended in between still has its
            # final event sent on the next turn.
            finished = store.get(job_id).state.finished
            page = store.events(job_id, after=cursor)
            for event in page.events:
                cursor = event.id
                yield f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(event.model_dump(mode='json'))}\n\n"
            if finished and not page.events:
                return
            if not page.events and not store.wait_events(job_id, after=cursor, timeout_ms=HEARTBEAT_MS):
                yield ": heartbeat\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
