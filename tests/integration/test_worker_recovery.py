"""Jobs survive dead workers, duplicate deliveries and a job store restart: real processes
(valkey with the compose file's append-only persistence, Celery workers, uvicorn, moto's S3
server) killed and restarted for real. The sweeper's decisions are unit-tested in
tests/service/test_sweeper.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import torch
from conftest import _llama, s3_client, service_env, start_worker, stop_processes

from service.redis_server import start_redis_server

BUCKET = "recovery"
TIMED = {"loftq_report.json", "loftq_layers.png", "manifest.json"}  # these hold timings
OPTIONS = {"rank": 8, "iters": 2, "svd": "exact"}  # seconds per shard, so a kill lands mid-job


class Stack:
    """valkey, the API and any number of workers; workers and valkey can be killed and restarted."""

    def __init__(self, work: Path, env: dict, start_api, model: Path, s3) -> None:
        self.work, self.env, self.model, self.s3 = work, env, model, s3
        self.redis_dir = work / "redis"
        self.redis, url = start_redis_server(self.redis_dir)
        self.port = int(url.rsplit(":", 1)[1].split("/")[0])
        self.env["LOFTQ_REDIS_URL"] = url
        self.workers: list[subprocess.Popen] = []
        self.api, self.base = start_api(self.env, work / "api.log")
        self.client = httpx.Client(base_url=self.base, timeout=30)

    def start_worker(self, name: str, **env: str) -> subprocess.Popen:
        worker = start_worker({**self.env, **env}, self.work / f"{name}.log", name)
        self.workers.append(worker)
        return worker

    @staticmethod
    def kill(process: subprocess.Popen) -> None:
        """SIGKILL to the whole group: no clean-up, no acknowledgement, no lease release."""
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)

    def stop_workers(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                self.kill(worker)
        self.workers.clear()

    def restart_redis(self, down_seconds: float) -> None:
        self.redis.kill()  # a crash: only what the append-only file holds survives
        self.redis.wait(10)
        time.sleep(down_seconds)
        self.redis, _ = start_redis_server(self.redis_dir, self.port)

    def submit(self, output: str) -> str:
        body = {"source": f"file://{self.model}", "options": OPTIONS, "output": output}
        response = self.client.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def job(self, job_id: str) -> dict:
        for _ in range(60):  # the API answers 503 while the job store is down
            response = self.client.get(f"/v1/jobs/{job_id}")
            if response.status_code == 200:
                return response.json()
            assert response.status_code == 503, response.text
            time.sleep(0.5)
        raise AssertionError("the API kept answering 503")

    def wait(self, job_id: str, until, what: str, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if until(job):
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id}: {what} not reached; last seen {job}")

    def finished(self, job_id: str) -> dict:
        return self.wait(job_id, lambda j: j["state"] in ("succeeded", "failed", "cancelled"), "an end")

    def events(self, job_id: str) -> list[dict]:
        return self.client.get(f"/v1/jobs/{job_id}/events").json()["events"]

    def artifacts(self, job_id: str) -> dict[str, str]:
        """sha256 of each artifact but the ones that hold timings, from the manifest in S3."""
        output = self.job(job_id)["output"]
        manifest = json.loads(self.s3.get_object(Bucket=BUCKET, Key=f"{output}manifest.json")["Body"].read())
        return {f["path"]: f["sha256"] for f in manifest["files"] if f["path"] not in TIMED}

    def report(self, job_id: str) -> dict:
        output = self.job(job_id)["output"]
        return json.loads(self.s3.get_object(Bucket=BUCKET, Key=f"{output}loftq_report.json")["Body"].read())

    def close(self) -> None:
        self.client.close()
        stop_processes(self.api, self.workers)
        self.redis.terminate()
        self.redis.wait(10)


@pytest.fixture(scope="module")
def stack(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory, start_api) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("recovery")
    models = work / "models"
    model = _llama(
        models / "llama", seed=3, dtype=torch.float32, max_shard_size="1MB",
        hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_key_value_heads=4,
    )
    s3 = s3_client(s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    env = service_env(
        "redis://unset", "loftq-recovery", BUCKET, s3_endpoint, work,  # Stack starts the job store
        allowed_file_roots=json.dumps([str(models)]), torch_threads="1", lease_seconds="5",
        sweep_interval_seconds="1", max_attempts="2",
    )
    stack = Stack(work, env, start_api, model, s3)
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def reference(stack: Stack) -> dict[str, str]:
    """The artifacts of an uninterrupted run of the job every test runs."""
    stack.start_worker("reference")
    job_id = stack.submit("runs/reference/")
    job = stack.finished(job_id)
    stack.stop_workers()
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 1
    return stack.artifacts(job_id)


def _mid_job(job: dict) -> bool:
    return job["state"] == "running" and job["progress"]["shards_done"] >= 3


def test_a_killed_worker_s_job_resumes_elsewhere_and_equals_an_uninterrupted_run(stack: Stack, reference: dict) -> None:
    first = stack.start_worker("doomed")
    job_id = stack.submit("runs/killed/")
    seen = stack.wait(job_id, _mid_job, "three shards done")
    stack.kill(first)
    stack.start_worker("rescuer")
    job = stack.finished(job_id)
    stack.stop_workers()
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 2
    assert [e["data"] for e in stack.events(job_id) if e["type"] == "redelivered"] == [{"work": "job", "attempt": 1}]
    assert stack.artifacts(job_id) == reference
    # A counted shard may still have been uploading when the worker died: that one is redone.
    resumed = stack.report(job_id)["summary"]["shards_resumed"]
    assert resumed >= seen["progress"]["shards_done"] - 1 >= 2, (resumed, seen["progress"])


def test_a_job_whose_workers_keep_dying_fails_with_worker_lost(stack: Stack, reference: dict) -> None:
    job_id = stack.submit("runs/lost/")
    for attempt in (1, 2):
        worker = stack.start_worker(f"dies-{attempt}")
        stack.wait(job_id, lambda j: j["attempts"] == attempt and j["state"] == "running", f"attempt {attempt}")
        stack.kill(worker)
    job = stack.finished(job_id)  # no worker runs now: the sweeper ends it
    assert job["state"] == "failed" and job["error"]["code"] == "worker_lost", job
    assert job["attempts"] == 2
    assert "manifest.json" not in [o["Key"].rsplit("/", 1)[-1] for o in stack.s3.list_objects_v2(Bucket=BUCKET, Prefix=job["output"]).get("Contents", [])]


def test_a_redelivered_message_does_not_run_the_job_twice(stack: Stack, reference: dict) -> None:
    """The broker's visibility timeout (1 s) is far shorter than the job: the message goes to the
    other worker while the first still works on it, and the lease turns it away."""
    # Earlier tests' killed workers left unacknowledged messages of finished jobs; twins with a
    # 1 s timeout would spend their first pool children on those instead of on the duplicate.
    redis.Redis.from_url(stack.env["LOFTQ_REDIS_URL"]).delete("unacked", "unacked_index", stack.env["LOFTQ_QUEUE"])
    logs = [stack.work / f"twin-{n}.log" for n in (1, 2)]
    for n in (1, 2):
        stack.start_worker(f"twin-{n}", LOFTQ_VISIBILITY_TIMEOUT_SECONDS="1")
    deadline = time.monotonic() + 60
    while not all(log.exists() and b"ready." in log.read_bytes() for log in logs):
        assert time.monotonic() < deadline, "the twin workers did not start"
        time.sleep(0.2)
    job_id = stack.submit("runs/redelivered/")
    job = stack.finished(job_id)
    stack.stop_workers()
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 1
    states = [e["data"]["state"] for e in stack.events(job_id) if e["type"] == "state"]
    assert states == ["queued", "running", "succeeded"]
    dropped = sum(log.read_text().count(f"job {job_id} is leased by another worker") for log in logs)
    assert dropped >= 1, "the message was never delivered twice: the test proves nothing"
    assert stack.artifacts(job_id) == reference


def test_a_job_store_restart_mid_job_loses_no_record_and_the_job_finishes(stack: Stack, reference: dict) -> None:
    earlier = stack.submit("runs/before-restart/")
    stack.start_worker("steady")
    stack.finished(earlier)
    job_id = stack.submit("runs/restart/")
    stack.wait(job_id, _mid_job, "three shards done")
    stack.restart_redis(down_seconds=2)
    job = stack.finished(job_id)
    stack.stop_workers()
    assert job["state"] == "succeeded", job
    assert stack.artifacts(job_id) == reference
    assert stack.job(earlier)["state"] == "succeeded"
    listed = {j["id"] for j in stack.client.get("/v1/jobs", params={"limit": 100}).json()["jobs"]}
    assert {earlier, job_id} <= listed
