"""Server-sent event streams of jobs, followed without a thread or a blocked Redis connection
per follower.

A follower used to be a sync generator that held one of the server's 40 worker threads in a
blocking XREAD for up to 15 s, so a few dozen followers left no thread for any other route.
Here each API process has one ``EventHub``:

* **one reader task** blocks in a single XREAD over every stream that is followed right now
  and, when a stream gets entries, wakes that stream's followers;
* **followers are coroutines**: woken (or, for a heartbeat, after 15 s without news), each
  reads its own page from its own cursor in one short round trip (the job's state, then XRANGE), so
  resuming with ``after`` and several followers of one job at different points just work;
* **a bounded connection pool** (``POOL_CONNECTIONS``) carries the reader and the followers'
  short reads: 500 followers are 500 sockets to clients, not 500 Redis connections.

Why not one blocking XREAD per follower on ``redis.asyncio``? It needs no thread, but each
blocked XREAD holds a Redis connection for its whole wait, so the connections grow with the
followers. Why not pub/sub? The workers write events with XADD only; a reader of the streams
themselves needs no change to them and no second channel that could disagree.

A stream that starts being followed joins the reader's XREAD at its next turn (at most
``READ_BLOCK_MS`` later); nothing is missed meanwhile, because the reader reads each stream
from the last id it knew of when the stream was first followed.

``StreamSlots`` counts open streams per tenant and in all, in this process (429
``too_many_streams`` above the limits): each stream holds a client socket and a task for as
long as the client stays, so the limits bound what one tenant, or everyone, can hold open.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import redis
import redis.asyncio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.errors import JobNotFound, TooManyRequests
from service.models import Event, Job, JobState
from service.store import JobStore

log = logging.getLogger(__name__)

READ_BLOCK_MS = 1000
"""How long the reader's XREAD blocks: the most a newly followed stream waits to join it."""
READ_COUNT = 100
"""Entries per stream one XREAD returns; the reader only needs to know that there are some."""
POOL_CONNECTIONS = 16
"""Redis connections of the hub: one for the reader's XREAD, the rest for followers' reads
(a follower waits for a free one, see ``POOL_WAIT_SECONDS``)."""
POOL_WAIT_SECONDS = 20
PAGE = 1000
"""Events a follower reads per turn, as ``GET /events`` does by default."""
RETRY_AFTER_SECONDS = 5
"""Retry-After of a refused stream: streams last long, so a slot frees at no fixed time."""


def sse_frame(event: Event) -> str:
    """One event as a server-sent event: id, event type, and the Event as JSON."""
    return f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(event.model_dump(mode='json'))}\n\n"


HEARTBEAT_FRAME = ": heartbeat\n\n"


@dataclass(eq=False)
class _Watch:
    """One followed stream: the newest id the reader has seen there (None until known), how
    many followers it has, and a generation bumped (with ``changed`` set) on every wake."""

    last_id: str | None = None
    followers: int = 0
    generation: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self.generation += 1
        self.changed.set()
        self.changed = asyncio.Event()


class StreamSlots:
    """Open event streams of this API process, per tenant and in all.

    Counted in memory, per process: with N API replicas a tenant may hold up to N times its
    limit. Only the event loop's thread calls it, so it needs no lock."""

    def __init__(self, per_tenant: int, total: int) -> None:
        self.per_tenant, self.total = per_tenant, total
        self._open: Counter[str] = Counter()

    def open(self, tenant: str | None = None) -> int:
        """Streams open now, of ``tenant`` or of everyone."""
        return self._open[tenant] if tenant is not None else sum(self._open.values())

    def take(self, tenant: str) -> Callable[[], None]:
        """A slot for one stream of ``tenant``, or 429 ``too_many_streams``; returns its release
        (which may be called more than once)."""
        if self._open[tenant] >= self.per_tenant:
            raise TooManyRequests(
                f"{self.per_tenant} event streams of this tenant are open already (LOFTQ_MAX_EVENT_STREAMS_PER_TENANT); "
                "close one, or poll GET /v1/jobs/{id}/events",
                code="too_many_streams",
                retry_after=RETRY_AFTER_SECONDS,
            )
        if self.open() >= self.total:
            raise TooManyRequests(
                f"this API process serves {self.total} event streams already (LOFTQ_MAX_EVENT_STREAMS); "
                "retry later, or poll GET /v1/jobs/{id}/events",
                code="too_many_streams",
                retry_after=RETRY_AFTER_SECONDS,
            )
        self._open[tenant] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._open[tenant] -= 1
                if not self._open[tenant]:
                    del self._open[tenant]

        return release


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that always closes its frames and calls ``on_close`` when the
    response ends, however it ends (finished, client gone, error): the follower leaves the hub
    and its slot is freed even if the frames were never started."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            finally:
                self.on_close()


class EventHub:
    """The event streams of one API process (see the module docstring): reads on
    ``redis.asyncio``, key names and decoding from the job store, so the keys are the store's
    (its prefix included)."""

    def __init__(self, store: JobStore, client: redis.asyncio.Redis, slots: StreamSlots, *, heartbeat_seconds: float = 15) -> None:
        self.store, self.client, self.slots = store, client, slots
        self.heartbeat_seconds = heartbeat_seconds  # a comment after this long without events keeps proxies from closing
        self._watches: dict[str, _Watch] = {}
        self._known = asyncio.Event()  # a stream's last id became known: the reader has work
        self._reader: asyncio.Task | None = None

    @classmethod
    def from_url(cls, url: str, store: JobStore, slots: StreamSlots, *, heartbeat_seconds: float = 15) -> EventHub:
        """The hub's own bounded pool on ``url`` (the job store's server). The socket timeout
        stays above the reader's XREAD block."""
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_CONNECTIONS,
            timeout=POOL_WAIT_SECONDS,
            socket_connect_timeout=5,
            socket_timeout=max(10.0, 5 * READ_BLOCK_MS / 1000),
            decode_responses=True,
        )
        return cls(store, redis.asyncio.Redis(connection_pool=pool), slots, heartbeat_seconds=heartbeat_seconds)

    def start(self) -> None:
        """Start the reader on the running event loop (the server's, from the app's lifespan)."""
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_forever(), name="event-hub-reader")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
            self._reader = None
        await self.client.aclose()

    @property
    def followed(self) -> int:
        """Streams followed now (jobs, not followers)."""
        return len(self._watches)

    # -- reads ---------------------------------------------------------------------------------

    async def job(self, job_id: str, *, tenant: str | None = None) -> Job:
        """As ``JobStore.get``: another tenant's job is missing, not forbidden."""
        job = self.store._decode(await self.client.hgetall(self.store._job_key(job_id)))
        if job is None or (tenant is not None and job.tenant != tenant):
            raise JobNotFound(f"job {job_id} not found")
        return job

    async def _turn(self, job_id: str, after: str | None) -> tuple[bool | None, list[Event]]:
        """One follower's read, in one round trip: whether the job has ended (None: its record
        is gone), then the events after ``after``. The state is read first: a job that ends in
        between still has its final event read on the next turn. Only the state is decoded
        from the record (the store's ``job`` field), since every wake of every follower reads it."""
        low = f"({after}" if after else "-"
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hget(self.store._job_key(job_id), "job")
            pipe.xrange(self.store._events_key(job_id), low, "+", count=PAGE)
            record, entries = await pipe.execute()
        finished = None if record is None else JobState(json.loads(record)["state"]).finished
        return finished, self.store._parse(entries)

    # -- following ---------------------------------------------------------------------------

    @asynccontextmanager
    async def _follow(self, job_id: str) -> AsyncIterator[_Watch]:
        """Join (or start) the watch of the job's stream for the life of the block. A new
        watch starts at the stream's last entry now, so the reader reports only what comes
        after it and the follower reads everything before it itself."""
        key = self.store._events_key(job_id)
        watch = self._watches.setdefault(key, _Watch())
        watch.followers += 1
        try:
            if watch.last_id is None:
                newest = await self.client.xrevrange(key, "+", "-", count=1)
                if watch.last_id is None:  # another follower may have set it meanwhile
                    watch.last_id = newest[0][0] if newest else "0-0"
                    self._known.set()
            yield watch
        finally:
            watch.followers -= 1
            if not watch.followers and self._watches.get(key) is watch:
                del self._watches[key]

    @staticmethod
    async def _changed(watch: _Watch, seen: int, timeout: float) -> bool:
        """Whether the stream got entries since generation ``seen``, waiting up to ``timeout`` s."""
        if watch.generation != seen:
            return True
        try:
            await asyncio.wait_for(watch.changed.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def frames(self, job_id: str, after: str | None) -> AsyncIterator[str]:
        """The job's events after ``after`` as server-sent events, a heartbeat after
        ``heartbeat_seconds`` without any, until the job has ended and every event is sent (or
        its record expired)."""
        cursor = after
        async with self._follow(job_id) as watch:
            while True:
                seen = watch.generation  # before reading: a wake during the read is not lost
                finished, events = await self._turn(job_id, cursor)
                if finished is None:  # the record expired while followed
                    return
                for event in events:
                    cursor = event.id
                    yield sse_frame(event)
                if len(events) == PAGE:  # more may be waiting: read on at once
                    continue
                # The page reached the end of the stream. The job had ended before it was read:
                # its final event is sent. Else anything newer wakes the watch (or has already).
                if finished:
                    return
                if not await self._changed(watch, seen, self.heartbeat_seconds):
                    yield HEARTBEAT_FRAME

    async def _read_forever(self) -> None:
        """The one blocking reader: XREAD over every followed stream from the last id seen
        there, then wake the followers of the streams that moved. Redis errors are logged and
        retried; followers meanwhile still send heartbeats and read on their own turns."""
        while True:
            streams = {key: watch.last_id for key, watch in self._watches.items() if watch.last_id is not None}
            if not streams:
                self._known.clear()
                await self._known.wait()
                continue
            try:
                reply = await self.client.xread(streams, count=READ_COUNT, block=READ_BLOCK_MS)
            except asyncio.CancelledError:
                raise
            except (redis.RedisError, OSError) as exc:
                log.warning("event stream reader: %s; retrying in 1 s", exc)
                await asyncio.sleep(1)
                continue
            except Exception:  # a bug must not stop every stream's wake-ups
                log.exception("event stream reader failed; retrying in 1 s")
                await asyncio.sleep(1)
                continue
            # RESP2 gives [[key, entries]], RESP3 gives {key: [entries]}.
            moved = ((key, value[0]) for key, value in reply.items()) if isinstance(reply, dict) else reply or []
            for key, entries in moved:
                watch = self._watches.get(key)
                if watch is not None and entries:
                    watch.last_id = entries[-1][0]
                    watch.notify()


def raise_open_file_limit(needed: int) -> None:
    """Each open stream holds a client socket: raise this process's soft RLIMIT_NOFILE towards
    ``needed`` (at most to the hard limit) and warn when even that is below it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "the open-file limit (%d) is below what LOFTQ_MAX_EVENT_STREAMS needs (%d): raise ulimit -n or lower the setting",
            soft,
            needed,
        )
