"""JobStore against a real Redis-compatible server (the session ``redis_url`` fixture)."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from service.errors import InvalidRequest, InvalidTransition, JobNotFound
from service.lifecycle import Lifecycle
from service.models import TRANSITIONS, ErrorInfo, JobCreate, JobState, JobSummary, Progress
from service.settings import Settings
from service.store import JobStore


@pytest.fixture
def store(redis_url: str) -> JobStore:
    """A fresh key prefix per test: tests share the server but never see each other's keys."""
    return JobStore.from_url(redis_url, prefix=f"t{uuid.uuid4().hex[:12]}:", retention_seconds=3600)


def _request(**kwargs) -> JobCreate:
    return JobCreate(source="file:///models/minilm", **kwargs)


def _to(store: JobStore, state: JobState, **kwargs) -> str:
    """A job walked to ``state`` through allowed transitions."""
    job = store.create(_request(), **kwargs)
    path = {
        JobState.queued: [],
        JobState.running: [JobState.running],
        JobState.cancelling: [JobState.running, JobState.cancelling],
        JobState.succeeded: [JobState.running, JobState.succeeded],
        JobState.failed: [JobState.running, JobState.failed],
        JobState.cancelled: [JobState.cancelled],
    }[state]
    for step in path:
        Lifecycle(store).transition(job.id, step)
    return job.id


def test_ping(store: JobStore) -> None:
    assert store.ping() is True
    assert JobStore.from_url("redis://127.0.0.1:1/0").ping() is False


def test_create_and_get(store: JobStore) -> None:
    job = store.create(_request(metadata={"team": "nlp"}), tenant="acme")
    assert job.id.startswith("job_") and len(job.id) == 4 + 12 + 8
    assert job.state == JobState.queued
    assert job.created_at.tzinfo is not None
    assert job.output == f"jobs/{job.id}/"
    assert job.tenant == "acme"

    got = store.get(job.id)
    assert got == job
    assert store.get(job.id, tenant="acme") == job
    with pytest.raises(JobNotFound):
        store.get(job.id, tenant="other")
    with pytest.raises(JobNotFound):
        store.get("job_000000000000deadbeef")

    events = store.events(job.id).events
    assert [(e.type, e.data) for e in events] == [("state", {"state": "queued"})]


def test_output_normalised(store: JobStore) -> None:
    assert store.create(_request(output="out/a")).output == "out/a/"
    assert store.create(_request(output="out/a"), output="custom/b/").output == "custom/b/"


def test_ids_sort_by_creation(store: JobStore) -> None:
    ids = [store.create(_request()).id for _ in range(20)]
    assert ids == sorted(ids) and len(set(ids)) == 20


def test_list_newest_first_paginated(store: JobStore) -> None:
    ids = [store.create(_request()).id for _ in range(7)]
    newest_first = ids[::-1]

    seen, after, pages = [], None, 0
    while True:
        page = store.list(limit=3, after=after)
        pages += 1
        seen += [job.id for job in page.jobs]
        if not page.has_more:
            assert page.next_after is None
            break
        after = page.next_after
        assert after == page.jobs[-1].id
    assert pages == 3
    assert seen == newest_first

    one = store.list(limit=7)
    assert [j.id for j in one.jobs] == newest_first and not one.has_more


def test_list_state_and_tenant_filter(store: JobStore) -> None:
    ids = [store.create(_request(), tenant="a" if i % 2 else "b").id for i in range(10)]
    running = ids[::2]  # tenant "b"
    for job_id in running:
        Lifecycle(store).transition(job_id, JobState.running)

    seen, after = [], None
    for _ in range(3):
        page = store.list(limit=2, after=after, state=JobState.running)
        seen += [job.id for job in page.jobs]
        assert all(job.state == JobState.running for job in page.jobs)
        after = page.next_after
        if not page.has_more:
            break
    assert seen == running[::-1]

    queued = store.list(limit=100, state=JobState.queued)
    assert [j.id for j in queued.jobs] == ids[1::2][::-1]
    assert [j.id for j in store.list(limit=100, tenant="a").jobs] == ids[1::2][::-1]
    assert store.list(tenant="a", state=JobState.running).jobs == []
    assert len(store.list(tenant="b", state=JobState.running, limit=100).jobs) == 5


@pytest.mark.parametrize("start", list(JobState))
def test_transitions_table(store: JobStore, start: JobState) -> None:
    for to in JobState:
        job_id = _to(store, start)
        if to in TRANSITIONS[start]:
            job = Lifecycle(store).transition(job_id, to)
            assert job.state == to == store.get(job_id).state
            assert store.events(job_id).events[-1].data == {"state": to.value}
        else:
            with pytest.raises(InvalidTransition):
                Lifecycle(store).transition(job_id, to)
            assert store.get(job_id).state == start


def test_finished_jobs_never_change(store: JobStore) -> None:
    job_id = _to(store, JobState.succeeded)
    for to in JobState:
        with pytest.raises(InvalidTransition):
            Lifecycle(store).transition(job_id, to)


def test_expect_guard(store: JobStore) -> None:
    job_id = store.create(_request()).id
    with pytest.raises(InvalidTransition):
        Lifecycle(store).transition(job_id, JobState.running, expect={JobState.cancelling})
    assert Lifecycle(store).transition(job_id, JobState.running, expect={JobState.queued}).state == JobState.running
    with pytest.raises(JobNotFound):
        Lifecycle(store).transition("job_000000000000deadbeef", JobState.running)


def test_timestamps_error_summary(store: JobStore) -> None:
    job_id = store.create(_request()).id
    running = Lifecycle(store).transition(job_id, JobState.running)
    assert running.started_at is not None and running.finished_at is None
    requeued = Lifecycle(store).transition(job_id, JobState.queued)
    again = Lifecycle(store).transition(job_id, JobState.running)
    assert requeued.started_at == again.started_at == running.started_at  # first start kept

    summary = JobSummary(layers=4, mean_error_quant=0.2, mean_error=0.1, seconds=1.5)
    done = Lifecycle(store).transition(job_id, JobState.succeeded, summary=summary)
    assert done.finished_at is not None and done.finished_at >= done.started_at
    assert store.get(job_id).summary == summary

    failed_id = _to(store, JobState.running)
    error = ErrorInfo(code="oom", message="out of memory")
    failed = Lifecycle(store).transition(failed_id, JobState.failed, error=error)
    assert store.get(failed_id).error == error == failed.error
    assert store.events(failed_id).events[-1].data == {"state": "failed", "error": error.model_dump()}


def test_concurrent_terminal_transitions_one_wins(store: JobStore) -> None:
    for _ in range(5):
        job_id = _to(store, JobState.running)
        barrier = threading.Barrier(2)
        results: dict[JobState, object] = {}

        def race(to: JobState) -> None:
            barrier.wait()
            try:
                results[to] = Lifecycle(store).transition(job_id, to)
            except InvalidTransition as exc:
                results[to] = exc

        threads = [threading.Thread(target=race, args=(s,)) for s in (JobState.succeeded, JobState.failed)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [s for s, r in results.items() if not isinstance(r, Exception)]
        assert len(winners) == 1
        assert store.get(job_id).state == winners[0]
        counts = store.counts_by_state()
        assert counts["running"] == 0
        states = [e.data["state"] for e in store.events(job_id).events]
        assert states == ["queued", "running", winners[0].value]


def test_cancel_idempotent(store: JobStore) -> None:
    queued = store.create(_request()).id
    assert not store.cancel_requested(queued)
    first = Lifecycle(store).cancel(queued)
    assert first.state == JobState.cancelled and first.finished_at is not None
    assert Lifecycle(store).cancel(queued) == first
    assert store.cancel_requested(queued)

    running = _to(store, JobState.running)
    assert Lifecycle(store).cancel(running).state == JobState.cancelling
    assert Lifecycle(store).cancel(running).state == JobState.cancelling
    assert store.cancel_requested(running)
    states = [e.data["state"] for e in store.events(running).events]
    assert states == ["queued", "running", "cancelling"]
    assert Lifecycle(store).transition(running, JobState.cancelled).state == JobState.cancelled

    done = _to(store, JobState.succeeded)
    before = store.get(done)
    assert Lifecycle(store).cancel(done) == before
    assert store.get(done).state == JobState.succeeded

    with pytest.raises(JobNotFound):
        Lifecycle(store).cancel("job_000000000000deadbeef")
    assert store.cancel_requested("job_000000000000deadbeef") is False


def test_progress_and_attempts(store: JobStore) -> None:
    job_id = store.create(_request()).id
    progress = Progress(stage="converting", layers_done=3, layers_total=10, eta_seconds=4.5)
    store.update_progress(job_id, progress)
    assert store.get(job_id).progress == progress
    assert store.get(job_id).state == JobState.queued
    assert store.increment_attempts(job_id) == 1
    assert store.increment_attempts(job_id) == 2
    # a state change keeps progress and attempts
    job = Lifecycle(store).transition(job_id, JobState.running)
    assert job.progress == progress and job.attempts == 2
    assert store.get(job_id).attempts == 2
    with pytest.raises(JobNotFound):
        store.update_progress("job_000000000000deadbeef", progress)
    with pytest.raises(JobNotFound):
        store.increment_attempts("job_000000000000deadbeef")


def test_events_cursor(store: JobStore) -> None:
    job_id = store.create(_request()).id
    ids = [store.add_event(job_id, "layer", {"n": i}) for i in range(5)]
    page = store.events(job_id)
    assert [e.id for e in page.events][1:] == ids and page.next_after == ids[-1]
    assert page.events[1].time.tzinfo is not None

    after = store.events(job_id, after=ids[1])
    assert [e.data["n"] for e in after.events] == [2, 3, 4]
    limited = store.events(job_id, after=ids[1], limit=2)
    assert [e.data["n"] for e in limited.events] == [2, 3] and limited.next_after == ids[3]
    empty = store.events(job_id, after=ids[-1])
    assert empty.events == [] and empty.next_after == ids[-1]

    with pytest.raises(JobNotFound):
        store.add_event("job_000000000000deadbeef", "layer", {})
    with pytest.raises(JobNotFound):
        store.events("job_000000000000deadbeef")


def test_wait_events(store: JobStore) -> None:
    job_id = store.create(_request()).id
    last = store.events(job_id).next_after

    start = time.monotonic()
    assert store.wait_events(job_id, after=last, timeout_ms=100) == []
    assert time.monotonic() - start >= 0.09

    timer = threading.Timer(0.1, store.add_event, args=(job_id, "layer", {"name": "q_proj"}))
    timer.start()
    start = time.monotonic()
    got = store.wait_events(job_id, after=last, timeout_ms=5000)
    elapsed = time.monotonic() - start
    timer.join()
    assert [e.data for e in got] == [{"name": "q_proj"}]
    assert elapsed < 2

    # None replays from the start without blocking
    assert [e.type for e in store.wait_events(job_id, after=None, timeout_ms=5000)] == ["state", "layer"]


def test_lease(store: JobStore) -> None:
    job_id = store.create(_request()).id
    assert store.acquire_lease(job_id, "w1", 10)
    assert not store.acquire_lease(job_id, "w2", 10)
    assert not store.renew_lease(job_id, "w2", 10)
    assert store.renew_lease(job_id, "w1", 10)
    store.release_lease(job_id, "w2")  # not the owner: no effect
    assert not store.acquire_lease(job_id, "w2", 10)
    store.release_lease(job_id, "w1")
    assert store.acquire_lease(job_id, "w2", 1)
    assert not store.renew_lease(job_id, "w1", 1)
    time.sleep(1.2)
    assert not store.renew_lease(job_id, "w2", 1)  # expired
    assert store.acquire_lease(job_id, "w1", 1)


def test_retention_ttl(store: JobStore) -> None:
    job_id = store.create(_request()).id
    client = store.client
    job_key, events_key = f"{store.prefix}job:{job_id}", f"{store.prefix}events:{job_id}"
    assert client.ttl(job_key) == -1 and client.ttl(events_key) == -1
    Lifecycle(store).transition(job_id, JobState.running)
    assert client.ttl(job_key) == -1
    Lifecycle(store).transition(job_id, JobState.succeeded)
    assert 3500 < client.ttl(job_key) <= 3600
    assert 3500 < client.ttl(events_key) <= 3600
    store.update_progress(job_id, Progress(stage="done"))  # field writes keep the TTL
    assert client.ttl(job_key) > 3500

    cancelled = Lifecycle(store).cancel(store.create(_request()).id)
    assert client.ttl(f"{store.prefix}job:{cancelled.id}") > 3500


def test_expired_jobs_leave_indexes(redis_url: str) -> None:
    store = JobStore.from_url(redis_url, prefix=f"t{uuid.uuid4().hex[:12]}:", retention_seconds=1)
    keep = store.create(_request()).id
    _to(store, JobState.failed)
    time.sleep(1.1)
    assert [j.id for j in store.list().jobs] == [keep]
    assert store.list(state=JobState.failed).jobs == []
    assert store.counts_by_state()["failed"] == 0


def test_list_skips_vanished_records(store: JobStore) -> None:
    ids = [store.create(_request()).id for _ in range(6)]
    store.client.delete(f"{store.prefix}job:{ids[3]}", f"{store.prefix}job:{ids[4]}")
    first = store.list(limit=2)
    assert [j.id for j in first.jobs] == [ids[5], ids[2]] and first.has_more
    second = store.list(limit=2, after=first.next_after)
    assert [j.id for j in second.jobs] == [ids[1], ids[0]] and not second.has_more


def test_counts_by_state(store: JobStore) -> None:
    assert store.counts_by_state() == {state.value: 0 for state in JobState}
    for state, n in [(JobState.queued, 3), (JobState.running, 2), (JobState.succeeded, 1), (JobState.cancelled, 2)]:
        for _ in range(n):
            _to(store, state)
    assert store.counts_by_state() == {
        "queued": 3, "running": 2, "succeeded": 1, "failed": 0, "cancelling": 0, "cancelled": 2,
    }


def test_duration_histograms_are_cumulative(store) -> None:
    for seconds in (0.05, 0.7, 20.0):
        store.observe_duration("layer", seconds)
    buckets, total = store.durations("layer")
    counts = dict(buckets)
    assert counts["0.1"] == 1 and counts["1.0"] == 2 and counts["60.0"] == 3 and counts["+Inf"] == 3
    assert total == pytest.approx(20.75)
    assert store.durations("job") == ([(b, 0) for b, _ in buckets], 0.0)


def test_records_stay_readable_when_checks_are_added_and_the_worker_refuses_them(redis_url: str, tmp_path) -> None:
    """A job stored before a check existed (here a lookahead regex, refused since target
    regexes run on RE2) can still be read and listed; the worker refuses to run it."""
    from worker.runner import JobRunner

    store = JobStore.from_url(redis_url.replace("/0", "/4"), prefix=f"legacy-{uuid.uuid4().hex[:6]}:")
    job = store.create(JobCreate(source="s3://models/m/"), tenant="default", prefix="")
    raw = json.loads(store.client.hget(store._job_key(job.id), "job"))
    raw["request"]["options"]["target_modules"] = r".*(?=proj)"
    store.client.hset(store._job_key(job.id), "job", json.dumps(raw))
    assert store.get(job.id).request.options.target_modules == r".*(?=proj)"
    assert [j.id for j in store.list().jobs] == [job.id]
    with pytest.raises(InvalidRequest, match="RE2"):
        JobRunner(store, Settings(redis_url=redis_url)).options(store.get(job.id))
