"""Retention against the real service: finished jobs expire after LOFTQ_JOB_RETENTION_SECONDS
(3 s here) with their artifacts, which the API's sweeper removes; nothing of another tenant, and
nothing that belongs to no expired job, is touched (Redis-compatible server, moto's S3 server,
uvicorn with two API keys). No worker runs: the jobs end cancelled while queued, and what a
worker would have written is put under their output prefixes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import s3_client, service_env, stop_processes

from loftq_client import ApiError, LoftQClient
from service.tenants import hash_key

BUCKET = "retention-artifacts"
KEY_A, KEY_B = "lq_retention-a", "lq_retention-b"
RETENTION = 3


@pytest.fixture(scope="module")
def stack(redis_url: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory, start_api) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("retention")
    env = service_env(
        redis_url.replace("/0", "/13"), "loftq-retention", BUCKET, s3_endpoint, work,
        api_keys=f"team-a:{hash_key(KEY_A)},team-b:{hash_key(KEY_B)}",
        tenant_sources=json.dumps({"*": ["s3://retention-models/"]}),
        job_retention_seconds=str(RETENTION), sweep_interval_seconds="1",
    )
    s3 = s3_client(s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    api, base = start_api(env, work / "api.log")
    try:
        with LoftQClient(base, api_key=KEY_A) as a, LoftQClient(base, api_key=KEY_B) as b:
            yield {"a": a, "b": b, "s3": s3}
    finally:
        stop_processes(api, [])


def _keys(s3, prefix: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


def _ended_with_artifacts(client: LoftQClient, s3) -> object:
    """A job of ``client``'s tenant that ended (cancelled while queued: no worker runs here),
    with files under its output prefix as a worker would have left them."""
    job = client.create_job("s3://retention-models/bert/", rank=4)
    assert client.cancel_job(job.id).state == "cancelled"
    for name in ("manifest.json", "model.safetensors"):
        s3.put_object(Bucket=BUCKET, Key=f"{job.output}{name}", Body=b"x")
    return job


def test_finished_jobs_expire_with_their_artifacts_and_nothing_else_goes(stack: dict) -> None:
    a, b, s3 = stack["a"], stack["b"], stack["s3"]
    keep = "tenants/team-b/notes/keep.txt"  # in B's area, but no job's output
    s3.put_object(Bucket=BUCKET, Key=keep, Body=b"not a job's")
    first = _ended_with_artifacts(a, s3)
    time.sleep(RETENTION)
    second = _ended_with_artifacts(b, s3)  # ends later: expires later
    deadline = time.monotonic() + 60
    while _keys(s3, first.output):
        assert time.monotonic() < deadline, "the expired job's artifacts stay"
        time.sleep(0.1)
    with pytest.raises(ApiError) as gone:
        a.get_job(first.id)
    assert gone.value.code == "job_not_found"
    assert _keys(s3, second.output), "a job younger than its retention keeps its artifacts"
    assert b.get_job(second.id).state == "cancelled"
    while _keys(s3, second.output):
        assert time.monotonic() < deadline, "B's artifacts did not expire"
        time.sleep(0.1)
    assert s3.get_object(Bucket=BUCKET, Key=keep)["Body"].read() == b"not a job's", "only jobs' outputs expire"
