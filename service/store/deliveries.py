"""Webhook deliveries of a job: what was sent where, how often, and how it was answered.

One hash per job (``p webhooks:{id}``): delivery id → the record (JSON), ``{id}:body`` → the
exact body every attempt sends, ``{id}:secret`` → the secret that signs it. The hash lives as
long as the job's record: it takes the record's expiry when it is written after the job has
finished. ``p webhooks:due`` (sorted set, "{job} {delivery}" → when its next attempt is due,
with a grace) lets the sweeper send again a delivery whose message never arrived."""

from __future__ import annotations

import builtins
import time

from service.models import WebhookDelivery
from service.store.base import StoreBase

# KEYS[1] job, KEYS[2] deliveries; ARGV: field, value, ... Written only while the job exists,
# and expiring with it (a delivery of a job's end is written after the job's keys got their TTL).
_ADD_IF_JOB = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], unpack(ARGV))
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
"""
# KEYS[1] deliveries; ARGV: field, value. An attempt's outcome, unless the deliveries are gone.
_SAVE_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


class Deliveries(StoreBase):
    """Delivery records for the webhook task (worker/webhook_app.py) and ``GET /v1/jobs/{id}/webhooks``.

    A delivery holds all it needs (the body and the secret that signs it), so it can still be
    sent after its job was deleted: ``Records.delete`` leaves the deliveries to expire."""

    @property
    def _due_key(self) -> str:
        return f"{self.prefix}webhooks:due"

    def add_delivery(self, job_id: str, delivery: WebhookDelivery, body: bytes, secret: str, *, due: float) -> bool:
        """False when the job is gone (deleted or expired): nothing is recorded for it. ``due``:
        the time after which the sweeper sends it again if no attempt was recorded."""
        args = [delivery.id, delivery.model_dump_json(), f"{delivery.id}:body", body, f"{delivery.id}:secret", secret]
        if not self._script(_ADD_IF_JOB)(keys=[self._job_key(job_id), self._deliveries_key(job_id)], args=args):
            return False
        self.client.zadd(self._due_key, {f"{job_id} {delivery.id}": due})
        return True

    def save_delivery(self, job_id: str, delivery: WebhookDelivery, *, due: float | None = None) -> None:
        """Record an attempt's outcome; ``due`` (a pending delivery): when the next one is late."""
        self._script(_SAVE_IF_EXISTS)(keys=[self._deliveries_key(job_id)], args=[delivery.id, delivery.model_dump_json()])
        member = f"{job_id} {delivery.id}"
        if delivery.state == "pending" and due is not None:
            self.client.zadd(self._due_key, {member: due})
        else:
            self.client.zrem(self._due_key, member)

    def overdue_deliveries(self, *, limit: int = 100) -> builtins.list[tuple[str, str, int]]:
        """(job id, delivery id, attempts so far) of pending deliveries past their due time;
        those that are gone or settled meanwhile are dropped from the index."""
        members = self.client.zrangebyscore(self._due_key, "-inf", time.time(), start=0, num=limit)
        overdue, stale = [], []
        for member in members:
            job_id, _, delivery_id = member.partition(" ")
            found = self.delivery(job_id, delivery_id)
            if found is None or found[0].state != "pending":
                stale.append(member)
            else:
                overdue.append((job_id, delivery_id, found[0].attempts))
        if stale:
            self.client.zrem(self._due_key, *stale)
        return overdue

    def delivery(self, job_id: str, delivery_id: str) -> tuple[WebhookDelivery, bytes, str] | None:
        """(record, body, secret), or None once the deliveries have expired."""
        fields = [delivery_id, f"{delivery_id}:body", f"{delivery_id}:secret"]
        record, body, secret = self.client.hmget(self._deliveries_key(job_id), fields)
        if record is None or body is None or secret is None:
            return None
        return WebhookDelivery.model_validate_json(record), body.encode() if isinstance(body, str) else body, secret

    def deliveries(self, job_id: str) -> builtins.list[WebhookDelivery]:
        """Oldest first."""
        raw = self.client.hgetall(self._deliveries_key(job_id))
        records = [WebhookDelivery.model_validate_json(value) for name, value in raw.items() if ":" not in name]
        return sorted(records, key=lambda d: (d.created_at, d.target != "job", d.id))

    def webhook_secret(self, job_id: str) -> str | None:
        """The secret of the job's own webhook (kept beside its record, never in it)."""
        return self.client.hget(self._job_key(job_id), "webhook_secret")
