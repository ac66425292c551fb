"""Webhooks against the real service: a Redis-compatible server, moto's S3 server, uvicorn, a
Celery job worker, the webhook worker (worker/webhook_app.py) and a receiver in a process of
its own (webhook_receiver.py). Jobs end every way a job can end (the worker's result or error,
a cancel while queued and while running, the sweeper after the worker died, a queue that would
not take the job), and each end reaches each webhook exactly once, signed. A receiver that is
down, slow or answering 500 does not slow or fail a job."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from conftest import _llama, s3_client, service_env, start_webhook_worker, start_worker, stop_processes
from fastapi.testclient import TestClient

from api.main import create_app
from service.queue import JobQueue
from service.redis_server import free_port
from service.settings import Settings
from service.store import JobStore

BUCKET = "webhook-artifacts"
QUEUE = "loftq-webhooks-test"
TENANT_SECRET = "whsec_" + base64.b64encode(b"the tenant's own signing key!!").decode()
SLOW = {"rank": 8, "iters": 2, "svd": "exact"}  # seconds per shard: a job that can be caught running
QUICK = {"rank": 4, "iters": 1}
RETRIES = [0.2, 0.5]


class Stack:
    def __init__(self, work: Path, env: dict, base: str, receiver: str, log: Path, models: Path) -> None:
        self.work, self.env, self.receiver, self.log, self.models = work, env, receiver, log, models
        self.client = httpx.Client(base_url=base, timeout=30)
        self.workers: list[subprocess.Popen] = []

    def submit(self, source: str, options: dict, path: str, **fields) -> dict:
        body = {"source": source, "options": options, "webhook_url": f"{self.receiver}{path}", **fields}
        response = self.client.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        return response.json()

    def job(self, job_id: str) -> dict:
        return self.client.get(f"/v1/jobs/{job_id}").json()

    def wait(self, job_id: str, until, what: str, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while not until(job := self.job(job_id)):
            assert time.monotonic() < deadline, f"job {job_id}: {what} not reached; last seen {job}"
            time.sleep(0.1)
        return job

    def ended(self, job_id: str) -> dict:
        return self.wait(job_id, lambda j: j["state"] in ("succeeded", "failed", "cancelled"), "an end")

    def received(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def received_for(self, job_id: str) -> list[dict]:
        return [r for r in self.received() if json.loads(r["body"])["data"]["id"] == job_id]

    def deliveries(self, job_id: str) -> list[dict]:
        response = self.client.get(f"/v1/jobs/{job_id}/webhooks")
        assert response.status_code == 200, response.text
        return response.json()["deliveries"]

    def settled(self, job_id: str, count: int, timeout: float = 60) -> list[dict]:
        """The job's deliveries once ``count`` of them are no longer pending."""
        deadline = time.monotonic() + timeout
        while True:
            deliveries = self.deliveries(job_id)
            if len(deliveries) >= count and all(d["state"] != "pending" for d in deliveries):
                return deliveries
            assert time.monotonic() < deadline, f"deliveries of {job_id} did not settle: {deliveries}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def stack(redis_url: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, start_api, wait_until) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("webhooks")
    models = work / "models"
    _llama(models / "slow", seed=5, dtype=torch.float32, max_shard_size="1MB",
           hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_key_value_heads=4)
    shutil.copytree(tiny_bert, models / "bert")
    s3_client(s3_endpoint).create_bucket(Bucket=BUCKET)
    port = free_port()
    receiver_log = work / "received.jsonl"
    receiver = subprocess.Popen([sys.executable, str(Path(__file__).with_name("webhook_receiver.py")), str(port), str(receiver_log)])
    tenant_hook = {"url": f"http://127.0.0.1:{port}/ok/tenant", "secret": TENANT_SECRET, "events": ["job.succeeded", "job.failed", "job.cancelled"]}
    env = service_env(
        redis_url.replace("/0", "/12"), QUEUE, BUCKET, s3_endpoint, work,
        allowed_file_roots=json.dumps([str(models)]), torch_threads="1", lease_seconds="5", sweep_interval_seconds="1",
        max_attempts="1", webhook_allowed_networks="127.0.0.0/8", webhook_retry_seconds=json.dumps(RETRIES),
        webhook_timeout_seconds="2", tenant_webhooks=json.dumps({"default": tenant_hook}),
    )
    workers = [start_worker(env, work / "worker.log", "jobs"), start_webhook_worker(env, work / "webhooks.log", "hooks")]
    api = None
    try:
        api, base = start_api(env, work / "api.log")
        for log in ("worker.log", "webhooks.log"):
            wait_until(lambda log=log: b"ready." in (work / log).read_bytes(), f"{log} ready", workers)
        stack = Stack(work, env, base, f"http://127.0.0.1:{port}", receiver_log, models)
        stack.workers = workers
        yield stack
    finally:
        stop_processes(api, workers)
        receiver.kill()
        receiver.wait(10)


def _signed_by(record: dict, secret: str) -> bool:
    """The Standard Webhooks check, written out: HMAC-SHA256 over id.timestamp.body."""
    headers = record["headers"]
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.{record['body']}".encode()
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(f"v1,{expected}", part) for part in headers["webhook-signature"].split())


def _events(records: list[dict], path: str) -> list[str]:
    return [json.loads(r["body"])["type"] for r in sorted(records, key=lambda r: r["time"]) if r["path"] == path]


def test_every_end_reaches_each_webhook_once_signed(stack: Stack) -> None:
    models = stack.models
    running = stack.submit(f"file://{models}/slow", SLOW, "/ok/running")
    stack.wait(running["id"], lambda j: j["state"] == "running" and j["progress"]["shards_done"] >= 1, "running")
    queued = stack.submit(f"file://{models}/bert", QUICK, "/ok/queued")  # the one worker is busy
    assert stack.client.post(f"/v1/jobs/{queued['id']}/cancel").json()["state"] == "cancelled"
    assert stack.client.post(f"/v1/jobs/{running['id']}/cancel").json()["state"] == "cancelling"
    assert stack.ended(running["id"])["state"] == "cancelled"
    succeeded = stack.submit(f"file://{models}/bert", QUICK, "/ok/succeeded")
    failed = stack.submit(f"file://{models}/bert", {**QUICK, "rank": 1000}, "/ok/failed")  # above every layer's size
    assert stack.ended(succeeded["id"])["state"] == "succeeded"
    assert stack.ended(failed["id"])["state"] == "failed"

    expected = {
        running["id"]: ("/ok/running", ["job.started", "job.cancelled"]),
        queued["id"]: ("/ok/queued", ["job.cancelled"]),
        succeeded["id"]: ("/ok/succeeded", ["job.started", "job.succeeded"]),
        failed["id"]: ("/ok/failed", ["job.started", "job.failed"]),
    }
    for job in (running, queued, succeeded, failed):
        path, events = expected[job["id"]]
        deliveries = stack.settled(job["id"], len(events) + 1)
        assert [(d["event"], d["state"], d["attempts"]) for d in deliveries if d["target"] == "job"] == [(e, "delivered", 1) for e in events]
        assert [(d["event"], d["state"]) for d in deliveries if d["target"] == "tenant"] == [(events[-1], "delivered")]
        records = stack.received_for(job["id"])
        assert _events(records, path) == events
        assert _events(records, "/ok/tenant") == [events[-1]]
        assert job["webhook_secret"].startswith("whsec_") and stack.job(job["id"])["webhook_secret"] is None
        for record in records:
            secret = job["webhook_secret"] if record["path"] == path else TENANT_SECRET
            assert _signed_by(record, secret), record["headers"]
            assert not _signed_by(record, TENANT_SECRET if secret != TENANT_SECRET else job["webhook_secret"])
        assert len({r["headers"]["webhook-id"] for r in records}) == len(records)
    ended = json.loads(next(r for r in stack.received_for(failed["id"]) if r["path"] == "/ok/failed" and '"job.failed"' in r["body"])["body"])
    assert ended["data"]["state"] == "failed" and ended["data"]["error"]["code"] and "webhook_secret" not in ended["data"]


def test_a_receiver_that_is_down_hung_or_failing_does_not_hold_up_or_fail_the_job(stack: Stack) -> None:
    hold = Path(f"{stack.log}.hold")
    hold.touch()
    try:
        hung = stack.submit(f"file://{stack.models}/bert", QUICK, "/hold")
        done = stack.ended(hung["id"])
        assert done["state"] == "succeeded", done
        # The job ended while its receiver still held its job.started delivery.
        assert "job.started" in _events(stack.received_for(hung["id"]), "/hold")
        assert not [d for d in stack.deliveries(hung["id"]) if d["target"] == "job" and d["state"] == "delivered"]
    finally:
        hold.unlink()
    jobs = {
        "500": stack.submit(f"file://{stack.models}/bert", QUICK, "/fail"),
        "down": stack.submit(f"file://{stack.models}/bert", QUICK, "", webhook_url=f"http://127.0.0.1:{free_port()}/nobody"),
    }
    for kind, job in jobs.items():
        done = stack.ended(job["id"])
        assert done["state"] == "succeeded", (kind, done)
        deliveries = [d for d in stack.settled(job["id"], 3, timeout=90) if d["target"] == "job"]
        assert [(d["event"], d["state"], d["attempts"]) for d in deliveries] == [
            ("job.started", "failed", 1 + len(RETRIES)),
            ("job.succeeded", "failed", 1 + len(RETRIES)),
        ], kind
        for delivery in deliveries:
            assert delivery["last_status"] == (500 if kind == "500" else None), delivery
            assert delivery["last_error"] == ("answered HTTP 500" if kind == "500" else delivery["last_error"]) and delivery["last_error"]
    assert len(_events(stack.received_for(jobs["500"]["id"]), "/fail")) == 2 * (1 + len(RETRIES))


def test_an_address_webhooks_may_not_reach_is_refused_at_submission(stack: Stack) -> None:
    for url in ("http://10.0.0.1/hook", "http://169.254.169.254/latest", "http://[::1]/hook", "ftp://example.com/x", "http://user:pw@example.com/"):
        response = stack.client.post("/v1/jobs", json={"source": f"file://{stack.models}/bert", "webhook_url": url})
        assert response.status_code == 422, (url, response.text)
        assert response.json()["error"]["code"] in ("webhook_not_allowed", "invalid_request"), response.text


def test_a_job_the_queue_would_not_take_fails_once_and_says_so(stack: Stack, tmp_path: Path) -> None:
    """The API in this process on the stack's job store and webhook queue, with a job queue that
    refuses the message (the webhook worker and the receiver are the stack's processes)."""

    class RefusingQueue(JobQueue):
        def enqueue(self, job_id: str) -> None:
            raise ConnectionError("the broker refused the message")

    settings = Settings(_env_file=None, **{
        "redis_url": stack.env["LOFTQ_REDIS_URL"], "queue": QUEUE, "local_storage_root": tmp_path / "artifacts",
        "allowed_file_roots": [stack.models], "webhook_allowed_networks": ["127.0.0.0/8"],
        "webhook_retry_seconds": RETRIES, "tenant_webhooks": json.loads(stack.env["LOFTQ_TENANT_WEBHOOKS"]),
    })
    app = create_app(settings)
    app.state.store = JobStore.from_url(settings.redis_url, retention_seconds=settings.job_retention_seconds)
    app.state.queue = RefusingQueue.from_settings(settings)
    with TestClient(app) as api:
        body = {"source": f"file://{stack.models}/bert", "webhook_url": f"{stack.receiver}/ok/unqueued"}
        refused = api.post("/v1/jobs", json=body)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable"
        newest = app.state.store.list(limit=1).jobs[0]
    assert newest.request.webhook_url == body["webhook_url"]
    job_id = newest.id
    job = stack.job(job_id)
    assert job["state"] == "failed" and job["error"]["code"] == "queue_unavailable"
    deliveries = stack.settled(job_id, 2)
    assert sorted((d["target"], d["event"], d["state"]) for d in deliveries) == [
        ("job", "job.failed", "delivered"), ("tenant", "job.failed", "delivered")
    ]
    assert _events(stack.received_for(job_id), "/ok/unqueued") == ["job.failed"]


def test_a_running_job_deleted_stops_then_goes_and_its_end_is_still_announced(stack: Stack) -> None:
    job = stack.submit(f"file://{stack.models}/slow", SLOW, "/ok/deleted")
    stack.wait(job["id"], lambda j: j["state"] == "running" and j["progress"]["shards_done"] >= 1, "running")
    s3 = s3_client(stack.env["LOFTQ_S3_ENDPOINT_URL"])
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=job["output"]).get("Contents"), "it has written something"
    stopping = stack.client.delete(f"/v1/jobs/{job['id']}")
    assert stopping.status_code == 202 and stopping.json()["state"] == "cancelling", stopping.text
    deadline = time.monotonic() + 120
    while stack.client.get(f"/v1/jobs/{job['id']}").status_code != 404:
        assert time.monotonic() < deadline, "the deleted job was not removed once it stopped"
        time.sleep(0.2)
    assert not s3.list_objects_v2(Bucket=BUCKET, Prefix=job["output"]).get("Contents")
    while _events(stack.received_for(job["id"]), "/ok/tenant") != ["job.cancelled"]:
        assert time.monotonic() < deadline, stack.received_for(job["id"])
        time.sleep(0.2)
    assert _events(stack.received_for(job["id"]), "/ok/deleted") == ["job.started", "job.cancelled"]


def test_a_job_whose_worker_died_is_failed_by_the_sweeper_once(stack: Stack) -> None:
    job = stack.submit(f"file://{stack.models}/slow", SLOW, "/ok/lost")
    stack.wait(job["id"], lambda j: j["state"] == "running" and j["progress"]["shards_done"] >= 1, "running")
    worker = stack.workers[0]
    os.killpg(worker.pid, signal.SIGKILL)  # no clean-up, no end recorded: the lease lapses
    worker.wait(30)
    ended = stack.ended(job["id"])
    assert ended["state"] == "failed" and ended["error"]["code"] == "worker_lost", ended
    deliveries = stack.settled(job["id"], 3)
    assert [(d["target"], d["event"]) for d in deliveries] == [("job", "job.started"), ("job", "job.failed"), ("tenant", "job.failed")]
    assert _events(stack.received_for(job["id"]), "/ok/lost") == ["job.started", "job.failed"]
