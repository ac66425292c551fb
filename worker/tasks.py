"""The Celery task: one message per job; the runner does the work."""

from __future__ import annotations

from api.jobstore import JobStore
from api.settings import get_settings
from worker.celery_app import RUN_JOB, celery_app
from worker.runner import JobRunner


_settings = get_settings()


@celery_app.task(
    name=RUN_JOB,
    bind=True,
    # The soft limit raises inside the job (it fails with code "timeout"); the hard one kills a
    # child that does not return, so a hung download cannot hold a GPU worker forever.
    soft_time_limit=_settings.job_timeout_seconds,
    time_limit=_settings.job_timeout_seconds + 120,
)
def run_job(self, job_id: str) -> None:
    settings = get_settings()
    store = JobStore.from_url(settings.redis_url, retention_seconds=settings.job_retention_seconds)
    if not JobRunner(store, settings).run(job_id):
        # Leased elsewhere: a live duplicate (it will finish the job) or a dead worker whose
        # lease will expire. Come back after a lease period instead of dropping the job.
        raise self.retry(countdown=settings.lease_seconds, max_retries=None)
