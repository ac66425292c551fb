"""Hostile config.json files and options, sent through the real service: a Redis-compatible
server process, moto's S3 server, uvicorn and one Celery worker process (as in
test_worker_faults.py), on their own queue and Redis database.

A config.json that declares 60 000 layers over two stored ones, one whose positions would make
the calibrated model compute 32 GiB of buffers, and one whose ``architectures`` names
``Trainer`` each end the job with the engine's code soon after it starts, and the worker takes
the next job. Devices and seeds the engine cannot use are 422 at POST, before anything is
queued. The worker runs with a per-job memory limit, so that were the attacks to allocate what
config.json asks for, they would fail ``out_of_memory`` instead of exhausting this machine."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import output_keys, s3_client, service_env, start_worker, stop_processes, submit_job, upload_models, wait_for_job

DB = 14
QUEUE = "loftq-hostile-configs"
BUCKET = "hostile-configs-artifacts"
MODELS = "hostile-configs-models"
MEMORY_ALLOWANCE = 3 << 30
"""Address space one job may add to the pool child: ample for these tiny models, a tenth of
what the buffer attack asked for."""
REFUSED_WITHIN = 120
"""Seconds from submission to the failed job. These configs are refused while the conversion is
planned (about a second on an idle machine); 120 leaves room for a busy one. Before the fix the
60 000 layers took minutes and succeeded, and the buffers ran out of memory."""


def _hostile(model: Path, into: Path, **config_changes: object) -> Path:
    path = Path(shutil.copytree(model, into))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **config_changes}))
    return path


@pytest.fixture(scope="module")
def stack(
    redis_url: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, tiny_bert: Path,
    calib_bert: Path, calibration_text: Path, start_api, wait_until,
) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("hostile-configs")
    env = service_env(
        redis_url.replace("/0", f"/{DB}"), QUEUE, BUCKET, s3_endpoint, work,
        worker_memory_limit_bytes=str(MEMORY_ALLOWANCE), max_attempts="1",
    ) | {"MALLOC_ARENA_MAX": "2"}
    log = work / "worker.log"
    worker = start_worker(env, log, "hostile-configs")
    api = None
    try:
        s3 = s3_client(s3_endpoint)
        for bucket in (BUCKET, MODELS):
            s3.create_bucket(Bucket=bucket)
        models = work / "models"
        upload_models(s3, MODELS, {
            "tiny-bert": tiny_bert,
            "llama-60000-layers": _hostile(tiny_llama, models / "llama-60000-layers", num_hidden_layers=60000),
            "bert-2-31-positions": _hostile(calib_bert, models / "bert-2-31-positions", max_position_embeddings=2**31),
            "bert-trainer": _hostile(tiny_bert, models / "bert-trainer", architectures=["Trainer"]),
        })
        s3.upload_file(str(calibration_text), MODELS, "calibration/text.txt")
        api, base = start_api(env, work / "api.log")
        wait_until(lambda: b"ready." in log.read_bytes(), "worker ready", [worker])
        with httpx.Client(base_url=base, timeout=30) as client:
            yield {"client": client, "s3": s3, "worker": worker}
    finally:
        stop_processes(api, [worker])


def _run(client: httpx.Client, body: dict, timeout: float = 300) -> tuple[dict, float]:
    """Submit, wait for the end; the job and the seconds from submission to its end."""
    started = time.monotonic()
    job = wait_for_job(client, submit_job(client, **body), timeout=timeout)
    return job, time.monotonic() - started


def _refused_by_the_engine(stack: dict, body: dict, code: str, *needles: str) -> dict:
    """The job fails with ``code`` within REFUSED_WITHIN, converts nothing and publishes no
    manifest; then the same worker converts a good model."""
    job, seconds = _run(stack["client"], body)
    print(f"{body['source']}: {job['state']} ({(job['error'] or {}).get('code')}) after {seconds:.1f} s")
    assert job["state"] == "failed", job
    assert job["error"]["code"] == code, job["error"]
    assert all(needle in job["error"]["message"] for needle in needles), job["error"]
    assert job["progress"]["layers_done"] == 0
    assert seconds < REFUSED_WITHIN
    assert "manifest.json" not in [key.rsplit("/", 1)[-1] for key in output_keys(stack["s3"], BUCKET, job)]

    good, _ = _run(stack["client"], {"source": f"s3://{MODELS}/tiny-bert/", "options": {"rank": 4}})
    assert good["state"] == "succeeded", good["error"]
    assert stack["worker"].poll() is None
    return job


def test_60000_declared_layers_fail_corrupt_checkpoint_at_once(stack: dict) -> None:
    body = {"source": f"s3://{MODELS}/llama-60000-layers/", "options": {"rank": 4}}
    _refused_by_the_engine(stack, body, "corrupt_checkpoint", "config.json", "num_hidden_layers=60000", "tensors")


def test_position_buffers_of_32_gib_fail_a_calibrated_job_corrupt_checkpoint(stack: dict) -> None:
    body = {
        "source": f"s3://{MODELS}/bert-2-31-positions/",
        "calibration_data": f"s3://{MODELS}/calibration/text.txt",
        "options": {"rank": 4, "objective": "activation", "calibration": {"samples": 8, "seq_len": 32}},
    }
    _refused_by_the_engine(stack, body, "corrupt_checkpoint", "max_position_embeddings=2147483648", "32.0 GiB")


def test_architectures_naming_trainer_is_never_built(stack: dict) -> None:
    """Before, the worker called Trainer(config), which failed on the config deep inside."""
    body = {"source": f"s3://{MODELS}/bert-trainer/", "options": {"rank": 4}}
    _refused_by_the_engine(stack, body, "unsupported_architecture", "'Trainer'", "not a transformers model class")


@pytest.mark.parametrize(("options", "field"), [
    ({"device": "meta"}, "options.device"),
    ({"device": "mps"}, "options.device"),
    ({"device": "cuda:first"}, "options.device"),
    ({"seed": 2**70}, "options.seed"),
    ({"seed": -1}, "options.seed"),
    ({"calibration": {"seed": 2**70}}, "options.calibration.seed"),
])
def test_devices_and_seeds_the_engine_cannot_use_are_422_at_post(stack: dict, options: dict, field: str) -> None:
    """They used to be queued and fail inside the worker as internal_error."""
    client = stack["client"]
    before = [job["id"] for job in client.get("/v1/jobs", params={"limit": 100}).json()["jobs"]]
    response = client.post("/v1/jobs", json={"source": f"s3://{MODELS}/tiny-bert/", "options": options})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and field in error["message"], error
    assert [job["id"] for job in client.get("/v1/jobs", params={"limit": 100}).json()["jobs"]] == before  # nothing queued
