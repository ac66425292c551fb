"""Handing jobs to the workers: one Celery message per job, sent by task name so the API
never imports the worker's code (or torch).

A distributed job (``JobCreate.distributed``) sends more messages, all from the workers and
on the same queue: ``RUN_JOB`` plans the parts and sends one ``RUN_PART`` per part; the
worker that finishes the last part sends ``MERGE_JOB`` (docs/adr/0005-scale-out.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import redis
from celery import Celery

from service.webhooks import WEBHOOK_TASK

if TYPE_CHECKING:
    from service.settings import Settings

RUN_JOB = "loftq.run_job"
RUN_PART = "loftq.run_part"  # args: job id, part number
MERGE_JOB = "loftq.merge_job"  # args: job id


class JobQueue:
    def __init__(self, broker_url: str, queue: str, *, webhook_queue: str | None = None) -> None:
        self.queue = queue
        self.webhook_queue = webhook_queue or f"{queue}-webhooks"
        self.broker_url = broker_url
        self.celery = Celery("loftq-api", broker=broker_url)
        self.celery.conf.update(broker_connection_retry_on_startup=True, task_serializer="json")
        self._redis = redis.Redis.from_url(broker_url)

    def enqueue(self, job_id: str) -> None:
        self.send(RUN_JOB, job_id)

    def send(self, task: str, *args: object) -> None:
        """Any of the worker's tasks by name (the sweeper re-sends parts and merges too)."""
        self.celery.send_task(task, args=list(args), queue=self.queue)

    @classmethod
    def from_settings(cls, settings: Settings) -> JobQueue:
        return cls(settings.redis_url, settings.queue, webhook_queue=settings.webhook_queue)

    def send_webhook(self, job_id: str, delivery_id: str) -> None:
        """A webhook delivery, on its own queue: webhook workers never wait behind conversions."""
        self.celery.send_task(WEBHOOK_TASK, args=[job_id, delivery_id], queue=self.webhook_queue)

    def depth(self) -> int:
        """Messages waiting (Celery's Redis transport keeps a queue as a list of that name)."""
        return int(self._redis.llen(self.queue))

    def ping(self) -> bool:
        try:
            return bool(self._redis.ping())
        except redis.RedisError:
            return False
