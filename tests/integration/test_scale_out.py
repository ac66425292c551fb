"""Scale-out with real parts: one distributed job's shards converted by TWO Celery worker
processes and merged, next to a normal job of the same source: a Redis-compatible server
process, moto's S3 server and uvicorn on loopback (like test_end_to_end.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import s3_client, service_env, start_worker, stop_processes

from service.store import JobStore

BUCKET = "scale-artifacts"
MODELS = "scale-models"
QUEUE = "loftq-scale-out"
WORKERS = ("w1", "w2")
TIMED = {"loftq_report.json", "loftq_layers.png", "manifest.json"}  # hold timings
MODEL_FILES = {"config.json", "model.safetensors.index.json", "loftq_init/adapter_config.json", "loftq_init/adapter_model.safetensors"}


@pytest.fixture(scope="module")
def stack(redis_url: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, wait_until, start_api) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("scale-out")
    redis_db = redis_url.rsplit("/", 1)[0] + "/2"
    env = service_env(redis_db, QUEUE, BUCKET, s3_endpoint, work, torch_threads="1", lease_seconds="5")
    s3 = s3_client(s3_endpoint)
    for bucket in (BUCKET, MODELS):
        s3.create_bucket(Bucket=bucket)
    for path in tiny_llama.iterdir():
        s3.upload_file(str(path), MODELS, f"llama/{path.name}")

    # Each worker with its own scratch space, as if on its own machine.
    workers = [start_worker({**env, "LOFTQ_WORK_DIR": str(work / name)}, work / f"{name}.log", name) for name in WORKERS]
    api = None
    try:
        api, base = start_api(env, work / "api.log")
        # Both workers consuming before anything is sent, so both can take parts.
        wait_until(lambda: all(b"ready." in (work / f"{n}.log").read_bytes() for n in WORKERS), "workers ready", workers)
        yield {"base": base, "store": JobStore.from_url(redis_db), "logs": work}
    finally:
        stop_processes(api, workers)


def _artifacts(client: httpx.Client, job_id: str) -> dict[str, str]:
    """path → sha256 of every artifact, each downloaded and checked against its listed sha256."""
    digests = {}
    for artifact in client.get(f"/v1/jobs/{job_id}/artifacts").json()["artifacts"]:
        data = httpx.get(artifact["url"], timeout=30).content
        assert hashlib.sha256(data).hexdigest() == artifact["sha256"], artifact["path"]
        digests[artifact["path"]] = artifact["sha256"]
    return digests


def test_a_distributed_job_runs_on_both_workers_and_equals_a_normal_job(stack: dict) -> None:
    """Submitted through the SDK, alone on the two idle workers: one plans, the other takes the
    first part at once, the first the second part. The normal job runs afterwards."""
    from loftq_client import LoftQClient

    source = f"s3://{MODELS}/llama/"
    options = {"rank": 4, "iters": 2}
    with LoftQClient(stack["base"]) as sdk:
        job = sdk.create_job(source, distributed=True, shards_per_part=3, **options)
        assert job.request.distributed is True
        assert sdk.wait(job.id, poll_interval=0.2, timeout=120, progress=False).state == "succeeded"
        normal = sdk.create_job(source, **options)
        assert sdk.wait(normal.id, poll_interval=0.2, timeout=120, progress=False).state == "succeeded"
    with httpx.Client(base_url=stack["base"], timeout=30) as client:
        distributed, normal = client.get(f"/v1/jobs/{job.id}").json(), client.get(f"/v1/jobs/{normal.id}").json()
        ours, theirs = _artifacts(client, distributed["id"]), _artifacts(client, normal["id"])
        assert ours.keys() == theirs.keys()
        shards = {p for p in ours if p.startswith("model-")}
        assert len(shards) == 5 and MODEL_FILES <= ours.keys()
        assert {p: h for p, h in ours.items() if p not in TIMED} == {p: h for p, h in theirs.items() if p not in TIMED}

        assert distributed["summary"]["layers"] == normal["summary"]["layers"] == 14
        assert distributed["summary"]["mean_error"] == pytest.approx(normal["summary"]["mean_error"])
        progress = distributed["progress"]
        assert progress["stage"] == "done" and progress["layers_done"] == progress["layers_total"] == 14
        assert progress["shards_done"] == progress["shards_total"] == 5 and progress["bytes_read"] > 0
        events = client.get(f"/v1/jobs/{distributed['id']}/events").json()["events"]
        assert sorted(e["data"]["index"] for e in events if e["type"] == "layer") == list(range(1, 15))
        assert [e["data"]["state"] for e in events if e["type"] == "state"] == ["queued", "running", "succeeded"]

    store = stack["store"]
    assert [len(shards) for shards in store.parts(distributed["id"]).values()] == [3, 2]
    assert store.parts(normal["id"]) == {}
    workers = {record["worker"].split("@")[0] for record in store.parts_done(distributed["id"]).values()}
    assert workers == set(WORKERS), workers  # the parts really ran on both workers
    logs = {name: (stack["logs"] / f"{name}.log").read_text() for name in WORKERS}
    assert all("loftq.run_part" in log for log in logs.values())
    assert not any("Task loftq.merge_job" in log for log in logs.values())  # merged by the last part, in its process


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"calibration_data": f"s3://{MODELS}/calibration/wiki.txt", "options": {"objective": "activation"}}, "calibration_data"),
        ({"options": {"objective": "activation-diag"}}, "objective"),
        ({"options": {"calibration": {"evaluate": True}}}, "evaluate"),
    ],
)
def test_distributed_calibrated_jobs_are_422(stack: dict, extra: dict, needle: str) -> None:
    body = {"source": f"s3://{MODELS}/llama/", "distributed": True, **extra}
    response = httpx.post(f"{stack['base']}/v1/jobs", json=body, timeout=30)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and "distributed" in error["message"] and needle in error["message"]


def test_sdk_gets_the_422_and_openapi_describes_the_option(stack: dict) -> None:
    from loftq_client import ApiError, LoftQClient

    with LoftQClient(stack["base"]) as client:
        with pytest.raises(ApiError) as info:
            client.create_job(f"s3://{MODELS}/llama/", distributed=True, objective="activation")
    assert info.value.status == 422 and info.value.code == "invalid_request"
    schema = httpx.get(f"{stack['base']}/openapi.json", timeout=30).json()["components"]["schemas"]["JobCreate"]
    assert "Spread the conversion over several workers" in schema["properties"]["distributed"]["description"]
