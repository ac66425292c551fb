"""HTTP details the OpenAPI fuzz run (tests/api/test_openapi_fuzz.py) turned up, pinned as
plain cases: event cursors the job store cannot read, 405's Allow header, and error bodies
the document declares."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import api_app
from fastapi.testclient import TestClient

BODY = {"source": "s3://models/llama/", "options": {"rank": 8}}
MAX = 2**64 - 1


@pytest.fixture
def api(redis_url: str, tmp_path: Path) -> TestClient:
    with TestClient(api_app(redis_url, tmp_path, "conformance", db=6)) as client:
        yield client


@pytest.mark.parametrize("after", [f"{MAX + 1}-0", f"1-{MAX + 1}", f"{MAX}-{MAX}", "9" * 40 + "-0"])
def test_an_event_cursor_beyond_64_bits_is_422_not_503(api: TestClient, after: str) -> None:
    job = api.post("/v1/jobs", json=BODY).json()["id"]
    api.post(f"/v1/jobs/{job}/cancel")  # a finished job, so the stream would end
    for route in ("events", "events/stream"):
        response = api.get(f"/v1/jobs/{job}/{route}", params={"after": after})
        assert response.status_code == 422, (route, response.text)
        assert response.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize("after", [f"{MAX}-0", f"0-{MAX}", f"{MAX - 1}-{MAX}"])
def test_the_largest_readable_cursors_still_answer(api: TestClient, after: str) -> None:
    job = api.post("/v1/jobs", json=BODY).json()["id"]
    page = api.get(f"/v1/jobs/{job}/events", params={"after": after})
    assert page.status_code == 200, page.text
    cursor = tuple(map(int, after.split("-")))
    assert all(tuple(map(int, event["id"].split("-"))) > cursor for event in page.json()["events"])
    assert page.json()["next_after"] == (page.json()["events"][-1]["id"] if page.json()["events"] else after)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("OPTIONS", "/v1/jobs", "GET, POST"),
        ("DELETE", "/v1/jobs", "GET, POST"),
        ("PUT", "/v1/jobs/job_x", "DELETE, GET"),
        ("GET", "/v1/jobs/job_x/cancel", "POST"),
        ("PUT", "/v1/jobs/job_x/artifacts/files/a/b.json", "GET"),
        ("POST", "/healthz", "GET"),
    ],
)
def test_405_names_every_method_of_the_path(api: TestClient, method: str, path: str, allowed: str) -> None:
    response = api.request(method, path)
    assert response.status_code == 405
    assert response.headers["Allow"] == allowed
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_the_document_declares_the_error_body_for_every_error_status(api: TestClient) -> None:
    document = api.get("/openapi.json").json()
    assert "HTTPValidationError" not in document["components"]["schemas"]  # FastAPI's body, never sent
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            errors = {status: r for status, r in operation["responses"].items() if status[0] in "45"}
            if path.startswith("/v1/"):
                assert {"401", "422", "503"} <= set(errors), (method, path)
            for status, response in errors.items():
                if path != "/readyz":
                    assert response["content"] == {"application/json": {"schema": error}}, (method, path, status)
    submit = document["paths"]["/v1/jobs"]["post"]["responses"]
    assert {"400", "409", "413", "429"} <= set(submit)
    assert "Retry-After" in submit["429"]["headers"] and "Location" in submit["202"]["headers"]
