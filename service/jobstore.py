"""Redis-backed job store shared by the API and the Celery workers.

Layout (``p`` = prefix):

* ``p job:{id}``   hash: ``job`` (the Job as JSON, without progress/attempts), ``progress`` (JSON),
  ``attempts`` (int), ``cancel`` ("1" once cancellation was asked). Progress and attempts live in
  their own fields so the per-layer progress write and the attempt counter are single atomic
  commands that never rewrite (and never race with) the state.
* ``p events:{id}`` stream of events (``type``, ``time``, ``data`` as JSON).
* ``p lease:{id}``  the worker that owns the job (``SET NX EX``).
* ``p idx:all``, ``p idx:state:{state}``, ``p idx:tenant:{tenant}``,
  ``p idx:tenant:{tenant}:state:{state}``: sorted sets of job ids, all scores 0, so members sort
  by id; ids are time-sortable, so a reverse lex range is "newest first" and an id is a cursor.
* ``p parts:{id}`` (distributed jobs) hash: part number → JSON list of the weight shards it
  converts; ``p parts:{id}:done`` hash: part number → JSON of who finished it (Celery worker
  name, lease owner, seconds); ``p parts:{id}:attempts`` hash: deliveries per part (and of
  the merge, field ``merge``). Part leases are ``p lease:{id}:part:{n}``. Finishing a part
  and "was it the last one?" is one script, so exactly one worker sends the merge.
* ``p idx:expires``: finished jobs (member ``"{id} {tenant}"``, score = unix time their keys
  expire) so index entries can be pruned once the records expire.

State changes are check-and-set under WATCH/MULTI; the per-state indexes change in the same
transaction as the record, so counts and filtered lists never disagree with ``get``.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone

import redis

from loftq.options import STORED
from service.errors import IdempotencyKeyReused, InvalidTransition, JobNotFound
from service.models import (
    TRANSITIONS,
    ErrorInfo,
    Event,
    EventPage,
    Job,
    JobCreate,
    JobPage,
    JobState,
    JobSummary,
    Progress,
)

EVENTS_MAXLEN = 10_000
_MAX_RETRIES = 100

# Compare-and-act scripts: the check and the write must be one atomic step.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
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

# Distributed jobs. KEYS[1] job, KEYS[2] parts; ARGV[1] ttl, then part number, shards JSON, ...
# Records the part set once (a redelivered RUN_JOB gets the first plan back).
_INIT_PARTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 2))
  redis.call('EXPIRE', KEYS[2], ARGV[1])
end
return redis.call('HGETALL', KEYS[2])
"""
# KEYS[1] parts, KEYS[2] done; ARGV: part, record, ttl. -1 unknown part, 0 finished before,
# 1 finished now, 2 finished now and it was the last one (exactly one caller sees 2).
_FINISH_PART = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return -1 end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('EXPIRE', KEYS[2], ARGV[3])
if redis.call('HLEN', KEYS[2]) == redis.call('HLEN', KEYS[1]) then return 2 end
return 1
"""
_HINCR_TTL = """
local count = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return count
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
MERGE = "merge"  # the attempts field of a distributed job's merge


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


def _now() -> datetime:
    return datetime.now(timezone.utc)


DURATION_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 12 * 3600.0)


class JobStore:
    """Jobs, their events, cancellation flags and worker leases in one Redis database."""

    def __init__(self, client: redis.Redis, *, retention_seconds: int = 30 * 24 * 3600, prefix: str = "loftq:") -> None:
        self.client = client
        self.retention_seconds = retention_seconds
        self.prefix = prefix
        self.url: str | None = None  # the server's URL when made by from_url
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._hset_if_exists = client.register_script(_HSET_IF_EXISTS)
        self._hincr_if_exists = client.register_script(_HINCR_IF_EXISTS)
        self._init_parts = client.register_script(_INIT_PARTS)
        self._finish_part = client.register_script(_FINISH_PART)
        self._hincr_ttl = client.register_script(_HINCR_TTL)
        self._add_progress = client.register_script(_ADD_PROGRESS)

    @classmethod
    def from_url(cls, url: str, **kwargs) -> JobStore:
        """``retention_seconds`` and ``prefix`` go to the store, other kwargs to the client. The
        read timeout (30 s) stays above the longest blocking XREAD of ``wait_events`` callers
        (the SSE heartbeat, 15 s); redis-py's own default (5 s) would cut those short."""
        store_kwargs = {k: kwargs.pop(k) for k in ("retention_seconds", "prefix") if k in kwargs}
        client_kwargs = {"socket_connect_timeout": 5, "socket_timeout": 30, "health_check_interval": 30, **kwargs, "decode_responses": True}
        store = cls(redis.Redis.from_url(url, **client_kwargs), **store_kwargs)
        store.url = url  # a worker's lease watchdog (worker/watchdog.py) opens the same store from it
        return store

    # -- keys ---------------------------------------------------------------------------------

    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _events_key(self, job_id: str) -> str:
        return f"{self.prefix}events:{job_id}"

    def _lease_key(self, job_id: str) -> str:
        return f"{self.prefix}lease:{job_id}"

    def _parts_keys(self, job_id: str) -> tuple[str, str, str]:
        """The part set, the finished parts and the attempts per part of a distributed job."""
        key = f"{self.prefix}parts:{job_id}"
        return key, f"{key}:done", f"{key}:attempts"

    def _index_key(self, state: JobState | None = None, tenant: str | None = None) -> str:
        key = f"{self.prefix}idx"
        if tenant is not None:
            key += f":tenant:{tenant}"
        if state is not None:
            key += f":state:{JobState(state).value}"
        if tenant is None and state is None:
            key += ":all"
        return key

    @property
    def _expires_key(self) -> str:
        return f"{self.prefix}idx:expires"

    # -- health -------------------------------------------------------------------------------

    def ping(self) -> bool:
        """Readiness probe: never raises, so /healthz can report instead of crash."""
        try:
            return bool(self.client.ping())
        except (redis.RedisError, OSError):
            return False

    # -- records ------------------------------------------------------------------------------

    @staticmethod
    def _decode(fields: dict[str, str]) -> Job | None:
        if not fields or "job" not in fields:
            return None
        data = json.loads(fields["job"])
        data["progress"] = json.loads(fields["progress"]) if "progress" in fields else {}
        data["attempts"] = int(fields.get("attempts", 0))
        return Job.model_validate(data, context=STORED)  # stays readable when checks are added; the worker re-checks

    @staticmethod
    def _encode(job: Job) -> str:
        return job.model_dump_json(exclude={"progress", "attempts"})

    def _state_event(self, job: Job, error: ErrorInfo | None = None) -> dict[str, str]:
        data: dict = {"state": job.state.value}
        if error is not None:
            data["error"] = error.model_dump()
        return self._event_fields("state", data)

    @staticmethod
    def _event_fields(type: str, data: dict) -> dict[str, str]:
        return {"type": type, "time": _now().isoformat(), "data": json.dumps(data)}

    def create_idempotent(
        self,
        request: JobCreate,
        key: str,
        *,
        tenant: str = "default",
        prefix: str = "",
        wait_seconds: float = 5.0,
        admit: Callable[[], None] | None = None,
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
            return self.create(request, tenant=tenant, prefix=prefix, job_id=job_id), True
        deadline = time.monotonic() + wait_seconds
        while True:
            raw = self.client.get(claim)
            if raw is None:  # released (its job could not be queued): claim it afresh
                return self.create_idempotent(request, key, tenant=tenant, prefix=prefix, wait_seconds=wait_seconds, admit=admit)
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

    def create(
        self, request: JobCreate, *, tenant: str = "default", prefix: str = "", output: str | None = None, job_id: str | None = None
    ) -> Job:
        """A queued job of ``tenant``, its artifacts under ``prefix`` (the API passes the tenant's,
        ``tenants/<t>/``) followed by ``output``, the request's ``output`` or ``jobs/<id>/``."""
        job_id = job_id or new_job_id()
        out = prefix + (output or request.output or f"jobs/{job_id}/")
        if not out.endswith("/"):
            out += "/"
        job = Job(id=job_id, state=JobState.queued, created_at=_now(), request=request, output=out, tenant=tenant)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(
                self._job_key(job_id),
                mapping={"job": self._encode(job), "progress": job.progress.model_dump_json(), "attempts": 0},
            )
            for key in self._index_keys(job.state, tenant):
                pipe.zadd(key, {job_id: 0})
            pipe.xadd(self._events_key(job_id), self._state_event(job), maxlen=EVENTS_MAXLEN, approximate=True)
            pipe.execute()
        return job

    def _index_keys(self, state: JobState, tenant: str) -> list[str]:
        """Every index a job in ``state`` of ``tenant`` belongs to."""
        return [
            self._index_key(),
            self._index_key(state=state),
            self._index_key(tenant=tenant),
            self._index_key(state=state, tenant=tenant),
        ]

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

    # -- state --------------------------------------------------------------------------------

    def _change(self, job_id: str, decide, holder: tuple[str, str] | None = None) -> Job:
        """WATCH/MULTI loop. ``decide(current)`` returns ``(new_job or None, event_error, fields)``:
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
            for key in (self._job_key(job_id), self._events_key(job_id), *self._parts_keys(job_id)):
                pipe.expire(key, self.retention_seconds)
            pipe.zadd(self._expires_key, {f"{job_id} {tenant}": time.time() + self.retention_seconds})

    @staticmethod
    def _moved(job: Job, to: JobState, error: ErrorInfo | None = None, summary: JobSummary | None = None) -> Job:
        now = _now()
        update: dict = {"state": to}
        if to == JobState.running and job.started_at is None:
            update["started_at"] = now
        if to.finished:
            update["finished_at"] = now
        if error is not None:
            update["error"] = error
        if summary is not None:
            update["summary"] = summary
        return job.model_copy(update=update)

    def transition(
        self,
        job_id: str,
        to: JobState,
        *,
        error: ErrorInfo | None = None,
        summary: JobSummary | None = None,
        expect: set[JobState] | None = None,
        holder: tuple[str, str] | None = None,
    ) -> Job:
        """``holder`` (lease id, owner): a worker records the end only while it holds the lease
        it ran under, so an attempt that lost it (another owns the work now) cannot."""
        to = JobState(to)

        def decide(job: Job):
            if expect is not None and job.state not in expect:
                raise InvalidTransition(f"job {job_id} is {job.state.value}, expected one of {sorted(s.value for s in expect)}")
            if to not in TRANSITIONS[job.state]:
                raise InvalidTransition(f"job {job_id} cannot go from {job.state.value} to {to.value}")
            return self._moved(job, to, error, summary), error, {}

        return self._change(job_id, decide, holder)

    def request_cancel(self, job_id: str) -> Job:
        """Idempotent: queued jobs are cancelled at once; running ones become cancelling and the
        worker sees ``cancel_requested``; cancelling or finished jobs are returned unchanged."""

        def decide(job: Job):
            moved = None
            if job.state == JobState.queued:
                moved = self._moved(job, JobState.cancelled)
            elif job.state == JobState.running:
                moved = self._moved(job, JobState.cancelling)
            return moved, None, {"cancel": "1"}

        return self._change(job_id, decide)

    def cancel_requested(self, job_id: str) -> bool:
        """False for unknown or expired jobs as well."""
        return self.client.hget(self._job_key(job_id), "cancel") == "1"

    def update_progress(self, job_id: str, progress: Progress) -> None:
        """One atomic field write (no event, no state change); emit an event separately if
        clients should see it live."""
        if not self._hset_if_exists(keys=[self._job_key(job_id)], args=["progress", progress.model_dump_json()]):
            raise JobNotFound(f"job {job_id} not found")

    def increment_attempts(self, job_id: str) -> int:
        count = int(self._hincr_if_exists(keys=[self._job_key(job_id)], args=["attempts"]))
        if count < 0:
            raise JobNotFound(f"job {job_id} not found")
        return count

    # -- parts of distributed jobs ------------------------------------------------------------

    def init_parts(self, job_id: str, parts: builtins.list[builtins.list[str]]) -> dict[int, builtins.list[str]]:
        """Record the job's parts (part number → shards) unless they were recorded before, and
        return what is recorded: a redelivered planning step keeps the first plan."""
        if not parts:
            raise ValueError("a distributed job needs at least one part")
        args: builtins.list = [self.retention_seconds]
        for number, shards in enumerate(parts):
            args += [number, json.dumps(shards)]
        reply = self._init_parts(keys=[self._job_key(job_id), self._parts_keys(job_id)[0]], args=args)
        if reply is None:
            raise JobNotFound(f"job {job_id} not found")
        pairs = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2])  # RESP3 / RESP2
        return self._numbered(dict(pairs))

    @staticmethod
    def _numbered(raw: dict[str, str]) -> dict:
        return {int(number): json.loads(value) for number, value in sorted(raw.items(), key=lambda p: int(p[0]))}

    def parts(self, job_id: str) -> dict[int, builtins.list[str]]:
        """Part number → shards; {} for a job that was never split."""
        return self._numbered(self.client.hgetall(self._parts_keys(job_id)[0]))

    def parts_done(self, job_id: str) -> dict[int, dict]:
        """Finished part number → what ``finish_part`` recorded about it."""
        return self._numbered(self.client.hgetall(self._parts_keys(job_id)[1]))

    def finish_part(self, job_id: str, part: int, record: dict) -> bool:
        """Mark ``part`` finished (the first call wins; ``record`` says who did it). True for
        exactly one call per job: the one that finished the last part, which sends the merge."""
        parts_key, done_key, _ = self._parts_keys(job_id)
        result = int(self._finish_part(keys=[parts_key, done_key], args=[part, json.dumps(record), self.retention_seconds]))
        if result < 0:
            raise JobNotFound(f"job {job_id} has no part {part}")
        return result == 2

    def increment_part_attempts(self, job_id: str, part: int | str) -> int:
        """Deliveries of one part (or of the merge, ``part=MERGE``) so far, this one included."""
        return int(self._hincr_ttl(keys=[self._parts_keys(job_id)[2]], args=[part, self.retention_seconds]))

    def add_progress(self, job_id: str, *, elapsed: float, **increments: int) -> Progress:
        """Add to the job's progress counters (``layers_done=1``, ``bytes_read=n``, ...) in one
        atomic step, so parts running at once never overwrite each other's counts; the stage
        becomes "converting" and the ETA is recomputed from ``elapsed`` (seconds since start)."""
        args: builtins.list = [elapsed]
        for field, value in increments.items():
            if field not in Progress.model_fields:
                raise ValueError(f"not a progress field: {field}")
            args += [field, int(value)]
        raw = self._add_progress(keys=[self._job_key(job_id)], args=args)
        if raw is None:
            raise JobNotFound(f"job {job_id} not found")
        return Progress.model_validate_json(raw)

    @staticmethod
    def part_lease_id(job_id: str, part: int) -> str:
        """What the lease methods take for one part's lease (key ``lease:{job}:part:{n}``)."""
        return f"{job_id}:part:{part}"

    # -- events -------------------------------------------------------------------------------

    def add_event(self, job_id: str, type: str, data: dict) -> str:
        if not self.client.exists(self._job_key(job_id)):
            raise JobNotFound(f"job {job_id} not found")
        return self.client.xadd(
            self._events_key(job_id), self._event_fields(type, data), maxlen=EVENTS_MAXLEN, approximate=True
        )

    @staticmethod
    def _parse(entries: Iterable[tuple[str, dict[str, str]]]) -> builtins.list[Event]:
        return [
            Event(id=entry_id, type=f["type"], time=datetime.fromisoformat(f["time"]), data=json.loads(f["data"]))
            for entry_id, f in entries
        ]

    def events(self, job_id: str, *, after: str | None = None, limit: int = 1000) -> EventPage:
        """Events strictly after the cursor ``after``; ``next_after`` is the cursor to pass next
        (unchanged when there was nothing new)."""
        if not self.client.exists(self._job_key(job_id)):
            raise JobNotFound(f"job {job_id} not found")
        low = f"({after}" if after else "-"
        events = self._parse(self.client.xrange(self._events_key(job_id), low, "+", count=max(1, limit)))
        return EventPage(events=events, next_after=events[-1].id if events else after)

    def wait_events(self, job_id: str, *, after: str | None, timeout_ms: int) -> builtins.list[Event]:
        """Events after ``after`` (None: from the start), blocking up to ``timeout_ms`` when there
        are none yet; [] on timeout. Pass the last id seen so no event is missed between calls."""
        streams = {self._events_key(job_id): after or "0-0"}
        block = timeout_ms if timeout_ms > 0 else None  # BLOCK 0 would wait forever
        reply = self.client.xread(streams, count=1000, block=block)
        if not reply:
            return []
        # RESP2 gives [[key, entries]], RESP3 gives {key: [entries]}.
        entries = next(iter(reply.values()))[0] if isinstance(reply, dict) else reply[0][1]
        return self._parse(entries)

    # -- leases -------------------------------------------------------------------------------

    def acquire_lease(self, job_id: str, owner: str, ttl_seconds: int) -> bool:
        return bool(self.client.set(self._lease_key(job_id), owner, nx=True, ex=ttl_seconds))

    def renew_lease(self, job_id: str, owner: str, ttl_seconds: int) -> bool:
        return bool(self._renew(keys=[self._lease_key(job_id)], args=[owner, ttl_seconds]))

    def release_lease(self, job_id: str, owner: str) -> None:
        self._release(keys=[self._lease_key(job_id)], args=[owner])

    def leased(self, job_id: str) -> bool:
        """Whether a live worker holds the lease (``part_lease_id`` for a part's)."""
        return bool(self.client.exists(self._lease_key(job_id)))

    # -- recovery -----------------------------------------------------------------------------

    def ids_in_state(self, state: JobState, *, limit: int = 10_000) -> builtins.list[str]:
        """Ids of every tenant's jobs in ``state``, oldest first."""
        return self.client.zrangebylex(self._index_key(state=state), "-", "+", start=0, num=limit)

    def part_attempts(self, job_id: str) -> dict[str, int]:
        """Deliveries so far of each part (keys "0", "1", ...) and of the merge (``MERGE``)."""
        return {name: int(count) for name, count in self.client.hgetall(self._parts_keys(job_id)[2]).items()}

    def claim_once(self, name: str, ttl_seconds: int) -> bool:
        """True for the first caller in ``ttl_seconds`` across every process: one API replica
        sweeps per period, and one lost attempt is handed out once."""
        return bool(self.client.set(f"{self.prefix}once:{name}", "1", nx=True, ex=max(1, int(ttl_seconds))))

    # -- metrics ------------------------------------------------------------------------------

    def counts_by_state(self) -> dict[str, int]:
        self._prune()
        with self.client.pipeline(transaction=False) as pipe:
            for state in JobState:
                pipe.zcard(self._index_key(state=state))
            counts = pipe.execute()
        return {state.value: int(n) for state, n in zip(JobState, counts)}

    # -- duration histograms (for /metrics) ---------------------------------------------------

    def observe_duration(self, kind: str, seconds: float) -> None:
        """Count ``seconds`` into the shared histogram ``kind`` ("job" or "layer"): workers write,
        every API replica reads the same buckets at scrape time."""
        key = f"{self.prefix}metrics:{kind}_seconds"
        with self.client.pipeline(transaction=True) as pipe:
            for bound in DURATION_BUCKETS:
                if seconds <= bound:
                    pipe.hincrby(key, repr(bound), 1)
            pipe.hincrby(key, "+Inf", 1)
            pipe.hincrbyfloat(key, "sum", seconds)
            pipe.execute()

    def durations(self, kind: str) -> tuple[list[tuple[str, int]], float]:
        """Cumulative ``(upper bound, count)`` buckets ending with "+Inf", and the sum."""
        raw = self.client.hgetall(f"{self.prefix}metrics:{kind}_seconds")
        buckets = [(repr(bound), int(raw.get(repr(bound), 0))) for bound in DURATION_BUCKETS]
        return buckets + [("+Inf", int(raw.get("+Inf", 0)))], float(raw.get("sum", 0.0))
