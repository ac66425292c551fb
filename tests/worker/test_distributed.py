"""A distributed job's life through the runners, in this process, against a real
Redis-compatible server and local storage: the planning step's messages, parts on two
"workers", the merge, failures, cancellation and redelivery. Celery itself is replaced by a
list of the messages the runners send (tests/integration/test_scale_out.py runs real workers)."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path

import pytest

from service.lifecycle import Lifecycle
from service.models import JobCreate, JobState
from service.queue import MERGE_JOB, RUN_PART
from service.settings import Settings
from service.store import JobStore
from worker.distributed import PartRunner
from worker.planning import plan_parts
from worker.runner import JobRunner

TIMED = {"loftq_report.json", "loftq_layers.png", "manifest.json"}  # hold timings


class Env:
    def __init__(self, redis_url: str, tmp_path: Path, model: Path) -> None:
        self.root = tmp_path / "artifacts"
        self.model = tmp_path / "models" / "llama"
        shutil.copytree(model, self.model)
        self.settings = Settings(
            redis_url=redis_url, storage="local", local_storage_root=self.root, work_dir=tmp_path / "work",
            allowed_file_roots=[tmp_path / "models"], device="cpu", torch_threads=1,
        )
        self.store = JobStore.from_url(redis_url, prefix=f"dist-{uuid.uuid4().hex[:8]}:")
        self.sent: list[tuple] = []

    def runner(self, worker: str = "w1") -> JobRunner:
        return JobRunner(self.store, self.settings, worker=worker, enqueue=lambda *message: self.sent.append(message))

    def create(self, **request) -> str:
        body = {"source": f"file://{self.model}", "options": {"rank": 4, "iters": 1}, **request}
        return self.store.create(JobCreate.model_validate(body)).id

    def take(self) -> list[tuple]:
        sent, self.sent = self.sent, []
        return sent

    def files(self, job_id: str) -> dict[str, str]:
        """sha256 of each artifact of the finished job, by its manifest."""
        out = self.root / self.store.get(job_id).output
        manifest = json.loads((out / "manifest.json").read_text())
        digests = {f["path"]: hashlib.sha256((out / f["path"]).read_bytes()).hexdigest() for f in manifest["files"]}
        assert all(digests[f["path"]] == f["sha256"] for f in manifest["files"])
        return digests


@pytest.fixture
def env(redis_url: str, tmp_path: Path, tiny_llama: Path) -> Env:
    return Env(redis_url, tmp_path, tiny_llama)


def test_plan_parts() -> None:
    shards = [f"s{i}" for i in range(5)]
    assert plan_parts(shards, 1) == [[s] for s in shards]
    assert plan_parts(shards, 2) == [["s0", "s1"], ["s2", "s3"], ["s4"]]
    assert plan_parts(shards, 9) == [shards]


def test_parts_on_two_workers_then_merge_equal_a_normal_job(env: Env) -> None:
    normal = env.create()
    assert env.runner().run(normal)
    assert env.store.get(normal).state is JobState.succeeded and env.take() == []

    job_id = env.create(distributed=True)
    assert env.runner().run(job_id)
    job = env.store.get(job_id)
    assert job.state is JobState.running and job.attempts == 1
    sent = env.take()
    assert sent == [(RUN_PART, job_id, n) for n in range(5)]
    assert job.progress.shards_total == 5 and job.progress.layers_total == 14
    for i, (_, _, part) in enumerate(sent):
        assert PartRunner(env.runner(f"w{i % 2}")).run(job_id, part)
        if i < len(sent) - 1:
            assert env.store.get(job_id).state is JobState.running
    assert env.take() == []  # the last part merged in its own process: no merge message
    assert {r["worker"] for r in env.store.parts_done(job_id).values()} == {"w0", "w1"}

    done, reference = env.store.get(job_id), env.store.get(normal)
    assert done.state is JobState.succeeded, done.error
    assert done.summary.layers == 14 and done.summary.mean_error == pytest.approx(reference.summary.mean_error)
    assert done.progress.stage == "done" and done.progress.layers_done == 14 and done.progress.shards_done == 5
    assert done.progress.bytes_read > 0  # the parts' reads are kept
    ours, theirs = env.files(job_id), env.files(normal)
    assert ours.keys() == theirs.keys()
    assert {k: v for k, v in ours.items() if k not in TIMED} == {k: v for k, v in theirs.items() if k not in TIMED}
    assert not (env.root / done.output / ".loftq-partial").exists()
    events = env.store.events(job_id).events
    assert sorted(e.data["index"] for e in events if e.type == "layer") == list(range(1, 15))
    assert [e.data["state"] for e in events if e.type == "state"] == ["queued", "running", "succeeded"]
    assert list(env.settings.work_dir.iterdir()) == []
    assert env.runner().run(job_id, merge=True) and env.take() == []  # a second merge is a no-op


def test_groups_of_shards_and_a_redelivered_part(env: Env) -> None:
    job_id = env.create(distributed=True, shards_per_part=2)
    env.runner().run(job_id)
    assert env.store.parts(job_id)[0] == sorted(p.name for p in env.model.glob("model-*"))[:2]
    parts = [part for _, _, part in env.take()]
    assert parts == [0, 1, 2]
    for part in parts[:-1]:
        PartRunner(env.runner()).run(job_id, part)
    # The job's lease is held elsewhere when the last part finishes (a merge delivered already,
    # or a dead worker's lease not expired yet): the last part sends the merge instead.
    assert env.store.acquire_lease(job_id, "elsewhere", 60)
    PartRunner(env.runner()).run(job_id, parts[-1])
    assert env.take() == [(MERGE_JOB, job_id)]
    env.store.release_lease(job_id, "elsewhere")
    # A part delivered again after the merge was sent (its worker died before acking) sends it again;
    # a redelivered planning step too. The merge is idempotent.
    PartRunner(env.runner()).run(job_id, 1)
    env.runner().run(job_id)
    assert env.take() == [(MERGE_JOB, job_id), (MERGE_JOB, job_id)]
    env.runner().run(job_id, merge=True)
    assert env.store.get(job_id).state is JobState.succeeded


def test_a_failing_part_fails_the_job_with_its_code(env: Env) -> None:
    job_id = env.create(distributed=True)
    env.runner().run(job_id)
    parts = [part for _, _, part in env.take()]
    victim = env.store.parts(job_id)[2][0]
    (env.model / victim).write_bytes(b"not a safetensors file")
    for part in parts:
        PartRunner(env.runner()).run(job_id, part)
    job = env.store.get(job_id)
    assert job.state is JobState.failed
    assert job.error.code not in ("internal_error", "worker_lost") and victim in job.error.message
    assert env.take() == []  # never merged


def test_planning_failures_fail_the_job(env: Env) -> None:
    job_id = env.create(distributed=True, options={"rank": 512})
    env.runner().run(job_id)
    job = env.store.get(job_id)
    assert job.state is JobState.failed and job.error.code == "invalid_options" and env.take() == []


def test_cancel_stops_parts_and_removes_artifacts(env: Env) -> None:
    job_id = env.create(distributed=True)
    env.runner().run(job_id)
    parts = [part for _, _, part in env.take()]
    PartRunner(env.runner()).run(job_id, parts[0])
    output = env.root / env.store.get(job_id).output
    assert output.exists()
    assert Lifecycle(env.store).cancel(job_id).state is JobState.cancelling
    PartRunner(env.runner()).run(job_id, parts[1])
    job = env.store.get(job_id)
    assert job.state is JobState.cancelled and not output.exists()
    for part in parts[2:]:  # later deliveries find the job ended
        assert PartRunner(env.runner()).run(job_id, part)
    assert env.take() == [] and not output.exists()


def test_a_part_leased_elsewhere_is_left_to_its_holder(env: Env) -> None:
    job_id = env.create(distributed=True)
    env.runner().run(job_id)
    env.take()
    assert env.store.acquire_lease(JobStore.part_lease_id(job_id, 0), "someone-else", 30)
    assert PartRunner(env.runner()).run(job_id, 0) is False
    assert env.store.parts_done(job_id) == {}


def test_too_many_deliveries_of_a_part_fail_the_job(env: Env) -> None:
    job_id = env.create(distributed=True)
    env.runner().run(job_id)
    env.take()
    for _ in range(env.settings.max_attempts):
        env.store.increment_part_attempts(job_id, 3)
    PartRunner(env.runner()).run(job_id, 3)
    job = env.store.get(job_id)
    assert job.state is JobState.failed and job.error.code == "worker_lost"


@pytest.mark.parametrize("distributed", [False, True])
def test_a_model_above_the_size_limit_fails_before_converting(env: Env, distributed: bool) -> None:
    env.settings = env.settings.model_copy(update={"max_model_bytes": 1000})
    job_id = env.create(distributed=distributed)
    env.runner().run(job_id)
    job = env.store.get(job_id)
    assert job.state is JobState.failed and job.error.code == "model_too_large", job.error
    assert "above this service's limit of 1000" in job.error.message
    assert env.take() == [] and not (env.root / job.output).exists()
