"""The job runner's lease keeper against a real Redis-compatible server."""

from __future__ import annotations

import time
import uuid

import pytest

from api.jobstore import JobStore
from api.schemas import JobCreate
from worker.runner import LeaseKeeper


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore.from_url(redis_url, prefix=f"runner-{uuid.uuid4().hex[:8]}:")


def test_keeper_renews_the_lease_beyond_its_ttl(store: JobStore) -> None:
    job = store.create(JobCreate(source="s3://bucket/model/"))
    assert store.acquire_lease(job.id, "me", 1)
    keeper = LeaseKeeper(store, job.id, "me", 1)
    keeper.start()
    try:
        time.sleep(2.5)  # more than twice the TTL: only renewals keep it
        assert not store.acquire_lease(job.id, "someone-else", 1)
        assert not keeper.lost.is_set()
    finally:
        keeper.stopped.set()
        keeper.join(5)


def test_keeper_reports_a_lease_taken_by_another_worker(store: JobStore) -> None:
    job = store.create(JobCreate(source="s3://bucket/model/"))
    assert store.acquire_lease(job.id, "me", 1)
    keeper = LeaseKeeper(store, job.id, "me", 1)
    store.release_lease(job.id, "me")
    assert store.acquire_lease(job.id, "other", 30)
    keeper.start()
    assert keeper.lost.wait(5)
    keeper.join(5)
    assert not keeper.is_alive()
