"""Request limits of ``POST /v1/jobs``: 413 for large bodies, 429 with Retry-After per tenant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import api_app
from fastapi.testclient import TestClient

from service.settings import Settings

BODY = {"source": "s3://models/llama/", "options": {"rank": 8}}


def _api(redis_url: str, tmp_path: Path, **limits: int) -> TestClient:
    return TestClient(api_app(redis_url, tmp_path, "limits", **limits))


def test_a_body_above_the_limit_is_413_announced_or_streamed(redis_url: str, tmp_path: Path) -> None:
    with _api(redis_url, tmp_path, max_request_bytes=2048) as api:
        large = {**BODY, "metadata": {f"k{i}": "x" * 400 for i in range(8)}}
        response = api.post("/v1/jobs", json=large)
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
        raw = json.dumps(large).encode()
        streamed = api.post("/v1/jobs", content=(raw[i : i + 512] for i in range(0, len(raw), 512)),
                            headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "request_too_large"
        assert api.post("/v1/jobs", json=BODY).status_code == 202  # a normal body still passes
        assert len(api.get("/v1/jobs").json()["jobs"]) == 1


def test_submissions_above_the_rate_are_429_with_retry_after(redis_url: str, tmp_path: Path) -> None:
    with _api(redis_url, tmp_path, submissions_per_minute=3) as api:
        codes = [api.post("/v1/jobs", json=BODY) for _ in range(4)]
        assert [r.status_code for r in codes[:3]] == [202, 202, 202]
        refused = codes[3]
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(refused.headers["Retry-After"]) <= 61
        assert len(api.get("/v1/jobs").json()["jobs"]) == 3


def test_queued_jobs_per_tenant_are_capped_and_replays_still_answer(redis_url: str, tmp_path: Path) -> None:
    with _api(redis_url, tmp_path, max_queued_jobs_per_tenant=2) as api:
        first = api.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "one"})
        assert api.post("/v1/jobs", json=BODY).status_code == 202
        refused = api.post("/v1/jobs", json=BODY)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_queued_jobs"
        assert refused.headers["Retry-After"] == "30"
        replay = api.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "one"})
        assert replay.status_code == 202 and replay.json()["id"] == first.json()["id"]  # not refused
        api.post(f"/v1/jobs/{first.json()['id']}/cancel")  # a queued job leaves the queue when cancelled
        assert api.post("/v1/jobs", json=BODY).status_code == 202


@pytest.mark.parametrize("field", ["max_request_bytes", "submissions_per_minute", "max_queued_jobs_per_tenant"])
def test_limits_are_settings(field: str) -> None:
    assert Settings.model_fields[field].description
