"""Job records and their indexes: create, read, list, and the atomic state write."""

from __future__ import annotations

import builtins
import os
import threading
import time
from collections.abc import Callable

import redis

from service.errors import JobNotFound
from service.locations import JobInputs
from service.models import ErrorInfo, Job, JobCreate, JobPage, JobState, Progress
from service.store.base import EVENTS_MAXLEN, StoreBase, now

_MAX_RETRIES = 100
DELETE_FIELD = "delete"  # job hash field set by DELETE of a running job: remove it once it has ended
# Field writes on a job that must not resurrect an expired or unknown job as a partial hash.
_HSET_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""
_HINCR_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
end
return -1
"""
# KEYS[1] job; ARGV[1] seconds since the job started, then field, increment, ... Counters of
# parts running at once add up in one step; done counts never pass their totals.
_ADD_PROGRESS = """
local raw = redis.call('HGET', KEYS[1], 'progress')
if not raw then return false end
local p = cjson.decode(raw)
for i = 2, #ARGV, 2 do
  p[ARGV[i]] = (tonumber(p[ARGV[i]]) or 0) + tonumber(ARGV[i + 1])
end
local totals = {layers_done = 'layers_total', shards_done = 'shards_total'}
for done, total in pairs(totals) do
  local t = tonumber(p[total]) or 0
  if t > 0 and (tonumber(p[done]) or 0) > t then p[done] = t end
end
p['stage'] = 'converting'
local done, total, elapsed = tonumber(p['layers_done']) or 0, tonumber(p['layers_total']) or 0, tonumber(ARGV[1])
if done > 0 then p['eta_seconds'] = elapsed / done * (total - done) else p['eta_seconds'] = cjson.null end
raw = cjson.encode(p)
redis.call('HSET', KEYS[1], 'progress', raw)
return raw
"""

Decide = Callable[[Job], tuple[Job | None, ErrorInfo | None, dict[str, str]]]
"""What a state change makes of the current record: (the new record or None, the error its
state event carries, extra hash fields to set)."""


class NotLeaseHolder(Exception):
    """A fenced write (``transition(..., holder=)``) by a worker whose lease is gone or another's."""


_id_lock = threading.Lock()
_last_id: tuple[int, int] = (0, 0)


def new_job_id() -> str:
    """``job_`` + 12 hex of the ms timestamp + 8 random hex: unique and sortable by creation time.

    Within one process ids strictly increase even inside one millisecond (the random part is
    bumped), so "newest first" is exact for jobs created by one API process."""
    global _last_id
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        rand = int.from_bytes(os.urandom(4), "big")
        last_ms, last_rand = _last_id
        if ms <= last_ms:
            ms, rand = last_ms, last_rand + 1 + (rand & 0xFFFF)
            if rand > 0xFFFFFFFF:
                ms, rand = last_ms + 1, rand & 0xFFFF
        _last_id = (ms, rand)
    return f"job_{ms:012x}{rand:08x}"


class Records(StoreBase):
    """Job records, the per-state and per-tenant indexes, progress and attempt counters."""

    @property
    def _retained_key(self) -> str:
        return f"{self.prefix}idx:retained"

    @property
    def _outputs_key(self) -> str:
        return f"{self.prefix}idx:outputs"

    def create(
        self,
        request: JobCreate,
        *,
        tenant: str = "default",
        prefix: str = "",
        output: str | None = None,
        job_id: str | None = None,
        webhook_secret: str | None = None,
        inputs: JobInputs | None = None,
    ) -> Job:
        """A queued job of ``tenant``, its artifacts under ``prefix`` (the API passes the tenant's,
        ``tenants/<t>/``) followed by ``output``, the request's ``output`` or ``jobs/<id>/``.
        ``webhook_secret`` is kept beside the record, and returned in this Job only."""
        job_id = job_id or new_job_id()
        out = prefix + (output or request.output or f"jobs/{job_id}/")
        if not out.endswith("/"):
            out += "/"
        job = Job(id=job_id, state=JobState.queued, created_at=now(), request=request, output=out, tenant=tenant, inputs=inputs)
        fields = {"job": self._encode(job), "progress": job.progress.model_dump_json(), "attempts": 0}
        if webhook_secret is not None:
            fields["webhook_secret"] = webhook_secret
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self._job_key(job_id), mapping=fields)
            for key in self._index_keys(job.state, tenant):
                pipe.zadd(key, {job_id: 0})
            pipe.xadd(self._events_key(job_id), self._state_event(job), maxlen=EVENTS_MAXLEN, approximate=True)
            pipe.execute()
        return job.model_copy(update={"webhook_secret": webhook_secret})

    def _index_keys(self, state: JobState, tenant: str) -> list[str]:
        """Every index a job in ``state`` of ``tenant`` belongs to."""
        return [
            self._index_key(),
            self._index_key(state=state),
            self._index_key(tenant=tenant),
            self._index_key(state=state, tenant=tenant),
        ]

    def exists(self, job_id: str) -> bool:
        return bool(self.client.exists(self._job_key(job_id)))

    def get(self, job_id: str, *, tenant: str | None = None) -> Job:
        """``tenant`` given: another tenant's job is reported as missing, not as forbidden."""
        job = self._decode(self.client.hgetall(self._job_key(job_id)))
        if job is None or (tenant is not None and job.tenant != tenant):
            raise JobNotFound(f"job {job_id} not found")
        return job

    def list(
        self,
        *,
        limit: int = 20,
        after: str | None = None,
        state: JobState | None = None,
        tenant: str | None = None,
    ) -> JobPage:
        """Newest first. ``after`` is the last id of the previous page; ids are cursors because
        the indexes sort by id, so pages stay stable while jobs are created or change state."""
        self._prune()
        limit = max(1, limit)
        index = self._index_key(state=state, tenant=tenant)
        jobs: builtins.list[Job] = []
        cursor = after
        has_more = False
        while True:
            want = limit + 1 - len(jobs)
            upper = f"({cursor}" if cursor else "+"
            ids = self.client.zrevrangebylex(index, upper, "-", start=0, num=want)
            if not ids:
                break
            with self.client.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hgetall(self._job_key(job_id))
                records = pipe.execute()
            for job_id, fields in zip(ids, records):
                job = self._decode(fields)
                if job is None:  # expired between prunes: drop the stale index entry
                    self.client.zrem(index, job_id)
                    continue
                if len(jobs) == limit:
                    has_more = True
                    break
                jobs.append(job)
            if has_more or len(ids) < want:
                break
            cursor = ids[-1]
        return JobPage(jobs=jobs, has_more=has_more, next_after=jobs[-1].id if has_more else None)

    def _prune(self) -> None:
        """Drop index entries of finished jobs whose records have expired (Redis expires keys,
        not sorted-set members)."""
        members = self.client.zrangebyscore(self._expires_key, "-inf", time.time(), start=0, num=1000)
        if not members:
            return
        with self.client.pipeline(transaction=False) as pipe:
            for member in members:
                job_id, _, tenant = member.partition(" ")
                pipe.zrem(self._index_key(), job_id)
                pipe.zrem(self._index_key(tenant=tenant), job_id)
                for state in JobState:
                    pipe.zrem(self._index_key(state=state), job_id)
                    pipe.zrem(self._index_key(state=state, tenant=tenant), job_id)
            pipe.zrem(self._expires_key, *members)
            pipe.execute()

    def change_state(self, job_id: str, decide: Decide, holder: tuple[str, str] | None = None) -> Job:
        """Write what ``decide`` makes of the current record, atomically (service/lifecycle.py
        decides; this only stores). WATCH/MULTI loop. ``decide(current)`` returns ``(new_job or None, event_error, fields)``:
        the new state to write (None: state unchanged) and extra hash fields to set; it may raise.
        Retried when the hash changed underneath (a concurrent transition or progress write).
        ``holder`` (lease id, owner): written only while that owner holds that lease (else
        ``NotLeaseHolder``); the lease key is watched too, so it cannot change hands meanwhile."""
        key = self._job_key(job_id)
        lease_key = self._lease_key(holder[0]) if holder is not None else None
        for _ in range(_MAX_RETRIES):
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(key, *([lease_key] if lease_key else []))
                    if holder is not None and pipe.get(lease_key) != holder[1]:
                        raise NotLeaseHolder(f"{holder[1]} does not hold the lease of {holder[0]}")
                    current = self._decode(pipe.hgetall(key))
                    if current is None:
                        raise JobNotFound(f"job {job_id} not found")
                    job, event_error, fields = decide(current)
                    pipe.multi()
                    if job is not None:
                        self._write_state(pipe, current, job, event_error)
                    if fields:
                        pipe.hset(key, mapping=fields)
                    pipe.execute()
                    return job or current
                except redis.WatchError:
                    continue
        raise RuntimeError(f"job {job_id}: too much contention to change state")

    def _write_state(self, pipe, current: Job, job: Job, error: ErrorInfo | None) -> None:
        """Queue the record, the index moves, the state event and (when finished) the expiry."""
        job_id, tenant = job.id, job.tenant
        pipe.hset(self._job_key(job_id), "job", self._encode(job))
        if job.state != current.state:
            pipe.zrem(self._index_key(state=current.state), job_id)
            pipe.zrem(self._index_key(state=current.state, tenant=tenant), job_id)
            pipe.zadd(self._index_key(state=job.state), {job_id: 0})
            pipe.zadd(self._index_key(state=job.state, tenant=tenant), {job_id: 0})
        pipe.xadd(self._events_key(job_id), self._state_event(job, error), maxlen=EVENTS_MAXLEN, approximate=True)
        if job.state.finished:
            expires = time.time() + self.retention_seconds
            for key in self._job_keys(job_id):
                pipe.expire(key, self.retention_seconds)
            pipe.zadd(self._expires_key, {f"{job_id} {tenant}": expires})
            pipe.zadd(self._retained_key, {job_id: expires})  # its artifacts go when the record does
            pipe.hset(self._outputs_key, job_id, f"{tenant} {job.output}")

    def cancel_requested(self, job_id: str) -> bool:
        """False for unknown or expired jobs as well."""
        return self.client.hget(self._job_key(job_id), "cancel") == "1"

    def update_progress(self, job_id: str, progress: Progress) -> None:
        """One atomic field write (no event, no state change); emit an event separately if
        clients should see it live."""
        if not self._script(_HSET_IF_EXISTS)(keys=[self._job_key(job_id)], args=["progress", progress.model_dump_json()]):
            raise JobNotFound(f"job {job_id} not found")

    def increment_attempts(self, job_id: str) -> int:
        count = int(self._script(_HINCR_IF_EXISTS)(keys=[self._job_key(job_id)], args=["attempts"]))
        if count < 0:
            raise JobNotFound(f"job {job_id} not found")
        return count

    def add_progress(self, job_id: str, *, elapsed: float, **increments: int) -> Progress:
        """Add to the job's progress counters (``layers_done=1``, ``bytes_read=n``, ...) in one
        atomic step, so parts running at once never overwrite each other's counts; the stage
        becomes "converting" and the ETA is recomputed from ``elapsed`` (seconds since start)."""
        args: builtins.list = [elapsed]
        for field, value in increments.items():
            if field not in Progress.model_fields:
                raise ValueError(f"not a progress field: {field}")
            args += [field, int(value)]
        raw = self._script(_ADD_PROGRESS)(keys=[self._job_key(job_id)], args=args)
        if raw is None:
            raise JobNotFound(f"job {job_id} not found")
        return Progress.model_validate_json(raw)

    def ids_in_state(self, state: JobState, *, limit: int = 10_000) -> builtins.list[str]:
        """Ids of every tenant's jobs in ``state``, oldest first."""
        return self.client.zrangebylex(self._index_key(state=state), "-", "+", start=0, num=limit)

    def delete(self, job: Job, *, keep_deliveries_seconds: int = 0) -> None:
        """Remove a job's keys and index entries (its artifacts are the caller's to remove first).
        Its webhook deliveries stay ``keep_deliveries_seconds`` more, for retries still due."""
        deliveries = self._deliveries_key(job.id)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(*(key for key in self._job_keys(job.id) if key != deliveries), self._lease_key(job.id))
            if keep_deliveries_seconds > 0:
                pipe.expire(deliveries, keep_deliveries_seconds)
            else:
                pipe.delete(deliveries)
            for key in self._index_keys(job.state, job.tenant):
                pipe.zrem(key, job.id)
            pipe.zrem(self._expires_key, f"{job.id} {job.tenant}")
            pipe.zrem(self._retained_key, job.id)
            pipe.hdel(self._outputs_key, job.id)
            pipe.execute()

    def delete_requested(self, job_id: str) -> bool:
        """Whether DELETE asked for the job to be removed once it has ended."""
        return self.client.hget(self._job_key(job_id), DELETE_FIELD) == "1"

    def expired_outputs(self, *, limit: int = 100) -> builtins.list[tuple[str, str, str] | tuple[str, None, None]]:
        """(job id, tenant, output prefix) of finished jobs whose retention has run out: their
        records are gone (Redis expired them) and their artifacts are the sweeper's to remove."""
        ids = self.client.zrangebyscore(self._retained_key, "-inf", time.time(), start=0, num=limit)
        if not ids:
            return []
        found = []
        for job_id, value in zip(ids, self.client.hmget(self._outputs_key, ids)):
            tenant, _, output = (value or "").partition(" ")
            found.append((job_id, tenant, output) if output else (job_id, None, None))
        return found

    def forget_outputs(self, job_ids: builtins.list[str]) -> None:
        """Drop expired jobs from the retention index once their artifacts are removed."""
        if job_ids:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.zrem(self._retained_key, *job_ids)
                pipe.hdel(self._outputs_key, *job_ids)
                pipe.execute()
