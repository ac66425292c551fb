"""Part bookkeeping of distributed jobs in the JobStore, against a real Redis-compatible server;
and the ``distributed`` request option's checks."""

from __future__ import annotations

import threading
import uuid

import pytest
from pydantic import ValidationError

from service.errors import JobNotFound
from service.lifecycle import Lifecycle
from service.models import JobCreate, JobState, Progress
from service.store import MERGE, JobStore

PARTS = [["model-00001-of-00005.safetensors"], ["model-00002-of-00005.safetensors", "model-00003-of-00005.safetensors"],
         ["model-00004-of-00005.safetensors"], ["model-00005-of-00005.safetensors"]]


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore.from_url(redis_url, prefix=f"p{uuid.uuid4().hex[:12]}:", retention_seconds=3600)


def _job(store: JobStore) -> str:
    job = store.create(JobCreate(source="s3://models/x/", distributed=True))
    Lifecycle(store).transition(job.id, JobState.running)
    return job.id


def test_parts_are_recorded_once(store: JobStore) -> None:
    job_id = _job(store)
    assert store.parts(job_id) == {}
    recorded = store.init_parts(job_id, PARTS)
    assert recorded == dict(enumerate(PARTS)) == store.parts(job_id)
    # A redelivered planning step with another plan gets the first one back.
    assert store.init_parts(job_id, [["other.safetensors"]]) == dict(enumerate(PARTS))
    with pytest.raises(JobNotFound):
        store.init_parts("job_000000000000deadbeef", PARTS)


def test_exactly_one_finisher_is_the_last(store: JobStore) -> None:
    job_id = _job(store)
    store.init_parts(job_id, PARTS)
    assert store.finish_part(job_id, 2, {"worker": "a"}) is False
    assert store.finish_part(job_id, 2, {"worker": "b"}) is False  # again: the first record stays
    assert store.finish_part(job_id, 0, {"worker": "b"}) is False
    assert store.finish_part(job_id, 1, {"worker": "a"}) is False
    assert store.finish_part(job_id, 3, {"worker": "b"}) is True
    assert store.finish_part(job_id, 3, {"worker": "c"}) is False  # a redelivery does not merge twice
    assert store.parts_done(job_id) == {0: {"worker": "b"}, 1: {"worker": "a"}, 2: {"worker": "a"}, 3: {"worker": "b"}}
    with pytest.raises(JobNotFound):
        store.finish_part(job_id, 9, {})


def test_concurrent_finishers_send_one_merge(store: JobStore) -> None:
    job_id = _job(store)
    parts = [[f"s{i}"] for i in range(64)]
    store.init_parts(job_id, parts)
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def finish(worker: int) -> None:
        barrier.wait()
        for part in range(worker, 64, 8):
            results.append(store.finish_part(job_id, part, {"worker": worker}))

    threads = [threading.Thread(target=finish, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1 and len(results) == 64


def test_attempts_per_part_and_merge(store: JobStore) -> None:
    job_id = _job(store)
    assert [store.increment_part_attempts(job_id, 0) for _ in range(3)] == [1, 2, 3]
    assert store.increment_part_attempts(job_id, 1) == 1
    assert store.increment_part_attempts(job_id, MERGE) == 1
    assert store.get(job_id).attempts == 0  # the job's own counter is the planning step's


def test_progress_counters_add_up_atomically(store: JobStore) -> None:
    job_id = _job(store)
    store.update_progress(job_id, Progress(stage="converting", layers_total=40, shards_total=4))
    barrier = threading.Barrier(4)

    def part() -> None:
        barrier.wait()
        for _ in range(10):
            store.add_progress(job_id, elapsed=10.0, layers_done=1)
        store.add_progress(job_id, elapsed=10.0, shards_done=1, bytes_read=1000, bytes_written=3_000_000_000)

    threads = [threading.Thread(target=part) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    progress = store.get(job_id).progress
    assert (progress.layers_done, progress.shards_done) == (40, 4)
    assert (progress.bytes_read, progress.bytes_written) == (4000, 12_000_000_000)
    assert progress.stage == "converting" and progress.eta_seconds == 0
    half = store.add_progress(job_id, elapsed=5.0, layers_done=5)  # a rerun part counting again: capped
    assert half.layers_done == 40
    with pytest.raises(ValueError):
        store.add_progress(job_id, elapsed=1.0, nonsense=1)
    with pytest.raises(JobNotFound):
        store.add_progress("job_000000000000deadbeef", elapsed=1.0, layers_done=1)


def test_eta_from_elapsed(store: JobStore) -> None:
    job_id = _job(store)
    store.update_progress(job_id, Progress(layers_total=10))
    assert store.add_progress(job_id, elapsed=8.0, layers_done=2).eta_seconds == pytest.approx(32.0)


def test_part_keys_expire_with_the_finished_job(store: JobStore) -> None:
    job_id = _job(store)
    store.init_parts(job_id, PARTS)
    store.finish_part(job_id, 0, {})
    store.increment_part_attempts(job_id, 0)
    Lifecycle(store).transition(job_id, JobState.succeeded)
    keys = [f"{store.prefix}parts:{job_id}", f"{store.prefix}parts:{job_id}:done", f"{store.prefix}parts:{job_id}:attempts"]
    assert all(0 < store.client.ttl(key) <= 3600 for key in keys)


def test_part_leases_are_separate_from_the_job_lease(store: JobStore) -> None:
    job_id = _job(store)
    assert store.acquire_lease(job_id, "planner", 30)
    assert store.acquire_lease(JobStore.part_lease_id(job_id, 0), "w1", 30)
    assert not store.acquire_lease(JobStore.part_lease_id(job_id, 0), "w2", 30)
    assert store.acquire_lease(JobStore.part_lease_id(job_id, 1), "w2", 30)
    assert store.client.exists(f"{store.prefix}lease:{job_id}:part:1")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"calibration_data": "s3://data/calib.txt"}, "calibration_data"),
        ({"options": {"objective": "activation"}}, "objective"),
        ({"options": {"calibration": {"evaluate": True}}}, "evaluate"),
    ],
)
def test_distributed_refuses_calibrated_requests(extra: dict, needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        JobCreate.model_validate({"source": "s3://models/x/", "distributed": True, **extra})
    [error] = info.value.errors()
    assert error["loc"] == ("distributed",) and needle in error["msg"]
    JobCreate.model_validate({"source": "s3://models/x/", **extra})  # fine without distributed


def test_distributed_defaults() -> None:
    request = JobCreate(source="s3://models/x/")
    assert request.distributed is False and request.shards_per_part == 1
    with pytest.raises(ValidationError):
        JobCreate(source="s3://models/x/", distributed=True, shards_per_part=0)
