"""The lease watchdog (worker/watchdog.py) against a real Redis-compatible server, with real
"job processes": a Python process that takes a job's lease through ``JobRunner.lease`` (so it
starts its watchdog as a worker's pool child does) and then holds the GIL in a backtracking
regex, sleeps, or is stopped. Each failure of the pair is played for real: the job stuck, the
job dead, the watchdog dead, the lease taken, the deadline passed; and the fenced end write.
tests/integration/test_stuck_jobs.py plays the stuck job through Celery, the API and the sweeper."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.lifecycle import Lifecycle
from service.models import ErrorInfo, JobCreate, JobState
from service.settings import Settings
from service.store import JobStore, NotLeaseHolder
from worker.runner import JobRunner

TTL = 5  # the shortest lease the settings allow
GRACE = 2.0

# A worker's pool child, reduced to its lease: take it, say so, then do what ``work`` says.
JOB_PROCESS = """
import json, re, sys, time
from service.store import JobStore
from service.settings import Settings
from worker.runner import JobRunner

cfg = json.loads(sys.argv[1])
store = JobStore.from_url(cfg["url"], prefix=cfg["prefix"])
runner = JobRunner(store, Settings(redis_url=cfg["url"], lease_seconds=cfg["ttl"], cancel_grace_seconds=cfg["grace"]))
runner.deadline = time.time() + cfg["deadline_in"]
with runner.lease(cfg["job"], cfg["job"]) as held:
    assert held
    print(json.dumps({"owner": runner.owner, "watchdog": runner.keeper.watchdog.process.pid}), flush=True)
    if cfg["work"] == "regex":
        re.fullmatch("(.*.*)*x", "a" * 40)  # backtracks for far longer than any test, holding the GIL
    else:
        time.sleep(600)
"""


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore.from_url(redis_url, prefix=f"watchdog-{uuid.uuid4().hex[:8]}:")


@pytest.fixture
def running_job(store: JobStore) -> str:
    job = store.create(JobCreate(source="s3://bucket/model/"))
    Lifecycle(store).transition(job.id, JobState.running)
    return job.id


class JobProcess:
    def __init__(self, process: subprocess.Popen, owner: str, watchdog: int) -> None:
        self.process, self.owner, self.watchdog = process, owner, watchdog


@pytest.fixture
def start_job(store: JobStore, redis_url: str) -> Iterator[Callable[..., JobProcess]]:
    started: list[subprocess.Popen] = []

    def start(job_id: str, work: str = "sleep", deadline_in: float = 3600) -> JobProcess:
        cfg = {"url": redis_url, "prefix": store.prefix, "ttl": TTL, "grace": GRACE, "job": job_id, "work": work, "deadline_in": deadline_in}
        process = subprocess.Popen([sys.executable, "-c", JOB_PROCESS, json.dumps(cfg)], stdout=subprocess.PIPE, start_new_session=True)
        started.append(process)
        line = process.stdout.readline()
        assert line, f"the job process exited with {process.wait()}"
        told = json.loads(line)
        assert store.client.get(f"{store.prefix}lease:{job_id}") == told["owner"]
        return JobProcess(process, told["owner"], told["watchdog"])

    yield start
    for process in started:  # the group: the job process and its watchdog
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def _alive(pid: int) -> bool:
    """Running, sleeping or stopped: not gone and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def _exits_within(process: subprocess.Popen, seconds: float) -> float:
    started = time.monotonic()
    process.wait(seconds)
    return time.monotonic() - started


def _lease_owner(store: JobStore, job_id: str) -> str | None:
    return store.client.get(f"{store.prefix}lease:{job_id}")


def test_a_job_holding_the_gil_keeps_its_lease_and_is_killed_once_cancelled(store: JobStore, running_job: str, start_job) -> None:
    """The finding's regex, in Python's own engine, in the job process: its lease keeper thread
    cannot run, the watchdog renews. Cancelled, it is killed after the grace and its lease is
    released for the next delivery (or the sweeper) to finish the cancellation."""
    job = start_job(running_job, work="regex")
    time.sleep(3 * TTL)  # three TTLs: only the watchdog's renewals keep the lease now
    assert job.process.poll() is None
    assert _lease_owner(store, running_job) == job.owner
    assert not store.acquire_lease(running_job, "another-worker", TTL)

    Lifecycle(store).cancel(running_job)
    waited = _exits_within(job.process, GRACE + 15)  # the grace, a tick, and room for a busy machine
    print(f"cancelled job process killed {waited:.1f} s after the request (grace {GRACE} s)")
    assert job.process.returncode == -signal.SIGKILL
    assert waited >= GRACE - 0.5  # it had its grace to stop by itself
    deadline = time.monotonic() + 5
    while _lease_owner(store, running_job) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _lease_owner(store, running_job) is None  # released at once, not left to lapse
    assert store.get(running_job).state is JobState.cancelling  # the next delivery or the sweeper ends it
    assert _gone_within(job.watchdog, 10)


def test_past_its_deadline_a_stuck_job_is_killed_and_fails_timeout_once(store: JobStore, running_job: str, start_job) -> None:
    job = start_job(running_job, deadline_in=1)
    os.kill(job.process.pid, signal.SIGSTOP)  # alive, and unable to notice anything
    waited = _exits_within(job.process, 1 + GRACE + 15)
    assert job.process.returncode == -signal.SIGKILL
    print(f"stuck job past its deadline killed after {waited:.1f} s (deadline 1 s, grace {GRACE} s)")
    deadline = time.monotonic() + 5
    while not store.get(running_job).state.finished and time.monotonic() < deadline:
        time.sleep(0.05)
    ended = store.get(running_job)
    assert ended.state is JobState.failed and ended.error.code == "timeout", ended
    states = [e.data["state"] for e in store.events(running_job).events if e.type == "state"]
    assert states == ["queued", "running", "failed"]  # the end recorded once
    assert _lease_owner(store, running_job) is None


def test_a_job_process_that_dies_leaves_its_lease_to_lapse_for_the_sweeper(store: JobStore, running_job: str, start_job) -> None:
    job = start_job(running_job)
    os.kill(job.process.pid, signal.SIGKILL)
    job.process.wait(10)
    assert _gone_within(job.watchdog, 10)  # the watchdog follows its job process
    deadline = time.monotonic() + TTL + 10
    while store.leased(running_job) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not store.leased(running_job)  # lapsed, not renewed: the sweeper hands the job out again
    assert store.get(running_job).state is JobState.running


def test_a_dead_watchdog_makes_its_job_process_kill_itself(store: JobStore, running_job: str, start_job) -> None:
    """With nothing to keep the lease while it might be stuck, the job must not run on."""
    job = start_job(running_job)
    os.kill(job.watchdog, signal.SIGKILL)
    waited = _exits_within(job.process, TTL / 3 + 15)
    print(f"job process killed itself {waited:.1f} s after its watchdog died")
    assert job.process.returncode == -signal.SIGKILL
    assert store.get(running_job).state is JobState.running  # no end: the sweeper hands it out again


def test_a_job_whose_lease_was_taken_is_killed_after_the_grace(store: JobStore, running_job: str, start_job) -> None:
    job = start_job(running_job)
    store.client.set(f"{store.prefix}lease:{running_job}", "another-worker", ex=60)
    waited = _exits_within(job.process, GRACE + 15)
    assert job.process.returncode == -signal.SIGKILL
    print(f"job process without its lease killed after {waited:.1f} s")
    assert _lease_owner(store, running_job) == "another-worker"  # not released: not its own
    assert store.get(running_job).state is JobState.running


def test_a_task_that_ends_stops_its_watchdog_and_releases_the_lease(store: JobStore, running_job: str, redis_url: str) -> None:
    runner = JobRunner(store, Settings(redis_url=redis_url, lease_seconds=TTL))
    with runner.lease(running_job, running_job) as held:
        assert held
        watchdog = runner.keeper.watchdog.process
        assert watchdog.poll() is None
        with runner.lease(running_job, running_job) as again:
            assert not again  # one holder at a time
    assert watchdog.returncode is not None  # ended and reaped before the release: it renews nothing after it
    assert not store.leased(running_job)
    assert runner.keeper is None and runner.held is None


def test_the_end_is_recorded_only_by_the_lease_holder(store: JobStore, running_job: str) -> None:
    assert store.acquire_lease(running_job, "holder", 30)
    timeout = ErrorInfo(code="timeout", message="late")
    with pytest.raises(NotLeaseHolder):
        Lifecycle(store).transition(running_job, JobState.failed, error=timeout, holder=(running_job, "stale-attempt"))
    assert store.get(running_job).state is JobState.running
    Lifecycle(store).transition(running_job, JobState.succeeded, holder=(running_job, "holder"))
    assert store.get(running_job).state is JobState.succeeded


def test_a_runner_whose_lease_is_anothers_records_no_end(store: JobStore, running_job: str, redis_url: str) -> None:
    """A stale attempt that comes back to life (its lease taken meanwhile) fails quietly."""
    runner = JobRunner(store, Settings(redis_url=redis_url))
    runner.held = running_job  # as inside runner.lease(), without its watchdog
    assert store.acquire_lease(running_job, "the-new-attempt", 30)
    runner.worker_lost(running_job, 9)
    assert store.get(running_job).state is JobState.running
    store.release_lease(running_job, "the-new-attempt")
    assert store.acquire_lease(running_job, runner.owner, 30)
    runner.worker_lost(running_job, 9)
    assert store.get(running_job).error.code == "worker_lost"
