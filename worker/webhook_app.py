"""The webhook worker: a Celery app of its own for webhook deliveries (service/webhooks.py).

Run apart from the conversion workers, with threads, on its own queue, so a receiver that is
slow, down or answering 500 never waits in line with conversions or holds a GPU worker:

    celery -A worker.webhook_app worker -P threads -c 8 -Q loftq-webhooks

Each attempt is one task run; a failed attempt is retried after the next of the operator's
waits (LOFTQ_WEBHOOK_RETRY_SECONDS). Messages are acknowledged after the attempt, so a worker
lost mid-attempt has its delivery sent again: at least once, with the same webhook-id.
"""

from __future__ import annotations

from celery import Celery

from service.settings import get_settings
from service.store import JobStore
from service.webhooks import WEBHOOK_TASK, deliver_once
from worker.celery_app import SHARED_CONF

settings = get_settings()
celery_app = Celery("loftq-webhooks", broker=settings.redis_url)
celery_app.conf.update(
    SHARED_CONF,
    task_default_queue=settings.webhook_queue,
    worker_prefetch_multiplier=4,
    # Above the longest retry wait: a retry is a message with an ETA, held unacknowledged.
    broker_transport_options={"visibility_timeout": int(max(settings.webhook_retry_seconds, default=0)) + 3600},
)
_store: JobStore | None = None


def _job_store() -> JobStore:
    global _store
    if _store is None:
        _store = JobStore.from_url(settings.redis_url, retention_seconds=settings.job_retention_seconds)
    return _store


@celery_app.task(name=WEBHOOK_TASK, bind=True, max_retries=None)
def deliver_webhook(self, job_id: str, delivery_id: str) -> None:
    wait = deliver_once(_job_store(), settings, job_id, delivery_id)
    if wait is not None:
        raise self.retry(countdown=wait)
