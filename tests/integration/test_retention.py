"""Retention against the real service: finished jobs expire after LOFTQ_JOB_RETENTION_SECONDS
(3 s here) with their artifacts, which the API's sweeper removes; nothing of another tenant, and
nothing that belongs to no expired job, is touched (Redis-compatible server, moto's S3 server,
uvicorn with two API keys, a Celery worker)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import s3_client, service_env, start_worker, stop_processes, upload_models

from loftq_client import ApiError, LoftQClient
from service.tenants import hash_key

BUCKET = "retention-artifacts"
KEY_A, KEY_B = "lq_retention-a", "lq_retention-b"
RETENTION = 3


@pytest.fixture(scope="module")
def stack(redis_url: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, start_api, wait_until) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("retention")
    env = service_env(
        redis_url.replace("/0", "/13"), "loftq-retention", BUCKET, s3_endpoint, work,
        api_keys=f"team-a:{hash_key(KEY_A)},team-b:{hash_key(KEY_B)}",
        tenant_sources=json.dumps({"*": ["s3://retention-models/"]}),
        job_retention_seconds=str(RETENTION), sweep_interval_seconds="1", torch_threads="1",
    )
    s3 = s3_client(s3_endpoint)
    for bucket in (BUCKET, "retention-models"):
        s3.create_bucket(Bucket=bucket)
    upload_models(s3, "retention-models", {"bert": tiny_bert})
    log = work / "worker.log"
    worker = start_worker(env, log, "retention")
    api = None
    try:
        api, base = start_api(env, work / "api.log")
        wait_until(lambda: b"ready." in log.read_bytes(), "worker ready", [worker])
        with LoftQClient(base, api_key=KEY_A) as a, LoftQClient(base, api_key=KEY_B) as b:
            yield {"a": a, "b": b, "s3": s3}
    finally:
        stop_processes(api, [worker])


def _keys(s3, prefix: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


def _finished(client: LoftQClient, job_id: str) -> object:
    deadline = time.monotonic() + 180
    while (job := client.get_job(job_id)).state not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    return job


def test_finished_jobs_expire_with_their_artifacts_and_nothing_else_goes(stack: dict) -> None:
    a, b, s3 = stack["a"], stack["b"], stack["s3"]
    keep = "tenants/team-b/notes/keep.txt"  # in B's area, but no job's output
    s3.put_object(Bucket=BUCKET, Key=keep, Body=b"not a job's")
    first = _finished(a, a.create_job("s3://retention-models/bert/", rank=4).id)
    assert first.state == "succeeded" and _keys(s3, first.output)
    second = b.create_job("s3://retention-models/bert/", rank=4)  # starts as A's job expires
    deadline = time.monotonic() + 60
    while _keys(s3, first.output):
        assert time.monotonic() < deadline, "the expired job's artifacts stay"
        time.sleep(0.2)
    with pytest.raises(ApiError) as gone:
        a.get_job(first.id)
    assert gone.value.code == "job_not_found"
    second = _finished(b, second.id)
    assert second.state == "succeeded"
    assert _keys(s3, second.output), "a job younger than its retention keeps its artifacts"
    assert s3.get_object(Bucket=BUCKET, Key=keep)["Body"].read() == b"not a job's"
    deadline = time.monotonic() + 60
    while _keys(s3, second.output):
        assert time.monotonic() < deadline, "B's artifacts did not expire"
        time.sleep(0.2)
    assert s3.get_object(Bucket=BUCKET, Key=keep)["Body"].read() == b"not a job's", "only jobs' outputs expire"
