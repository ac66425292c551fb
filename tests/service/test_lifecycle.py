"""The lifecycle (service/lifecycle.py) against a real Redis-compatible server: every change of
state goes through it, and its hooks run once per end, whoever ends the job and however many
try at once."""

from __future__ import annotations

import threading
import uuid

import pytest

from service.errors import InvalidTransition
from service.lifecycle import Lifecycle
from service.models import ErrorInfo, Job, JobCreate, JobState, Progress
from service.store import JobStore


class Recorder(list):
    def __call__(self, event: str, job: Job) -> None:
        self.append((event, job.id, job.state.value))


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore.from_url(redis_url, prefix=f"l{uuid.uuid4().hex[:12]}:", retention_seconds=3600)


@pytest.fixture
def hooks() -> Recorder:
    return Recorder()


@pytest.fixture
def lifecycle(store: JobStore, hooks: Recorder) -> Lifecycle:
    return Lifecycle(store, [hooks])


def _queued(lifecycle: Lifecycle) -> Job:
    job, created = lifecycle.submit(JobCreate(source="file:///models/m"), tenant="default", prefix="")
    assert created and job.state is JobState.queued
    return job


def test_a_job_s_way_through_runs_each_hook_once(lifecycle: Lifecycle, hooks: Recorder) -> None:
    job = _queued(lifecycle)
    lifecycle.start(job.id)
    lifecycle.progress(job, Progress(stage="converting", layers_done=1, layers_total=2))
    ended = lifecycle.finish(job.id, JobState.succeeded)
    assert ended is not None and ended.state is JobState.succeeded
    assert lifecycle.finish(job.id, JobState.failed, error=ErrorInfo(code="late", message="too late")) is None
    assert [event for event, *_ in hooks] == ["job.started", "job.progress", "job.succeeded"]


def test_a_requeued_job_that_starts_again_is_started_once(lifecycle: Lifecycle, hooks: Recorder) -> None:
    job = _queued(lifecycle)
    lifecycle.start(job.id)
    lifecycle.transition(job.id, JobState.queued)
    lifecycle.start(job.id)
    assert [event for event, *_ in hooks] == ["job.started"]


def test_racing_ends_write_one_end_and_run_its_hooks_once(lifecycle: Lifecycle, hooks: Recorder) -> None:
    for _ in range(5):
        hooks.clear()
        job = _queued(lifecycle)
        lifecycle.start(job.id)
        barrier = threading.Barrier(6)

        def end(how: int) -> None:
            barrier.wait()
            if how % 3 == 0:
                lifecycle.finish(job.id, JobState.succeeded)
            elif how % 3 == 1:
                lifecycle.finish(job.id, JobState.failed, error=ErrorInfo(code="x", message="y"))
            else:
                lifecycle.cancel(job.id)
                lifecycle.finish(job.id, JobState.cancelled)

        threads = [threading.Thread(target=end, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        ends = [event for event, *_ in hooks if event != "job.started"]
        final = lifecycle.store.get(job.id).state
        assert ends == [f"job.{final.value}"], hooks


def test_cancel_ends_a_queued_job_at_once_and_a_running_one_when_its_worker_says(lifecycle: Lifecycle, hooks: Recorder) -> None:
    queued = _queued(lifecycle)
    assert lifecycle.cancel(queued.id).state is JobState.cancelled
    assert lifecycle.cancel(queued.id).state is JobState.cancelled  # idempotent, no second end
    running = _queued(lifecycle)
    lifecycle.start(running.id)
    assert lifecycle.cancel(running.id).state is JobState.cancelling
    assert lifecycle.store.cancel_requested(running.id)
    lifecycle.finish(running.id, JobState.cancelled)
    assert [(event, job_id) for event, job_id, _ in hooks] == [
        ("job.cancelled", queued.id), ("job.started", running.id), ("job.cancelled", running.id)
    ]


def test_an_end_fenced_with_a_lease_is_written_only_by_its_holder(lifecycle: Lifecycle, hooks: Recorder) -> None:
    job = _queued(lifecycle)
    lifecycle.start(job.id)
    lifecycle.store.acquire_lease(job.id, "holder", 60)
    assert lifecycle.finish(job.id, JobState.succeeded, holder=(job.id, "someone-else")) is None
    assert lifecycle.finish(job.id, JobState.succeeded, holder=(job.id, "holder")).state is JobState.succeeded
    assert [event for event, *_ in hooks] == ["job.started", "job.succeeded"]


def test_finish_takes_only_end_states_and_the_state_machine_holds(lifecycle: Lifecycle) -> None:
    job = _queued(lifecycle)
    with pytest.raises(ValueError):
        lifecycle.finish(job.id, JobState.running)
    with pytest.raises(InvalidTransition):
        lifecycle.transition(job.id, JobState.succeeded)  # queued jobs do not succeed


def test_a_hook_that_raises_neither_undoes_the_change_nor_stops_the_next_hook(store: JobStore) -> None:
    later = Recorder()

    def broken(event: str, job: Job) -> None:
        raise RuntimeError("the webhook queue is down")

    lifecycle = Lifecycle(store, [broken, later])
    job = _queued(lifecycle)
    assert lifecycle.cancel(job.id).state is JobState.cancelled
    assert store.get(job.id).state is JobState.cancelled and later == [("job.cancelled", job.id, "cancelled")]
