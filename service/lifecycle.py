"""The job lifecycle: every change of a job's state goes through here, and nothing else
writes an end state (succeeded, failed, cancelled).

    submit → queued → start → running → finish → succeeded | failed | cancelled
                                    └→ cancel → cancelling → finish → cancelled (or failed/succeeded)

Whoever decides an end records it here: the worker (its result, its error, a cancellation it
saw), its watchdog (a timeout), the sweeper (a worker that died every time, a cancellation
whose worker is gone), a cancel of a queued job, a queue that could not take a new job. The
job store writes each change atomically with compare-and-set, so exactly one caller wins an
end; that caller runs the hooks, once per end (webhooks, and the removal of a job deleted while
it ran). Hooks never fail the change that triggered them: a hook that raises is logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import redis

from service.errors import InvalidTransition
from service.locations import JobInputs
from service.models import TRANSITIONS, ErrorInfo, Job, JobCreate, JobState, JobSummary, Progress
from service.store import JobStore, NotLeaseHolder
from service.store.base import now
from service.store.records import DELETE_FIELD

if TYPE_CHECKING:
    from service.queue import JobQueue
    from service.settings import Settings
    from service.storage import ObjectStore

log = logging.getLogger(__name__)

Hook = Callable[[str, Job], None]
"""Called with the event ("job.started", "job.progress", "job.succeeded", "job.failed",
"job.cancelled") and the job as it is after the change."""

def _event(job: Job) -> str:
    return f"job.{job.state.value}"


def _moved(job: Job, to: JobState, error: ErrorInfo | None = None, summary: JobSummary | None = None) -> Job:
    update: dict = {"state": to}
    if to == JobState.running and job.started_at is None:
        update["started_at"] = now()
    if to.finished:
        update["finished_at"] = now()
    if error is not None:
        update["error"] = error
    if summary is not None:
        update["summary"] = summary
    return job.model_copy(update=update)


class Lifecycle:
    def __init__(self, store: JobStore, hooks: Sequence[Hook] = ()) -> None:
        self.store = store
        self.hooks = list(hooks)

    def _run_hooks(self, event: str, job: Job) -> None:
        for hook in self.hooks:
            try:
                hook(event, job)
            except Exception:
                log.exception("the %s hook %r failed for job %s", event, hook, job.id)

    # -- submit -------------------------------------------------------------------------------

    def submit(
        self,
        request: JobCreate,
        *,
        tenant: str,
        prefix: str,
        idempotency_key: str | None = None,
        admit: Callable[[], None] | None = None,
        inputs: JobInputs | None = None,
    ) -> tuple[Job, bool]:
        """(job, created): a new queued job, or the one an earlier request with the same
        ``idempotency_key`` created. ``inputs``: the request's URIs as the API parsed them, kept
        with the job for the worker. A job with a webhook gets its signing secret here, in the
        returned Job only."""
        from service.webhooks import new_secret

        secret = new_secret() if request.webhook_url else None
        if idempotency_key is None:
            if admit is not None:
                admit()
            return self.store.create(request, tenant=tenant, prefix=prefix, webhook_secret=secret, inputs=inputs), True
        return self.store.create_idempotent(
            request, idempotency_key, tenant=tenant, prefix=prefix, admit=admit, webhook_secret=secret, inputs=inputs
        )

    # -- changes ------------------------------------------------------------------------------

    def transition(
        self,
        job_id: str,
        to: JobState,
        *,
        error: ErrorInfo | None = None,
        summary: JobSummary | None = None,
        expect: set[JobState] | None = None,
        holder: tuple[str, str] | None = None,
    ) -> Job:
        """Move a job to ``to`` if the state machine allows it (InvalidTransition otherwise).
        ``holder`` (lease id, owner): a worker records a change only while it holds the lease it
        ran under, so an attempt that lost it (another owns the work now) cannot."""
        to = JobState(to)
        first_start = False

        def decide(job: Job):
            nonlocal first_start
            if expect is not None and job.state not in expect:
                raise InvalidTransition(f"job {job_id} is {job.state.value}, expected one of {sorted(s.value for s in expect)}")
            if to not in TRANSITIONS[job.state]:
                raise InvalidTransition(f"job {job_id} cannot go from {job.state.value} to {to.value}")
            first_start = to is JobState.running and job.started_at is None
            return _moved(job, to, error, summary), error, {}

        job = self.store.change_state(job_id, decide, holder)
        if first_start:
            self._run_hooks("job.started", job)
        if job.state.finished:
            self._ended(job)
        return job

    def start(self, job_id: str) -> Job:
        return self.transition(job_id, JobState.running)

    def finish(
        self,
        job_id: str,
        state: JobState,
        *,
        error: ErrorInfo | None = None,
        summary: JobSummary | None = None,
        holder: tuple[str, str] | None = None,
    ) -> Job | None:
        """Record an end; None when it is not this caller's to record (the job ended already, or
        the lease is another's). A brief Redis outage is waited out: a job must not stay running
        forever because its end could not be written."""
        if not JobState(state).finished:
            raise ValueError(f"{state} is not an end state")
        for attempt in range(5):
            try:
                return self.transition(job_id, state, error=error, summary=summary, holder=holder)
            except InvalidTransition:
                log.info("job %s already ended; %s not recorded", job_id, JobState(state).value)
                return None
            except NotLeaseHolder as exc:
                log.warning("job %s: %s; %s not recorded", job_id, exc, JobState(state).value)
                return None
            except redis.RedisError:
                if attempt == 4:
                    raise
                time.sleep(2**attempt)

    def cancel(self, job_id: str, *, delete: bool = False) -> Job:
        """Idempotent: a queued job is cancelled at once; a running one becomes cancelling and its
        worker sees ``cancel_requested``; a cancelling or finished job is returned unchanged.
        ``delete``: remove the job once it has ended (service/deletion.py)."""

        ended = False

        def decide(job: Job):
            nonlocal ended
            moved = None
            if job.state == JobState.queued:
                moved = _moved(job, JobState.cancelled)
            elif job.state == JobState.running:
                moved = _moved(job, JobState.cancelling)
            ended = moved is not None and moved.state.finished  # decided on the record the write is checked against
            return moved, None, {"cancel": "1", **({DELETE_FIELD: "1"} if delete else {})}

        job = self.store.change_state(job_id, decide)
        if ended:
            self._ended(job)
        return job

    # -- progress -----------------------------------------------------------------------------

    def progress(self, job: Job, progress: Progress) -> None:
        """Replace ``job``'s progress (one atomic field write; its state is not touched)."""
        self.store.update_progress(job.id, progress)
        self._run_hooks("job.progress", job.model_copy(update={"progress": progress}))

    def add_progress(self, job: Job, *, elapsed: float, **increments: int) -> Progress:
        """Add to ``job``'s progress counters atomically (parts of a distributed job report at once)."""
        progress = self.store.add_progress(job.id, elapsed=elapsed, **increments)
        self._run_hooks("job.progress", job.model_copy(update={"progress": progress}))
        return progress

    def _ended(self, job: Job) -> None:
        self._run_hooks(_event(job), job)


def service_lifecycle(store: JobStore, settings: Settings, *, queue: JobQueue, artifacts: ObjectStore) -> Lifecycle:
    """The lifecycle with the service's hooks, in order: webhooks first (a delivery carries all
    it needs, so it is still sent if the next hook removes the job), then the removal of a job
    deleted while it ran."""
    from service.deletion import RemoveWhenEnded
    from service.webhooks import WebhookHook, retry_window

    hooks = [WebhookHook(store, settings, queue.send_webhook), RemoveWhenEnded(store, artifacts, retry_window(settings))]
    return Lifecycle(store, hooks)
