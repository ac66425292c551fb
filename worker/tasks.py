"""The Celery tasks: one message per job, plus one per part and a merge for distributed jobs;
the runners do the work."""

from __future__ import annotations

from celery.signals import task_prerun

from service.settings import get_settings
from service.store import JobStore
from worker.celery_app import MERGE_JOB, RUN_JOB, RUN_PART, celery_app
from worker.distributed import PartRunner
from worker.limits import apply_memory_limit
from worker.runner import JobRunner

_settings = get_settings()
# The soft limit raises inside the work (the job fails with code "timeout"). A child that cannot
# run Python to see it is killed by its lease watchdog once the grace is over, and the job fails
# "timeout" (worker/watchdog.py); the hard limit, a minute after that, is the last resort (a
# child killed by it is redelivered and runs again). A part and the merge each get the job's limits.
_LIMITS = {
    "soft_time_limit": _settings.job_timeout_seconds,
    "time_limit": _settings.job_timeout_seconds + _settings.cancel_grace_seconds + 60,
}


@task_prerun.connect
def _limit_memory(**_: object) -> None:
    """LOFTQ_WORKER_MEMORY_LIMIT_BYTES, set in the pool child before each task (one per child):
    a job that needs more memory fails out_of_memory instead of exhausting the host."""
    apply_memory_limit(get_settings())


def _enqueue(name: str, *args: object) -> None:
    """Send a part or merge message on this worker's queue (acks_late, like every task here)."""
    celery_app.send_task(name, args=list(args), queue=get_settings().queue)


def _runner(task) -> JobRunner:
    settings = get_settings()
    store = JobStore.from_url(settings.redis_url, retention_seconds=settings.job_retention_seconds)
    return JobRunner(store, settings, worker=task.request.hostname, enqueue=_enqueue)


@celery_app.task(name=RUN_JOB, bind=True, **_LIMITS)
def run_job(self, job_id: str) -> None:
    # False: leased elsewhere. Either a live worker runs it (this is a duplicate delivery,
    # e.g. after the broker's visibility timeout) or a dead one held it, and then the API's
    # sweeper sends it again once the lease has expired (service/sweeper.py). Dropped either way.
    _runner(self).run(job_id)


@celery_app.task(name=RUN_PART, bind=True, **_LIMITS)
def run_part(self, job_id: str, part: int) -> None:
    PartRunner(_runner(self)).run(job_id, part)  # leased elsewhere: dropped, as in run_job


@celery_app.task(name=MERGE_JOB, bind=True, **_LIMITS)
def merge_job(self, job_id: str) -> None:
    _runner(self).run(job_id, merge=True)  # leased elsewhere: dropped, as in run_job
