"""``Idempotency-Key`` on ``POST /v1/jobs``: the real app against a real Redis-compatible server."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
from conftest import api_app
from fastapi.testclient import TestClient

from service.errors import IdempotencyKeyReused
from service.models import JobCreate
from service.store import JobStore

BODY = {"source": "s3://models/llama/", "options": {"rank": 8}}


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore.from_url(redis_url.replace("/0", "/2"), prefix=f"idem-{uuid.uuid4().hex[:8]}:")


@pytest.fixture
def api(redis_url: str, tmp_path: Path, store: JobStore) -> TestClient:
    app = api_app(redis_url, tmp_path, "idem")
    app.state.store = store
    with TestClient(app) as client:
        yield client


def _jobs(api: TestClient) -> list[str]:
    return [job["id"] for job in api.get("/v1/jobs", params={"limit": 100}).json()["jobs"]]


def test_same_key_and_body_return_the_same_job(api: TestClient) -> None:
    first = api.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "abc"})
    again = api.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "abc"})
    assert first.status_code == again.status_code == 202, again.text
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert again.headers["Location"] == f"/v1/jobs/{first.json()['id']}"
    assert _jobs(api) == [first.json()["id"]]


def test_same_key_with_another_body_is_409(api: TestClient) -> None:
    assert api.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "k1"}).status_code == 202
    response = api.post("/v1/jobs", json={**BODY, "options": {"rank": 16}}, headers={"Idempotency-Key": "k1"})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "idempotency_key_reused"
    assert len(_jobs(api)) == 1


def test_other_keys_and_no_key_create_new_jobs(api: TestClient) -> None:
    ids = {api.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": key}).json()["id"] for key in ("a", "b")}
    ids |= {api.post("/v1/jobs", json=BODY).json()["id"] for _ in range(2)}
    assert len(ids) == 4


def test_an_empty_or_oversized_key_is_422(api: TestClient) -> None:
    for key in ("", "x" * 256):
        response = api.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": key})
        assert response.status_code == 422, key
    assert _jobs(api) == []


def test_concurrent_requests_with_one_key_create_one_job(store: JobStore) -> None:
    request = JobCreate(**BODY)
    results: list = []

    def submit() -> None:
        results.append(store.create_idempotent(request, "race"))

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1


def test_keys_belong_to_a_tenant(store: JobStore) -> None:
    request = JobCreate(**BODY)
    ours, _ = store.create_idempotent(request, "shared", tenant="a")
    theirs, created = store.create_idempotent(request, "shared", tenant="b")
    assert created and theirs.id != ours.id and theirs.tenant == "b"
    with pytest.raises(IdempotencyKeyReused):
        store.create_idempotent(JobCreate(**{**BODY, "metadata": {"x": "1"}}), "shared", tenant="a")


def test_a_job_that_could_not_be_queued_frees_its_key(api: TestClient) -> None:
    queue = api.app.state.queue

    class Down:
        def enqueue(self, job_id: str) -> None:
            raise ConnectionError("broker unreachable")

        def send_webhook(self, job_id: str, delivery_id: str) -> None:
            raise ConnectionError("broker unreachable")

    api.app.state.queue = Down()
    failed = api.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "retry-me"})
    assert failed.status_code == 503 and failed.json()["error"]["code"] == "unavailable"
    api.app.state.queue = queue
    retried = api.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "retry-me"})
    assert retried.status_code == 202 and "Idempotent-Replayed" not in retried.headers
    failed_id = api.get("/v1/jobs", params={"state": "failed"}).json()["jobs"][0]["id"]
    assert retried.json()["id"] != failed_id
