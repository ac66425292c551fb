"""The event hub (api/event_stream.py) on its own, against a real Redis-compatible server:
followers of several jobs share one reader, read with the job store's key prefix, are woken
by events written through the store, and leave nothing behind when they go."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from api.errors import http_headers
from api.event_stream import EventHub, StreamSlots
from service.errors import TooManyRequests
from service.models import JobCreate
from service.store import JobStore

DB = 12


def test_followers_are_woken_and_leave_nothing_behind(redis_url: str) -> None:
    url = redis_url.replace("/0", f"/{DB}")
    store = JobStore.from_url(url, prefix=f"hub-{uuid.uuid4().hex[:8]}:")  # not the default prefix
    jobs = [store.create(JobCreate(source="s3://models/llama/")).id for _ in range(3)]

    async def scenario() -> None:
        hub = EventHub.from_url(url, store, StreamSlots(10, 10), heartbeat_seconds=30)
        hub.start()
        try:
            streams = [hub.frames(job_id, None) for job_id in jobs for _ in range(4)]
            firsts = await asyncio.gather(*(anext(stream) for stream in streams))
            assert all("event: state" in frame for frame in firsts)
            assert hub.followed == 3  # jobs, not followers
            await asyncio.sleep(1.5)  # every stream is in the reader's XREAD now
            await asyncio.to_thread(store.add_event, jobs[1], "layer", {"name": "q_proj"})
            woken = await asyncio.wait_for(asyncio.gather(*(anext(stream) for stream in streams[4:8])), 5)
            assert all("event: layer" in frame and "q_proj" in frame for frame in woken)
            for stream in streams:
                await stream.aclose()
            assert hub.followed == 0
        finally:
            await hub.close()

    asyncio.run(scenario())


def test_slots_count_per_tenant_and_in_all() -> None:
    slots = StreamSlots(per_tenant=2, total=3)
    a1, a2 = slots.take("a"), slots.take("a")
    with pytest.raises(TooManyRequests, match="PER_TENANT") as refused:
        slots.take("a")
    assert refused.value.code == "too_many_streams" and http_headers(refused.value)["Retry-After"] == "5"
    slots.take("b")
    with pytest.raises(TooManyRequests, match=r"LOFTQ_MAX_EVENT_STREAMS\)"):
        slots.take("c")
    a1()
    a1()  # a release that runs twice frees one slot
    assert slots.open("a") == 1 and slots.open() == 2
    a2()
    assert slots.open("a") == 0
