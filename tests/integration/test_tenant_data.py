"""A tenant reads only its own data: the attacks of one tenant on another's models, uploads
and artifacts, and on the worker's own Hub login, against the real service (a Redis-compatible
server, moto's S3 server, uvicorn with two API keys and a Celery worker process).

Team A keeps a private model in its own bucket and uploads another through the API; team B
names A's bucket, A's upload, A's artifacts and the bucket root as its source or calibration
text, and is refused at submission; a job whose record names A's data anyway (as if the policy
had changed while it waited) is refused by the worker. Hub reads go to a stand-in Hub on
loopback that records the token each request carried."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from conftest import s3_client, service_env, start_worker, stop_processes, upload_models

from loftq_client import ApiError, LoftQClient
from service.lifecycle import Lifecycle
from service.models import JobCreate
from service.queue import JobQueue
from service.store import JobStore
from service.tenants import hash_key, tenant_prefix

BUCKET = "tenant-data-artifacts"
QUEUE = "loftq-tenant-data"
KEY_A, KEY_B = "lq_key-of-team-a", "lq_key-of-team-b"
WORKER_HUB_TOKEN = "hf_the-workers-own-login"
A_HUB_TOKEN = "hf_team-a-token"
FINISHED = {"succeeded", "failed", "cancelled"}
PART = 5 * 2**20  # S3's smallest part: files above it are uploaded in parts


class _FakeHub(BaseHTTPRequestHandler):
    """Answers every Hub API call with 404 RepoNotFound and records its Authorization header."""

    seen: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.seen.append((self.path, self.headers.get("Authorization")))
        body = b'{"error": "Repository not found"}'
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def stack(redis_url: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, start_api, wait_until) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("tenant-data")
    hub = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    redis = redis_url.replace("/0", "/11")
    env = service_env(
        redis, QUEUE, BUCKET, s3_endpoint, work,
        api_keys=f"team-a:{hash_key(KEY_A)},team-b:{hash_key(KEY_B)}",
        tenant_sources=json.dumps({"team-a": ["s3://a-models/", "hf://"], "team-b": ["s3://b-models/", "hf://shared-org/"]}),
        hf_tokens=json.dumps({"team-a": A_HUB_TOKEN}), upload_part_bytes=str(PART),
    ) | {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_port}", "HF_TOKEN": WORKER_HUB_TOKEN}
    s3 = s3_client(s3_endpoint)
    for bucket in (BUCKET, "a-models", "b-models"):
        s3.create_bucket(Bucket=bucket)
    upload_models(s3, "a-models", {"private-bert": tiny_bert})
    log = work / "worker.log"
    worker = start_worker(env, log, "tenants")
    api = None
    try:
        api, base = start_api(env, work / "api.log")
        wait_until(lambda: b"ready." in log.read_bytes(), "worker ready", [worker])
        with LoftQClient(base, api_key=KEY_A) as a, LoftQClient(base, api_key=KEY_B) as b:
            yield {"a": a, "b": b, "s3": s3, "redis": redis, "model": tiny_bert}
    finally:
        stop_processes(api, [worker])
        hub.shutdown()


def _finished(client: LoftQClient, job_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while (job := client.get_job(job_id)).state not in FINISHED:
        assert time.monotonic() < deadline, f"job {job_id} still {job.state}"
        time.sleep(0.3)
    return job


@pytest.fixture(scope="module")
def team_a_data(stack: dict) -> dict:
    """Team A's upload, and a finished job of A's from its private bucket."""
    a = stack["a"]
    upload = a.upload_model(stack["model"])
    assert upload.state == "complete" and upload.source.startswith("upload://")
    from_upload = _finished(a, a.create_job(upload.source, rank=8).id)
    assert from_upload.state == "succeeded", from_upload.error
    from_bucket = _finished(a, a.create_job("s3://a-models/private-bert/", rank=8).id)
    assert from_bucket.state == "succeeded", from_bucket.error
    assert from_bucket.output.startswith("tenants/team-a/")
    return {"upload": upload, "job": from_bucket}


def test_a_tenant_uploads_a_model_and_converts_it(stack: dict, team_a_data: dict) -> None:
    upload = team_a_data["upload"]
    keys = [o["Key"] for o in stack["s3"].list_objects_v2(Bucket=BUCKET, Prefix=f"tenants/team-a/inputs/{upload.id}/")["Contents"]]
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == sorted(p.name for p in stack["model"].iterdir() if p.is_file())
    assert stack["a"].get_upload(upload.id).state == "complete"


def test_large_files_are_uploaded_in_parts_and_uploads_complete_only_when_whole(stack: dict, tmp_path: Path) -> None:
    a = stack["a"]
    (tmp_path / "config.json").write_text("{}")
    big = os.urandom(2 * PART + 12345)
    (tmp_path / "weights.bin").write_bytes(big)
    (tmp_path / ".hidden").write_text("not uploaded")
    upload = a.upload_model(tmp_path)
    assert upload.state == "complete" and {f.path for f in upload.files} == {"config.json", "weights.bin"}
    stored = stack["s3"].get_object(Bucket=BUCKET, Key=f"tenants/team-a/inputs/{upload.id}/weights.bin")["Body"].read()
    assert hashlib.sha256(stored).digest() == hashlib.sha256(big).digest()

    declared = {"config.json": 2, "weights.bin": PART + 1}
    opened = a._json("POST", "/v1/uploads", json={"files": declared})
    targets = {t["path"]: t for t in opened["files"]}
    assert [p["size"] for p in targets["weights.bin"]["parts"]] == [PART, 1] and targets["config.json"]["url"]
    assert httpx.put(targets["config.json"]["url"], content=b"{}").status_code == 200
    with pytest.raises(ApiError) as refused:
        a._json("POST", f"/v1/uploads/{opened['id']}/complete")
    assert refused.value.status == 409 and refused.value.code == "upload_incomplete"
    assert "weights.bin" in refused.value.message and "config.json" not in refused.value.message
    with pytest.raises(ApiError) as refused:
        a.create_job(f"upload://{opened['id']}", rank=8)
    assert refused.value.status == 409 and refused.value.code == "upload_incomplete"
    a.delete_upload(opened["id"])
    with pytest.raises(ApiError) as gone:
        a.get_upload(opened["id"])
    assert gone.value.code == "upload_not_found"
    assert not stack["s3"].list_multipart_uploads(Bucket=BUCKET).get("Uploads"), "the unfinished multipart upload was aborted"


def test_another_tenant_cannot_read_a_tenants_models_uploads_or_artifacts(stack: dict, team_a_data: dict) -> None:
    b, upload, job = stack["b"], team_a_data["upload"], team_a_data["job"]
    stolen = [
        f"s3://{BUCKET}/{job.output}",  # A's converted model
        f"s3://{BUCKET}/tenants/team-a/inputs/{upload.id}/",  # A's upload, by its key
        f"s3://{BUCKET}/tenants/team-a",
        f"s3://{BUCKET}/",  # the whole artifact bucket
        f"s3://{BUCKET}/tenants/team-b/../team-a/jobs/",
        "s3://a-models/private-bert/",  # A's private bucket, which the service's credentials reach
    ]
    for source in stolen:
        with pytest.raises(ApiError) as refused:
            b.create_job(source, rank=8)
        assert refused.value.status == 422, source
        assert refused.value.code in ("source_not_allowed", "invalid_source"), (source, refused.value)
        assert "team-a" not in refused.value.message.replace(source, ""), "the refusal names nothing beyond the URI given"
    for text in (f"s3://{BUCKET}/{job.output}loftq_report.json", "s3://a-models/private-bert/", f"upload://{upload.id}/config.json"):
        with pytest.raises(ApiError) as refused:
            b.create_job("s3://b-models/anything/", calibration_data=text, objective="activation")
        assert refused.value.status == 422 and refused.value.code in ("source_not_allowed", "invalid_calibration_data"), text
    with pytest.raises(ApiError) as refused:
        b.create_job(upload.source, rank=8)
    assert refused.value.status == 422 and refused.value.code == "invalid_source"
    for call in (lambda: b.get_upload(upload.id), lambda: b.delete_upload(upload.id)):
        with pytest.raises(ApiError) as refused:
            call()
        assert refused.value.status == 404 and refused.value.code == "upload_not_found"
    assert stack["a"].get_upload(upload.id).state == "complete", "B's delete did nothing"


def test_the_worker_refuses_another_tenants_data_even_when_the_job_was_admitted(stack: dict, team_a_data: dict) -> None:
    """A job record naming A's artifacts (as if admitted under an older policy, or written into
    the job store by other means) is refused by the worker's own check before it reads anything."""
    job = team_a_data["job"]
    store = JobStore.from_url(stack["redis"])
    request = JobCreate(source=f"s3://{BUCKET}/{job.output}", options={"rank": 8})
    forged = store.create(request, tenant="team-b", prefix=tenant_prefix("team-b"))
    JobQueue(stack["redis"], QUEUE).enqueue(forged.id)
    ended = _finished(stack["b"], forged.id)
    assert ended.state == "failed" and ended.error.code == "source_not_allowed", ended.error
    listed = stack["s3"].list_objects_v2(Bucket=BUCKET, Prefix=forged.output)
    assert not listed.get("Contents"), "nothing of A's was copied into B's area"


def test_hub_reads_use_the_tenants_token_and_never_the_workers(stack: dict) -> None:
    _FakeHub.seen.clear()
    repo = f"shared-org/model-{uuid.uuid4().hex[:6]}"
    for client, token in ((stack["b"], None), (stack["a"], f"Bearer {A_HUB_TOKEN}")):
        ended = _finished(client, client.create_job(f"hf://{repo}", rank=8).id)
        assert ended.state == "failed" and ended.error.code == "source_not_found", ended.error
        assert "LOFTQ_HF_TOKENS" in ended.error.message
        seen = [auth for path, auth in _FakeHub.seen if repo in path]
        assert seen and set(seen) == {token}, seen
        _FakeHub.seen.clear()
    assert all(WORKER_HUB_TOKEN not in (auth or "") for _, auth in _FakeHub.seen)


def test_hub_repositories_must_be_granted(stack: dict) -> None:
    with pytest.raises(ApiError) as refused:
        stack["b"].create_job("hf://private-org/model", rank=8)
    assert refused.value.status == 422 and refused.value.code == "source_not_allowed"
    assert "hf://shared-org/" in refused.value.message, "the refusal says what B may read"


def test_deleting_a_job_removes_its_artifacts_and_record_and_nothing_of_another_tenant(stack: dict, team_a_data: dict) -> None:
    a, b, s3 = stack["a"], stack["b"], stack["s3"]
    upload_models(s3, "b-models", {"bert": stack["model"]})
    mine = team_a_data["job"]  # the last test here: A's job may go
    theirs = _finished(b, b.create_job("s3://b-models/bert/", rank=8).id)
    assert mine.state == theirs.state == "succeeded"

    def keys(prefix: str) -> list[str]:
        return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]

    upload_area = f"tenants/team-a/inputs/{team_a_data['upload'].id}/"
    before = {job.id: keys(job.output) for job in (mine, theirs)} | {"upload": keys(upload_area)}
    assert all(before.values())
    assert b._http.delete(f"/v1/jobs/{mine.id}").status_code == 404  # B cannot delete A's job
    assert keys(mine.output) == before[mine.id] and a.get_job(mine.id).state == "succeeded"

    assert a._http.delete(f"/v1/jobs/{mine.id}").status_code == 204
    assert keys(mine.output) == []
    with pytest.raises(ApiError) as gone:
        a.get_job(mine.id)
    assert gone.value.code == "job_not_found"
    assert a._http.delete(f"/v1/jobs/{mine.id}").status_code == 404
    assert mine.id not in [job.id for job in a.list_jobs(limit=100).jobs]
    assert keys(theirs.output) == before[theirs.id] and b.get_job(theirs.id).state == "succeeded"
    assert keys(upload_area) == before["upload"] and a.get_upload(team_a_data["upload"].id).state == "complete", "its uploads stay"

    # A record naming another tenant's artifacts (written by other means) loses its record only.
    store = JobStore.from_url(stack["redis"])
    forged = store.create(JobCreate(source="s3://b-models/bert/"), tenant="team-b", output=upload_area)
    Lifecycle(store).cancel(forged.id)  # never queued: ended at once
    assert b._http.delete(f"/v1/jobs/{forged.id}").status_code == 204
    assert keys(upload_area) == before["upload"], "A's files are untouched"

