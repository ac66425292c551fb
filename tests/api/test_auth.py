"""API keys and tenants: the real app against a real Redis-compatible server, two tenants with
their own keys, local artifact storage; the SDK through the same app; the embedded launcher's
bind rule and ``hash-key`` command."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest
from conftest import api_app
from fastapi.testclient import TestClient
from pydantic import ValidationError
from typer.testing import CliRunner

from api.embedded import app as serve_app
from api.embedded import auth_line, bind_refusal
from api.main import create_app
from loftq_client import ApiError, LoftQClient
from service.lifecycle import Lifecycle
from service.models import JobState
from service.settings import Settings
from service.store import JobStore
from service.tenants import hash_key

KEY_A, KEY_B = "key-of-tenant-a", "key-of-tenant-b"
BODY = {"source": "s3://models/llama/", "options": {"rank": 8}}


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


A, B = _auth(KEY_A), _auth(KEY_B)


def _app(redis_url: str, tmp_path: Path, **settings) -> TestClient:
    return TestClient(api_app(redis_url, tmp_path, "auth", db=3, **settings))


@pytest.fixture
def api(redis_url: str, tmp_path: Path) -> TestClient:
    keys = f"team-a:{hash_key(KEY_A)},team-b:{hash_key(KEY_B)}"
    with _app(redis_url, tmp_path, api_keys=keys, tenant_sources={"*": ["s3://models/"]}) as client:
        yield client


@pytest.fixture
def open_api(redis_url: str, tmp_path: Path) -> TestClient:
    with _app(redis_url, tmp_path) as client:
        yield client


def _create(api: TestClient, headers: dict[str, str], **body) -> dict:
    response = api.post("/v1/jobs", json={**BODY, **body}, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()


def _succeed(api: TestClient, job: dict) -> None:
    """Finish a job as a worker would: state succeeded and a manifest under its output prefix."""
    store: JobStore = api.app.state.store
    Lifecycle(store).transition(job["id"], JobState.running)
    Lifecycle(store).transition(job["id"], JobState.succeeded)
    manifest = json.dumps({"files": []}).encode()
    root: Path = api.app.state.settings.local_storage_root
    path = root / job["output"] / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(manifest)


# --------------------------------------------------------------------------- 401


@pytest.mark.parametrize(
    ("headers", "invalid_token"),
    [({}, False), (_auth("wrong"), True), ({"Authorization": f"Basic {KEY_A}"}, False), ({"Authorization": "Bearer"}, False)],
)
def test_no_or_wrong_key_is_401(api: TestClient, headers: dict[str, str], invalid_token: bool) -> None:
    for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/job_x"), ("GET", "/v1/jobs/job_x/artifacts")):
        response = api.request(method, path, headers=headers, json=BODY if method == "POST" else None)
        assert response.status_code == 401, (method, path)
        assert response.json()["error"]["code"] == "unauthorized"
        challenge = response.headers["WWW-Authenticate"]
        assert challenge.startswith("Bearer") and ('error="invalid_token"' in challenge) == invalid_token
    assert api.app.state.store.list().jobs == []


def test_health_docs_and_metrics_need_no_key(api: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
        assert api.get(path).status_code == 200, path
    assert "HTTPBearer" in api.get("/openapi.json").json()["components"]["securitySchemes"]


# --------------------------------------------------------------------------- tenants


def test_each_tenant_sees_only_its_own_jobs(api: TestClient) -> None:
    ours = _create(api, A)
    theirs = _create(api, B)
    assert ours["tenant"] == "team-a" and theirs["tenant"] == "team-b"
    assert [j["id"] for j in api.get("/v1/jobs", headers=A).json()["jobs"]] == [ours["id"]]
    assert [j["id"] for j in api.get("/v1/jobs", headers=B).json()["jobs"]] == [theirs["id"]]
    assert [j["id"] for j in api.get("/v1/jobs", headers=A, params={"state": "queued"}).json()["jobs"]] == [ours["id"]]
    assert api.get(f"/v1/jobs/{ours['id']}", headers=A).json()["id"] == ours["id"]


def test_another_tenants_job_is_404(api: TestClient) -> None:
    job = _create(api, A)
    _succeed(api, job)
    job_id = job["id"]
    for method, path in (
        ("GET", f"/v1/jobs/{job_id}"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("GET", f"/v1/jobs/{job_id}/events"),
        ("GET", f"/v1/jobs/{job_id}/events/stream"),
        ("GET", f"/v1/jobs/{job_id}/artifacts"),
        ("GET", f"/v1/jobs/{job_id}/artifacts/files/manifest.json"),
    ):
        response = api.request(method, path, headers=B)
        assert response.status_code == 404, (method, path)
        assert response.json()["error"]["code"] == "job_not_found"
        assert api.request(method, path, headers=A).status_code in (200, 202), (method, path)
    # Tenant a's request went through: listed, then downloaded.
    listed = api.get(f"/v1/jobs/{job_id}/artifacts", headers=A).json()["artifacts"]
    assert [a["path"] for a in listed] == ["manifest.json"]


def test_cancel_by_another_tenant_changes_nothing(api: TestClient) -> None:
    job = _create(api, A)
    assert api.post(f"/v1/jobs/{job['id']}/cancel", headers=B).status_code == 404
    assert api.get(f"/v1/jobs/{job['id']}", headers=A).json()["state"] == "queued"
    assert api.post(f"/v1/jobs/{job['id']}/cancel", headers=A).json()["state"] == "cancelled"


def test_artifacts_live_under_the_tenant_prefix(api: TestClient) -> None:
    default = _create(api, A)
    named = _create(api, A, output="team/llama-loftq")
    same_name = _create(api, B, output="team/llama-loftq")
    assert default["output"] == f"tenants/team-a/jobs/{default['id']}/"
    assert named["output"] == "tenants/team-a/team/llama-loftq/"
    assert same_name["output"] == "tenants/team-b/team/llama-loftq/"  # no collision across tenants


def test_without_keys_the_layout_and_tenant_are_unchanged(open_api: TestClient) -> None:
    assert open_api.get("/v1/jobs").status_code == 200
    job = _create(open_api, {})
    assert job["tenant"] == "default" and job["output"] == f"jobs/{job['id']}/"
    assert _create(open_api, {}, output="team/x")["output"] == "team/x/"
    # The tenants' prefix is theirs: the default tenant cannot write into it.
    response = open_api.post("/v1/jobs", json={**BODY, "output": "tenants/team-a/x"})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"
    # A key sent to an open API is ignored, not refused.
    assert open_api.get("/v1/jobs", headers=A).json()["jobs"][0]["tenant"] == "default"


def test_idempotency_keys_are_per_tenant(api: TestClient) -> None:
    ours = api.post("/v1/jobs", json=BODY, headers={**A, "Idempotency-Key": "same"})
    theirs = api.post("/v1/jobs", json=BODY, headers={**B, "Idempotency-Key": "same"})
    again = api.post("/v1/jobs", json=BODY, headers={**A, "Idempotency-Key": "same"})
    assert ours.status_code == theirs.status_code == again.status_code == 202
    assert ours.json()["id"] != theirs.json()["id"]
    assert "Idempotent-Replayed" not in theirs.headers
    assert again.json()["id"] == ours.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    # Another body under a's key is a's conflict only.
    other = api.post("/v1/jobs", json={**BODY, "options": {"rank": 4}}, headers={**B, "Idempotency-Key": "fresh"})
    assert other.status_code == 202


# --------------------------------------------------------------------------- settings


def test_settings_hold_hashes_never_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOFTQ_API_KEYS", json.dumps([f"team-a:{hash_key(KEY_A)}", f"team-b:{hash_key(KEY_B).upper()}"]))
    settings = Settings()
    assert settings.api_keys == {hash_key(KEY_A): "team-a", hash_key(KEY_B): "team-b"}
    assert KEY_A not in settings.model_dump_json() and KEY_B not in repr(settings)
    monkeypatch.setenv("LOFTQ_API_KEYS", f"team-a:{hash_key(KEY_A)}, ")
    assert Settings().api_keys == {hash_key(KEY_A): "team-a"}


@pytest.mark.parametrize(
    "entries",
    [
        f"team-a:{KEY_A}",  # a plain key pasted instead of its hash
        hash_key(KEY_A),  # no tenant
        f"Team A:{hash_key(KEY_A)}",  # not a tenant name
        f"team-a:{hash_key(KEY_A)},team-b:{hash_key(KEY_A)}",  # one key, two tenants
    ],
)
def test_bad_key_entries_stop_the_service(monkeypatch: pytest.MonkeyPatch, entries: str) -> None:
    monkeypatch.setenv("LOFTQ_API_KEYS", entries)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert KEY_A not in str(info.value)  # the error never echoes what was pasted


def test_open_api_warns_at_start(redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="api.main"):
        create_app(Settings(redis_url=redis_url, local_storage_root=tmp_path))
    assert "the API is open" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="api.main"):
        create_app(Settings(redis_url=redis_url, local_storage_root=tmp_path, api_keys=[f"team-a:{hash_key(KEY_A)}"]))
    assert "open" not in caplog.text


# --------------------------------------------------------------------------- SDK


def _sdk(api: TestClient, api_key: str | None) -> LoftQClient:
    """The SDK over the in-process app: each httpx request is replayed through the TestClient."""

    def forward(request: httpx.Request) -> httpx.Response:
        answer = api.request(request.method, str(request.url), headers=dict(request.headers), content=request.content)
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    return LoftQClient("http://testserver", api_key, transport=httpx.MockTransport(forward))


def test_sdk_sends_the_bearer_key(api: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOFTQ_API_KEY", raising=False)
    with _sdk(api, KEY_A) as client:
        job = client.create_job("s3://models/llama/", rank=8)
        assert job.tenant == "team-a" and [j.id for j in client.list_jobs().jobs] == [job.id]
    with _sdk(api, KEY_B) as client, pytest.raises(ApiError) as info:
        client.get_job(job.id)
    assert (info.value.status, info.value.code) == (404, "job_not_found")
    with _sdk(api, None) as client, pytest.raises(ApiError) as info:
        client.list_jobs()
    assert (info.value.status, info.value.code) == (401, "unauthorized")
    monkeypatch.setenv("LOFTQ_API_KEY", KEY_A)
    with _sdk(api, None) as client:
        assert client.get_job(job.id).id == job.id


# --------------------------------------------------------------------------- embedded launcher


@pytest.mark.parametrize(
    ("host", "auth", "allowed"),
    [
        ("127.0.0.1", False, True),
        ("localhost", False, True),
        ("::1", False, True),
        ("0.0.0.0", False, False),
        ("192.168.1.10", False, False),
        ("example.com", False, False),
        ("0.0.0.0", True, True),
        ("::", True, True),
    ],
)
def test_embedded_bind_rule(host: str, auth: bool, allowed: bool) -> None:
    refusal = bind_refusal(host, auth=auth)
    assert (refusal is None) == allowed
    if refusal:
        assert "loopback" in refusal and "LOFTQ_API_KEYS" in refusal


def test_embedded_start_line_says_whether_auth_is_on() -> None:
    assert auth_line({}).startswith("authentication: off")
    line = auth_line({hash_key(KEY_A): "team-a", hash_key(KEY_B): "team-b"})
    assert line.startswith("authentication: on") and "team-a, team-b" in line and KEY_A not in line


def test_hash_key_command(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    made = runner.invoke(serve_app, ["hash-key", "team-a"])
    assert made.exit_code == 0, made.output
    lines = dict(line.split(": ", 1) for line in made.stdout.splitlines())
    key, entry = lines["key"], lines["LOFTQ_API_KEYS entry"]
    assert entry == f"team-a:{hash_key(key)}"
    monkeypatch.setenv("LOFTQ_API_KEYS", entry)
    assert Settings().api_keys == {hash_key(key): "team-a"}
    hashed = runner.invoke(serve_app, ["hash-key", "team-b", "--stdin"], input=f"{KEY_B}\n")
    assert hashed.exit_code == 0 and hashed.stdout.strip() == f"LOFTQ_API_KEYS entry: team-b:{hash_key(KEY_B)}"
    assert KEY_B not in hashed.stdout
    assert runner.invoke(serve_app, ["hash-key", "Not A Tenant"]).exit_code == 2
