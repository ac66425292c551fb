"""The sweeper against a real Redis-compatible server: which lost work it sends again, once,
and when it gives up with worker_lost. tests/integration/test_worker_recovery.py kills real workers."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest

from service.lifecycle import Lifecycle
from service.models import JobCreate, JobState
from service.queue import MERGE_JOB, RUN_JOB, RUN_PART
from service.settings import Settings
from service.storage import store_from_settings
from service.store import MERGE, JobStore
from service.sweeper import Sweeper
from service.webhooks import WebhookHook


class Sent(list):
    """Stands in for JobQueue: the messages the sweeper sends."""

    def send(self, task: str, *args: object) -> None:
        self.append((task, *args))

    def send_webhook(self, job_id: str, delivery_id: str) -> None:
        self.append(("webhook", job_id, delivery_id))


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore.from_url(redis_url, prefix=f"sw{uuid.uuid4().hex[:10]}:", retention_seconds=3600)


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, storage="local", local_storage_root=tmp_path / "artifacts", max_attempts=3)


@pytest.fixture
def sent() -> Sent:
    return Sent()


@pytest.fixture
def sweeper(store: JobStore, sent: Sent, settings: Settings) -> Sweeper:
    return Sweeper(store, sent, store_from_settings(settings), settings)


def _running(store: JobStore, *, attempts: int = 1, distributed: bool = False) -> str:
    """A job a worker started ``attempts`` times (the runner counts a delivery before it works)."""
    job = store.create(JobCreate(source="file:///models/m", distributed=distributed))
    Lifecycle(store).transition(job.id, JobState.running)
    for _ in range(attempts):
        store.increment_attempts(job.id)
    return job.id


def test_a_running_job_without_a_lease_is_sent_again_once_per_lost_attempt(store, sweeper, sent) -> None:
    job_id = _running(store)
    assert sweeper.sweep().redelivered == [job_id]
    assert sent == [(RUN_JOB, job_id)]
    assert sweeper.sweep().redelivered == []  # still waiting in the queue: not sent twice
    assert [e.data for e in store.events(job_id).events if e.type == "redelivered"] == [{"work": "job", "attempt": 1}]
    store.increment_attempts(job_id)  # delivered again, and that worker died too
    assert sweeper.sweep().redelivered == [job_id]
    assert len(sent) == 2


def test_a_leased_job_is_left_alone(store, sweeper, sent) -> None:
    job_id = _running(store)
    assert store.acquire_lease(job_id, "alive", 30)
    assert sweeper.sweep().redelivered == [] and sent == []
    store.release_lease(job_id, "alive")
    assert sweeper.sweep().redelivered == [job_id]


def test_queued_and_finished_jobs_are_left_alone(store, sweeper, sent) -> None:
    store.create(JobCreate(source="file:///models/m"))
    done = _running(store)
    Lifecycle(store).transition(done, JobState.succeeded)
    assert sweeper.sweep().redelivered == [] and sent == []


def test_after_max_attempts_the_job_fails_with_worker_lost(store, sweeper, sent) -> None:
    job_id = _running(store, attempts=3)
    result = sweeper.sweep()
    assert result.failed == [job_id] and sent == []
    job = store.get(job_id)
    assert job.state is JobState.failed and job.error.code == "worker_lost"
    assert "3 times" in job.error.message


def test_a_cancelling_job_whose_worker_died_is_cancelled_and_its_artifacts_removed(store, sweeper, settings) -> None:
    job_id = _running(store)
    Lifecycle(store).cancel(job_id)
    partial = settings.local_storage_root / store.get(job_id).output / "model-00001-of-00002.safetensors"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"half")
    assert sweeper.sweep().cancelled == [job_id]
    assert store.get(job_id).state is JobState.cancelled
    assert not partial.exists()


def test_distributed_jobs_resend_only_started_parts_without_a_lease(store, sweeper, sent) -> None:
    job_id = _running(store, distributed=True)
    store.init_parts(job_id, [["a"], ["b"], ["c"], ["d"]])
    store.finish_part(job_id, 0, {"worker": "w1"})
    store.increment_part_attempts(job_id, 1)  # started; its worker died
    store.increment_part_attempts(job_id, 2)  # started; still running
    assert store.acquire_lease(JobStore.part_lease_id(job_id, 2), "alive", 30)
    assert sweeper.sweep().redelivered == []  # a live part: the job is in hand
    store.release_lease(JobStore.part_lease_id(job_id, 2), "alive")
    store.finish_part(job_id, 2, {"worker": "w2"})
    # part 3 was never delivered: it waits in the queue
    assert sweeper.sweep().redelivered == [f"{job_id} part 1"]
    assert sent == [(RUN_PART, job_id, 1)]


def test_distributed_jobs_with_every_part_done_get_their_merge_sent(store, sweeper, sent) -> None:
    job_id = _running(store, distributed=True)
    store.init_parts(job_id, [["a"], ["b"]])
    for part in (0, 1):
        store.finish_part(job_id, part, {"worker": "w"})
    assert sweeper.sweep().redelivered == [f"{job_id} merge"]
    store.increment_part_attempts(job_id, MERGE)
    store.increment_part_attempts(job_id, MERGE)
    store.increment_part_attempts(job_id, MERGE)
    assert sweeper.sweep().failed == [job_id]
    assert sent == [(MERGE_JOB, job_id)]


def test_replicas_sweeping_at_once_send_each_lost_job_once(store, sent, settings) -> None:
    settings = settings.model_copy(update={"sweep_interval_seconds": 0.3})
    job_ids = [_running(store) for _ in range(3)]
    stopped = threading.Event()
    replicas = [Sweeper(store, sent, store_from_settings(settings), settings) for _ in range(3)]
    threads = [threading.Thread(target=s.run_forever, args=(stopped,)) for s in replicas]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while len(sent) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1)
    stopped.set()
    for thread in threads:
        thread.join(5)
    assert sorted(sent) == sorted((RUN_JOB, job_id) for job_id in job_ids)


def test_a_webhook_delivery_whose_message_was_lost_is_sent_again_once(store: JobStore, sent: Sent, sweeper: Sweeper) -> None:
    """The hook recorded the delivery but its message never reached a webhook worker."""
    settings = sweeper.settings.model_copy(update={"webhook_allowed_networks": ["127.0.0.0/8"]})

    def broker_down(job_id: str, delivery_id: str) -> None:
        raise ConnectionError("the broker refused the message")

    lifecycle = Lifecycle(store, [WebhookHook(store, settings, broker_down)])
    job, _ = lifecycle.submit(JobCreate(source="file:///models/m", webhook_url="http://127.0.0.1:9/hook"), tenant="default", prefix="")
    lifecycle.cancel(job.id)
    delivery = store.deliveries(job.id)[0]
    assert sweeper.sweep().redelivered == [], "not late yet"
    store.client.zadd(store._due_key, {f"{job.id} {delivery.id}": 0})  # as if LATE_SECONDS had passed
    assert sweeper.sweep().redelivered == [f"{job.id} webhook {delivery.id}"]
    assert sweeper.sweep().redelivered == []  # once per attempt count
    assert sent == [("webhook", job.id, delivery.id)]


def test_expired_jobs_lose_their_artifacts_and_nothing_else_goes(store: JobStore, sweeper: Sweeper, tmp_path: Path) -> None:
    artifacts = sweeper.artifacts
    (tmp_path / "file").write_bytes(b"{}")
    expired = store.create(JobCreate(source="file:///models/m"), tenant="team-a", prefix="tenants/team-a/")
    kept = store.create(JobCreate(source="file:///models/m"), tenant="team-b", prefix="tenants/team-b/")
    for job in (expired, kept):
        artifacts.upload_file(tmp_path / "file", f"{job.output}manifest.json")
        Lifecycle(store).cancel(job.id)
    artifacts.upload_file(tmp_path / "file", "tenants/team-a/notes.txt")
    store.client.zadd(store._retained_key, {expired.id: 0})  # its retention ran out
    assert sweeper.sweep().expired == [expired.id]
    assert artifacts.read_bytes(f"{expired.output}manifest.json") is None
    assert artifacts.read_bytes(f"{kept.output}manifest.json") == b"{}"
    assert artifacts.read_bytes("tenants/team-a/notes.txt") == b"{}"
    assert sweeper.sweep().expired == []
