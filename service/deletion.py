"""Removing jobs: ``DELETE /v1/jobs/{id}`` now, and finished jobs whose retention has run out.

A job's artifacts are everything under its output prefix, which lies in its tenant's area
(``tenants/<tenant>/``; the bucket root minus ``tenants/`` for the open API's ``default``):
a prefix outside it is never removed, whatever the record says.
"""

from __future__ import annotations

import logging

from service.lifecycle import Lifecycle
from service.models import Job
from service.storage import ObjectStore
from service.store import JobStore
from service.tenants import DEFAULT_TENANT, tenant_prefix

log = logging.getLogger(__name__)


def in_tenant_area(tenant: str, output: str) -> bool:
    top = output.split("/", 1)[0]
    if tenant == DEFAULT_TENANT:
        return bool(output) and top not in ("tenants", "")
    area = tenant_prefix(tenant)
    return output.startswith(area) and len(output) > len(area)


def remove_artifacts(artifacts: ObjectStore, tenant: str, output: str) -> bool:
    """Remove everything under ``output`` if it lies in ``tenant``'s area; False (and an error
    in the log: the record was not written by this service) if it does not."""
    if not in_tenant_area(tenant, output):
        log.error("a job of tenant %r names output %r outside its area; its artifacts are not removed", tenant, output)
        return False
    artifacts.delete_prefix(output)
    return True


def remove_job(store: JobStore, artifacts: ObjectStore, job: Job, *, keep_deliveries_seconds: int = 0) -> None:
    """The job's artifacts, then its record (a failure leaves the record, so it can be retried)."""
    remove_artifacts(artifacts, job.tenant, job.output)
    store.delete(job, keep_deliveries_seconds=keep_deliveries_seconds)


class RemoveWhenEnded:
    """The lifecycle hook that removes a job deleted while it was queued or running, once its end
    is written: its worker has stopped writing artifacts by then."""

    def __init__(self, store: JobStore, artifacts: ObjectStore, keep_deliveries_seconds: int) -> None:
        self.store, self.artifacts, self.keep = store, artifacts, keep_deliveries_seconds

    def __call__(self, event: str, job: Job) -> None:
        if job.state.finished and self.store.delete_requested(job.id):
            remove_job(self.store, self.artifacts, job, keep_deliveries_seconds=self.keep)
            log.info("job %s removed once it ended, as DELETE asked", job.id)


def delete_job(lifecycle: Lifecycle, artifacts: ObjectStore, job: Job, *, keep_deliveries_seconds: int = 0) -> Job | None:
    """None: removed now (a finished or queued job). A Job (cancelling): its worker is asked to
    stop, and the job is removed when its end is written (``RemoveWhenEnded``)."""
    if not job.state.finished:
        job = lifecycle.cancel(job.id, delete=True)
        if not job.state.finished:
            return job
        if not lifecycle.store.exists(job.id):
            return None  # the cancel ended it, and the removal hook took it with its end
    remove_job(lifecycle.store, artifacts, job, keep_deliveries_seconds=keep_deliveries_seconds)
    return None
