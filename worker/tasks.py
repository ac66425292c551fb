"""The Celery task: one message per job; the runner does the work."""

from __future__ import annotations

from api.jobstore import JobStore
from api.settings import get_settings
from worker.celery_app import RUN_JOB, celery_app
from worker.runner import JobRunner


@celery_app.task(name=RUN_JOB)
def run_job(job_id: str) -> None:
    settings = get_settings()
    store = JobStore.from_url(settings.redis_url, retention_seconds=settings.job_retention_seconds)
    JobRunner(store, settings).run(job_id)
