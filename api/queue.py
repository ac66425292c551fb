"""Handing jobs to the workers: one Celery message per job, sent by task name so the API
never imports the worker's code (or torch)."""

from __future__ import annotations

import redis
from celery import Celery

RUN_JOB = "loftq.run_job"


class JobQueue:
    def __init__(self, broker_url: str, queue: str) -> None:
        self.queue = queue
        self.broker_url = broker_url
        self.celery = Celery("loftq-api", broker=broker_url)
        self.celery.conf.update(broker_connection_retry_on_startup=True, task_serializer="json")
        self._redis = redis.Redis.from_url(broker_url)

    def enqueue(self, job_id: str) -> None:
        self.celery.send_task(RUN_JOB, args=[job_id], queue=self.queue)

    def depth(self) -> int:
        """Messages waiting (Celery's Redis transport keeps a queue as a list of that name)."""
        return int(self._redis.llen(self.queue))

    def ping(self) -> bool:
        try:
            return bool(self._redis.ping())
        except redis.RedisError:
            return False
