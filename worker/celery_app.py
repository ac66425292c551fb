"""The Celery app, configured for long GPU jobs (docs/adr/0003-service.md).

The parent process never imports torch or touches CUDA: the task imports the engine inside
the forked child, and every child runs one job (``worker_max_tasks_per_child=1``), so GPU
memory is returned to the driver between jobs.
"""

from __future__ import annotations

from celery import Celery

from service.queue import MERGE_JOB, RUN_JOB, RUN_PART  # noqa: F401 - the task names (the API sends RUN_JOB)
from service.settings import get_settings

SHARED_CONF = {
    "task_serializer": "json",
    "accept_content": ["json"],
    "task_ignore_result": True,
    # A message is acknowledged only once its work is done; if the worker dies, the broker redelivers it.
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "broker_connection_retry_on_startup": True,
    "worker_hijack_root_logger": False,
}
"""What the conversion workers' app and the webhook worker's app (worker/webhook_app.py) share."""

settings = get_settings()
visibility_timeout = settings.visibility_timeout_seconds or settings.job_timeout_seconds + 600
celery_app = Celery("loftq", broker=settings.redis_url, include=["worker.tasks"])
celery_app.conf.update(
    SHARED_CONF,
    task_default_queue=settings.queue,
    worker_prefetch_multiplier=1,
    worker_max_tasks_per_child=1,
    # Redelivery of an unacknowledged job waits for the visibility timeout: keep it above the
    # longest job, or a healthy long job would be delivered twice (the lease stops that too).
    # Dead workers' jobs come back sooner through the API's sweeper (service/sweeper.py).
    broker_transport_options={
        "visibility_timeout": visibility_timeout,
        # kombu scans for messages past it every interval × throttle seconds (100 s by default).
        "unacked_restore_interval": min(10, max(1, visibility_timeout // 10)),
        "unacked_restore_throttle": 1,
    },
)
