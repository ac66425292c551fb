"""Object storage faults injected for real: a fault proxy (tests/integration/s3_fault_proxy.py)
on loopback in front of moto's S3 server answers chosen requests with 500s, 503 SlowDown
or a connection reset. Transient faults are retried and change nothing in the artifacts; a
persistent one fails the job with storage_unavailable and leaves no manifest.json.

The service tests run the real stack (valkey, a Celery worker process, uvicorn) with the
proxy as its S3 endpoint; the others drive S3ObjectStore and ObjectStoreDestination through
the proxy in this process."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from botocore.exceptions import ClientError, EndpointConnectionError, ResponseStreamingError
from conftest import s3_client, service_env, start_worker, stop_processes, upload_models
from s3_fault_proxy import FaultProxy

from api.errors import http_status
from service.settings import Settings
from service.storage import S3ObjectStore, StorageUnavailable, s3_store, storage_unavailable
from worker.sources import MANIFEST_NAME, ObjectStoreDestination

BUCKET = "faults-artifacts"
MODELS = "faults-models"
ATTEMPTS = 4  # LOFTQ_S3_MAX_ATTEMPTS of the stack


@pytest.fixture(scope="module")
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    with FaultProxy(s3_endpoint) as running:
        yield running


@pytest.fixture
def faults(proxy: FaultProxy) -> Iterator[FaultProxy]:
    """The proxy, with every rule a test adds removed afterwards."""
    yield proxy
    proxy.clear()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


# --------------------------------------------------------------------------- error translation


def _client_error(status: int, code: str, operation: str = "PutObject", retries: int = 3) -> ClientError:
    response = {
        "Error": {"Code": code, "Message": f"{code} happened"},
        "ResponseMetadata": {"HTTPStatusCode": status, "RetryAttempts": retries},
    }
    return ClientError(response, operation)


def test_translation_of_storage_errors() -> None:
    what = "upload of s3://b/k"
    error = storage_unavailable(_client_error(500, "InternalError"), what, 5)
    assert isinstance(error, StorageUnavailable) and error.code == "storage_unavailable" and http_status(error) == 503
    assert error.message == (
        "object storage unavailable: upload of s3://b/k failed after 4 attempts "
        "(InternalError (HTTP 500) from PutObject: InternalError happened)"
    )
    slow = storage_unavailable(_client_error(503, "SlowDown", "GetObject", retries=0), "read of s3://b/k", 5)
    assert slow is not None and "after 1 attempt (SlowDown (HTTP 503) from GetObject" in slow.message
    throttled_400 = storage_unavailable(_client_error(400, "RequestTimeout"), what, 5)
    assert throttled_400 is not None and "RequestTimeout" in throttled_400.message

    # Not unavailability: the request itself is wrong, the object missing, or the local disk full.
    for exc in (_client_error(404, "NoSuchKey"), _client_error(403, "AccessDenied"), OSError(errno.ENOSPC, "full"), ValueError("x")):
        assert storage_unavailable(exc, what, 5) is None, exc

    refused = storage_unavailable(EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), what, 5)
    assert refused is not None and "after up to 5 attempts (EndpointConnectionError" in refused.message
    counted = EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
    counted.attempts = 3  # what the needs-retry hook records
    assert "after 3 attempts" in storage_unavailable(counted, what, 5).message
    assert storage_unavailable(ConnectionResetError(104, "reset"), what, 5) is not None

    try:  # boto3 raises this inside its ``except ClientError`` block
        try:
            raise _client_error(503, "SlowDown", "UploadPart", retries=4)
        except ClientError as exc:
            raise S3UploadFailedError(f"Failed to upload x to b/k: {exc}")  # noqa: B904 - boto3's own way
    except S3UploadFailedError as wrapped:
        upload = storage_unavailable(wrapped, what, 5)
    assert upload is not None and "after 5 attempts (SlowDown (HTTP 503) from UploadPart" in upload.message
    try:
        try:
            raise _client_error(403, "AccessDenied")
        except ClientError as exc:
            raise S3UploadFailedError(f"Failed: {exc}")  # noqa: B904
    except S3UploadFailedError as wrapped:
        assert storage_unavailable(wrapped, what, 5) is None

    broken = RetriesExceededError(ResponseStreamingError(error="Connection broken"))
    download = storage_unavailable(broken, "download of s3://b/k", 5)
    assert download is not None and "after 5 attempts (ResponseStreamingError" in download.message


def test_settings_reach_the_client(s3_endpoint: str, aws_env: None) -> None:
    store = s3_store(Settings(storage="s3", s3_bucket="faults-settings", s3_endpoint_url=s3_endpoint, s3_max_attempts=7, s3_retry_mode="adaptive"))
    retries = store.client.meta.config.retries
    assert store.max_attempts == 7 and retries["total_max_attempts"] == 7 and retries["mode"] == "adaptive"
    assert store.transfer_config.num_download_attempts == 7
    assert Settings().s3_max_attempts == 5 and Settings().s3_retry_mode == "standard"


# --------------------------------------------------------------------------- the store through the proxy


@pytest.fixture
def store(faults: FaultProxy, s3_endpoint: str, aws_env: None) -> S3ObjectStore:
    bucket = f"faults-{uuid.uuid4().hex[:16]}"
    s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    return S3ObjectStore(bucket, endpoint_url=faults.url, multipart_threshold=5 * 2**20, max_attempts=ATTEMPTS)


def test_multipart_upload_and_ranged_download_survive_faults(store: S3ObjectStore, faults: FaultProxy, s3_endpoint: str, tmp_path: Path) -> None:
    data = os.urandom(12 * 2**20 + 12345)  # three parts of 5 MiB at most
    (tmp_path / "big").write_bytes(data)
    key = f"^/{store.bucket}/big$"
    rules = [
        faults.add("500", method="PUT", path=key, query=r"partNumber=1\b", times=2),
        faults.add("reset_request", method="PUT", path=key, query=r"partNumber=2\b", times=1),  # mid-upload
        faults.add("slowdown", method="PUT", path=key, query=r"partNumber=3\b", times=1),
        faults.add("reset_response", method="POST", path=key, query="uploadId", times=1),  # completed, reply lost
    ]
    store.upload_file(tmp_path / "big", "big")
    assert [r.injected for r in rules] == [2, 1, 1, 1]
    assert len(faults.requests("PUT", key, r"partNumber=1\b")) == 3
    assert len(faults.requests("POST", key, "uploadId")) == 2
    stored = s3_client(s3_endpoint).get_object(Bucket=store.bucket, Key="big")["Body"].read()
    assert hashlib.sha256(stored).digest() == hashlib.sha256(data).digest()

    faults.clear()
    ranged = faults.add("reset_response", method="GET", path=key, times=2)  # the body breaks off halfway
    faults.add("500", method="GET", path=key, times=1)
    store.download_file("big", tmp_path / "copy")
    assert ranged.injected == 2
    gets = faults.requests("GET", key)
    assert len(gets) == 3 + 3  # three ranges, three faults
    assert (tmp_path / "copy").read_bytes() == data


def test_small_reads_are_retried_when_the_body_breaks_off(store: S3ObjectStore, faults: FaultProxy, s3_endpoint: str) -> None:
    s3_client(s3_endpoint).put_object(Bucket=store.bucket, Key="small.json", Body=b'{"x": 1}' * 64)
    path = f"^/{store.bucket}/small.json$"
    broken = faults.add("reset_response", method="GET", path=path, times=2)
    assert store.read_bytes("small.json") == b'{"x": 1}' * 64
    assert broken.injected == 2 and len(faults.requests("GET", path)) == 3


@pytest.mark.parametrize("fault", ["500", "reset_request", "reset_response"])
def test_a_persistent_upload_failure_is_storage_unavailable_after_every_attempt(
    store: S3ObjectStore, faults: FaultProxy, tmp_path: Path, fault: str
) -> None:
    (tmp_path / "f").write_bytes(b"payload" * 100)
    path = f"^/{store.bucket}/out/f$"
    faults.add(fault, method="PUT", path=path)
    with pytest.raises(StorageUnavailable) as raised:
        store.upload_file(tmp_path / "f", "out/f")
    assert raised.value.code == "storage_unavailable"
    assert f"upload of s3://{store.bucket}/out/f failed after {ATTEMPTS} attempts" in raised.value.message
    assert len(faults.requests("PUT", path)) == ATTEMPTS


def test_unreachable_storage_is_storage_unavailable(aws_env: None, tmp_path: Path) -> None:
    from service.redis_server import free_port

    store = S3ObjectStore("faults-nowhere", endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=3)
    with pytest.raises(StorageUnavailable, match="download of s3://faults-nowhere/k failed after 3 attempts"):
        store.download_file("k", tmp_path / "k")
    with pytest.raises(StorageUnavailable, match="listing of s3://faults-nowhere/p/"):
        store.list("p/")
    assert store.ping() is False


def test_destination_never_leaves_a_manifest_after_a_failed_upload(store: S3ObjectStore, faults: FaultProxy, s3_endpoint: str, tmp_path: Path) -> None:
    destination = ObjectStoreDestination(store, "ckpt", tmp_path / "scratch")
    destination.staging_path("loftq_layers.png").write_bytes(b"png")
    faults.add("500", method="PUT", path=f"^/{store.bucket}/ckpt/loftq_layers.png$")
    with pytest.raises(StorageUnavailable, match="no manifest.json"):
        destination.publish("loftq_layers.png")
    # The engine carries on past a plot it could not publish; the manifest must not follow.
    destination.staging_path(MANIFEST_NAME).write_text("{}")
    with pytest.raises(StorageUnavailable, match=r"manifest.json not written: .*loftq_layers.png"):
        destination.publish(MANIFEST_NAME)
    assert faults.requests("PUT", f"^/{store.bucket}/ckpt/manifest.json$") == []
    assert "Contents" not in s3_client(s3_endpoint).list_objects_v2(Bucket=store.bucket, Prefix="ckpt/")


def test_a_manifest_whose_reply_was_lost_is_deleted(store: S3ObjectStore, faults: FaultProxy, s3_endpoint: str, tmp_path: Path) -> None:
    destination = ObjectStoreDestination(store, "ckpt", tmp_path / "scratch")
    destination.staging_path(MANIFEST_NAME).write_text("{}")
    faults.add("reset_response", method="PUT", path=f"^/{store.bucket}/ckpt/manifest.json$")  # stored each time, never confirmed
    with pytest.raises(StorageUnavailable, match="no manifest.json"):
        destination.publish(MANIFEST_NAME)
    assert len(faults.requests("PUT", f"^/{store.bucket}/ckpt/manifest.json$")) == ATTEMPTS
    assert faults.requests(path=f"^/{store.bucket}/ckpt/manifest.json$")[-1].method == "DELETE"
    assert "Contents" not in s3_client(s3_endpoint).list_objects_v2(Bucket=store.bucket, Prefix="ckpt/")


def test_cleanup_after_the_manifest_does_not_fail_a_complete_checkpoint(
    store: S3ObjectStore, faults: FaultProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    destination = ObjectStoreDestination(store, "ckpt", tmp_path / "scratch")
    faults.add("500", method="DELETE", path=f"^/{store.bucket}/ckpt/.loftq-partial$")
    with pytest.raises(StorageUnavailable):  # before the manifest: a failure like any other
        destination.remove(".loftq-partial")
    destination.staging_path(MANIFEST_NAME).write_text("{}")
    destination.publish(MANIFEST_NAME)
    with caplog.at_level(logging.WARNING, logger="worker.sources"):
        destination.remove(".loftq-partial")  # the journal, outside the manifest
    assert "left ckpt/.loftq-partial behind" in caplog.text
    assert store.read_bytes("ckpt/manifest.json") == b"{}"


# --------------------------------------------------------------------------- the service


@pytest.fixture(scope="module")
def stack(
    redis_url: str, s3_endpoint: str, proxy: FaultProxy, tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, tiny_llama: Path, start_api
) -> Iterator[dict]:
    """API + worker processes with S3 storage whose endpoint is the fault proxy."""
    work = tmp_path_factory.mktemp("storage-faults")
    env = service_env(
        redis_url.replace("/0", "/5"), "loftq-storage-faults", BUCKET, proxy.url, work, s3_max_attempts=str(ATTEMPTS)
    )
    s3 = s3_client(s3_endpoint)  # set up behind the proxy's back
    for bucket in (BUCKET, MODELS):
        s3.create_bucket(Bucket=bucket)
    upload_models(s3, MODELS, {"tiny-bert": tiny_bert, "tiny-llama": tiny_llama})

    worker = start_worker(env, work / "worker.log", "storage-faults")
    api = None
    try:
        api, base = start_api(env, work / "api.log")
        yield {"base": base, "s3": s3, "logs": work}
    finally:
        stop_processes(api, [worker])


def _run(stack: dict, model: str, output: str, timeout: float = 120) -> dict:
    with httpx.Client(base_url=stack["base"], timeout=30) as client:
        response = client.post("/v1/jobs", json={"source": f"s3://{MODELS}/{model}/", "output": output, "options": {"rank": 4}})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.2)
    raise TimeoutError(f"job {job_id} did not end; see {stack['logs']}")


def _keys(stack: dict, prefix: str) -> set[str]:
    listed = stack["s3"].list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return {item["Key"][len(prefix) :] for item in listed.get("Contents", [])}


def _manifest(stack: dict, prefix: str) -> dict[str, str]:
    raw = stack["s3"].get_object(Bucket=BUCKET, Key=prefix + MANIFEST_NAME)["Body"].read()
    return {f["path"]: f["sha256"] for f in json.loads(raw)["files"]}


def _output(name: str) -> str:
    return f"faults/{name}-{uuid.uuid4().hex[:8]}/"


@pytest.fixture(scope="module")
def baseline(stack: dict) -> dict[str, str]:
    """tiny-llama converted with nothing injected: path -> sha256 of its manifest."""
    output = _output("baseline")
    job = _run(stack, "tiny-llama", output)
    assert job["state"] == "succeeded", job["error"]
    return _manifest(stack, output)


TIMED = {"loftq_report.json", "loftq_layers.png"}  # hold timings, differ between any two runs


def test_transient_faults_are_retried_and_the_artifacts_are_identical(
    stack: dict, faults: FaultProxy, baseline: dict[str, str], tiny_llama: Path
) -> None:
    output = _output("transient")
    shards = sorted(p.name for p in tiny_llama.glob("model-*.safetensors"))
    assert len(shards) >= 2
    src, dst = f"^/{MODELS}/tiny-llama/", f"^/{BUCKET}/{output}"
    rules = [
        # source reads: the listing, small files, shards (a reset halfway through the body included)
        faults.add("503", method="GET", path=f"^/{MODELS}/?$", query="list-type", times=1),
        faults.add("slowdown", method="GET", path=src + "config.json$", times=1),
        faults.add("reset_request", method="GET", path=src + r"model\.safetensors\.index\.json$", times=1),
        faults.add("500", method="GET", path=src + re.escape(shards[0]) + "$", times=2),
        faults.add("reset_response", method="GET", path=src + re.escape(shards[1]) + "$", times=1),
        # artifact uploads: shards, the journal, the adapters, and a manifest stored whose reply was lost
        faults.add("slowdown", method="PUT", path=dst + re.escape(shards[0]) + "$", times=1),
        faults.add("reset_request", method="PUT", path=dst + re.escape(shards[1]) + "$", times=1),
        faults.add("503", method="PUT", path=dst + r"\.loftq-partial/", times=1),
        faults.add("500", method="PUT", path=dst + "loftq_init/adapter_model.safetensors$", times=2),
        faults.add("reset_response", method="PUT", path=dst + "manifest.json$", times=1),
    ]
    job = _run(stack, "tiny-llama", output)
    assert job["state"] == "succeeded", job["error"]

    for rule in rules:  # every fault happened, and a later attempt of the same request got through
        assert rule.injected == rule.times, rule
        seen = faults.requests(rule.method, rule.path, rule.query)
        assert len(seen) > rule.times and seen[-1].fault is None, (rule, seen)

    manifest = _manifest(stack, output)
    assert set(manifest) == set(baseline)
    assert {p: h for p, h in manifest.items() if p not in TIMED} == {p: h for p, h in baseline.items() if p not in TIMED}
    assert _keys(stack, output) == set(manifest) | {MANIFEST_NAME}  # nothing else left (the journal is gone)
    for path, sha256 in manifest.items():  # what the bucket holds, read past the proxy
        data = stack["s3"].get_object(Bucket=BUCKET, Key=output + path)["Body"].read()
        assert hashlib.sha256(data).hexdigest() == sha256, path

    # The API reads the manifest through the same store: an outage is a 503 with the code.
    faults.add("500", method="GET", path=dst + "manifest.json$")
    response = httpx.get(f"{stack['base']}/v1/jobs/{job['id']}/artifacts", timeout=30)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "storage_unavailable"


def _assert_failed_without_manifest(stack: dict, job: dict, output: str, *needles: str) -> None:
    assert job["state"] == "failed", job
    error = job["error"]
    assert error["code"] == "storage_unavailable", error
    for needle in needles:
        assert needle in error["message"], (needle, error["message"])
    assert MANIFEST_NAME not in _keys(stack, output)


def test_a_persistent_upload_failure_fails_the_job_without_a_manifest(stack: dict, faults: FaultProxy, tiny_llama: Path) -> None:
    output = _output("upload")
    shard = sorted(p.name for p in tiny_llama.glob("model-*.safetensors"))[0]
    path = f"^/{BUCKET}/{output}{re.escape(shard)}$"
    faults.add("500", method="PUT", path=path)
    job = _run(stack, "tiny-llama", output)
    _assert_failed_without_manifest(
        stack, job, output, f"upload of s3://{BUCKET}/{output}{shard} failed after {ATTEMPTS} attempts",
        f"the output under {output} is incomplete and has no manifest.json",
    )
    assert len(faults.requests("PUT", path)) == ATTEMPTS


def test_a_manifest_stored_without_a_reply_is_withdrawn(stack: dict, faults: FaultProxy) -> None:
    output = _output("manifest")
    path = f"^/{BUCKET}/{output}manifest.json$"
    faults.add("reset_response", method="PUT", path=path)  # moto stores it every time; the worker never hears
    job = _run(stack, "tiny-bert", output)
    _assert_failed_without_manifest(stack, job, output, f"upload of s3://{BUCKET}/{output}manifest.json", "has no manifest.json")
    assert len(faults.requests("PUT", path)) == ATTEMPTS
    assert faults.requests(path=path)[-1].method == "DELETE"


def test_a_plot_that_cannot_be_stored_fails_the_job(stack: dict, faults: FaultProxy, baseline: dict[str, str]) -> None:
    """Drawing the per-layer plot is optional (a failure is a report warning); storing a drawn
    one is not: a manifest must never list a plot that is not in storage."""
    if "loftq_layers.png" not in baseline:
        pytest.skip("this environment draws no plot")
    output = _output("plot")
    faults.add("500", method="PUT", path=f"^/{BUCKET}/{output}loftq_layers.png$")
    job = _run(stack, "tiny-bert", output)
    _assert_failed_without_manifest(stack, job, output, f"upload of s3://{BUCKET}/{output}loftq_layers.png failed after {ATTEMPTS}")


@pytest.mark.parametrize(
    ("what", "fault", "path", "query", "needle"),
    [
        ("listing", "500", f"^/{MODELS}/?$", "list-type.*prefix=tiny-bert", f"listing of s3://{MODELS}/tiny-bert/ failed after {ATTEMPTS} attempts"),
        ("body", "reset_response", f"^/{MODELS}/tiny-bert/model.safetensors$", None,
         f"download of s3://{MODELS}/tiny-bert/model.safetensors failed after {ATTEMPTS} attempts"),
    ],
    ids=["listing", "body"],
)
def test_a_persistent_source_read_failure_fails_the_job(
    stack: dict, faults: FaultProxy, what: str, fault: str, path: str, query: str | None, needle: str
) -> None:
    output = _output(f"source-{what}")
    before = len(faults.requests("GET", path, query))  # tiny-bert is read by other tests too
    faults.add(fault, method="GET", path=path, query=query)
    job = _run(stack, "tiny-bert", output)
    _assert_failed_without_manifest(stack, job, output, f"reading the source s3://{MODELS}/tiny-bert: ", needle)
    assert len(faults.requests("GET", path, query)) - before == ATTEMPTS
