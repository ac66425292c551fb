"""Admission: idempotent submission and the per-tenant limits checked before a job exists."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from service.errors import IdempotencyKeyReused, JobNotFound
from service.locations import JobInputs
from service.models import Job, JobCreate, JobState
from service.store.records import Records, new_job_id


class Admission(Records):
    """Idempotency keys, the submission rate window and the queued-jobs count of a tenant."""

    def create_idempotent(
        self,
        request: JobCreate,
        key: str,
        *,
        tenant: str = "default",
        prefix: str = "",
        wait_seconds: float = 5.0,
        admit: Callable[[], None] | None = None,
        webhook_secret: str | None = None,
        inputs: JobInputs | None = None,
    ) -> tuple[Job, bool]:
        """The job created for ``key`` by this tenant, or a new one: (job, created).

        The first request with a key claims it atomically (SET NX) with the body's fingerprint
        and the id its job will have; a repeat with the same body gets that job (waiting a
        moment if the first request is still creating it), a different body is
        ``IdempotencyKeyReused``. Keys live as long as jobs are retained. ``admit`` (the
        request limits) runs only when a job may be created, so a replay is never refused."""
        fingerprint = hashlib.sha256(request.model_dump_json().encode()).hexdigest()
        claim = self._idempotency_key(tenant, key)
        job_id = new_job_id()
        if admit is not None and self.client.get(claim) is None:
            admit()
        if self.client.set(claim, f"{job_id} {fingerprint}", nx=True, ex=self.retention_seconds):
            return self.create(request, tenant=tenant, prefix=prefix, job_id=job_id, webhook_secret=webhook_secret, inputs=inputs), True
        deadline = time.monotonic() + wait_seconds
        while True:
            raw = self.client.get(claim)
            if raw is None:  # released (its job could not be queued): claim it afresh
                return self.create_idempotent(
                    request, key, tenant=tenant, prefix=prefix, wait_seconds=wait_seconds, admit=admit, webhook_secret=webhook_secret, inputs=inputs
                )
            owner, owner_fingerprint = (raw.decode() if isinstance(raw, bytes) else raw).split(" ", 1)
            if owner_fingerprint != fingerprint:
                raise IdempotencyKeyReused("this Idempotency-Key was used for a different request; use a new key")
            try:
                return self.get(owner, tenant=tenant), False
            except JobNotFound:
                if time.monotonic() > deadline:  # the first request died between claim and create
                    self.client.delete(claim)
                    continue
                time.sleep(0.05)

    def count_queued(self, tenant: str) -> int:
        return int(self.client.zcard(self._index_key(state=JobState.queued, tenant=tenant)))

    def take_submission(self, tenant: str, per_minute: int) -> int:
        """Count a submission in the tenant's current one-minute window. Returns 0 when it is
        within ``per_minute``, else the seconds until the window ends (for Retry-After)."""
        now = time.time()
        window = int(now // 60)
        key = f"{self.prefix}rate:{tenant}:{window}"
        with self.client.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, 120)
            count, _ = pipe.execute()
        return 0 if int(count) <= per_minute else int((window + 1) * 60 - now) + 1

    def release_idempotency_key(self, key: str, *, tenant: str = "default") -> None:
        """Forget a key whose job never reached the queue, so that a retry creates a job."""
        self.client.delete(self._idempotency_key(tenant, key))

    def _idempotency_key(self, tenant: str, key: str) -> str:
        return f"{self.prefix}idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"
