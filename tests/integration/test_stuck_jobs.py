"""A job cannot pin a worker, and a stuck job never runs twice at once (issue 12, finding 2).

Real processes: a Redis-compatible server, moto's S3 server, uvicorn (with the sweeper every
second) and one Celery worker with a 5 s lease and a 3 s cancel grace. First the attack: a
``target_modules`` regex that backtracks for minutes in Python's engine ends its job at once on
RE2, and patterns RE2 cannot take are refused at POST. Then a job whose pool child is alive but
cannot run (SIGSTOP): its lease is kept by the watchdog, so the sweeper does not hand it out
again; cancelled, the child is killed after the grace, the job ends cancelled with no
artifacts, and the same worker runs the next job."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import (
    FINISHED,
    output_keys,
    pool_children,
    s3_client,
    service_env,
    start_worker,
    stop_processes,
    submit_job,
    upload_models,
    wait_for_job,
)

BUCKET = "stuck-artifacts"
MODELS = "stuck-models"
QUEUE = "loftq-stuck-jobs"
DB = 12
LEASE = 5
GRACE = 3
SLOW = {"iters": 8, "svd": "exact"}  # seconds per MiniLM layer on a busy machine


@pytest.fixture(scope="module")
def stack(redis_url: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, minilm: Path, start_api, wait_until) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("stuck-jobs")
    files_root = work / "files"
    files_root.mkdir()
    env = service_env(
        redis_url.replace("/0", f"/{DB}"), QUEUE, BUCKET, s3_endpoint, work,
        allowed_file_roots=json.dumps([str(files_root)]), lease_seconds=str(LEASE), cancel_grace_seconds=str(GRACE),
        sweep_interval_seconds="1", max_attempts="3", torch_threads="1",
    )
    log = work / "worker.log"
    worker = start_worker(env, log, "stuck")
    api = None
    try:
        s3 = s3_client(s3_endpoint)
        for bucket in (BUCKET, MODELS):
            s3.create_bucket(Bucket=bucket)
        upload_models(s3, MODELS, {"tiny-bert": tiny_bert})
        shutil.copytree(minilm, files_root / "minilm")  # read in place: the layers start at once
        api, base = start_api(env, work / "api.log")
        wait_until(lambda: b"ready." in log.read_bytes(), "worker ready", [worker])
        with httpx.Client(base_url=base, timeout=30) as client:
            yield {"client": client, "s3": s3, "minilm": f"file://{files_root / 'minilm'}", "worker": worker}
    finally:
        stop_processes(api, [worker])


def _events(client: httpx.Client, job_id: str, kind: str) -> list[dict]:
    return [e for e in client.get(f"/v1/jobs/{job_id}/events").json()["events"] if e["type"] == kind]


def _alive(pid: int) -> bool:
    """Running, sleeping or stopped: not gone and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone before, or while, the file was read
        return False


def _the_next_job_succeeds(stack: dict) -> None:
    """The same worker process (the one the module started) takes and finishes a job."""
    assert stack["worker"].poll() is None
    client = stack["client"]
    job_id = submit_job(client, f"s3://{MODELS}/tiny-bert/", {"rank": 4})
    job = wait_for_job(client, job_id, timeout=120)
    assert job["state"] == "succeeded", job["error"]
    assert stack["worker"].poll() is None


def test_a_backtracking_regex_ends_its_job_at_once_and_unsupported_patterns_are_refused(stack: dict) -> None:
    client = stack["client"]
    started = time.monotonic()
    job_id = submit_job(client, stack["minilm"], {"rank": 4, "target_modules": "(.*.*)*x"})
    job = wait_for_job(client, job_id, timeout=90)  # Python's engine: minutes per module name
    print(f"target_modules '(.*.*)*x' on MiniLM: {job['state']} ({job['error']['code']}) after {time.monotonic() - started:.1f} s")
    assert job["state"] == "failed" and job["error"]["code"] == "no_target_modules", job["error"]
    assert _events(client, job_id, "redelivered") == []

    for pattern in (r"(?=.*query).*", r"(?!.*key).*", r"(query)\.\1", "(?<=self\\.)query"):
        response = client.post("/v1/jobs", json={"source": stack["minilm"], "options": {"target_modules": pattern}})
        assert response.status_code == 422, (pattern, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_request" and "target_modules" in error["message"], error
        assert "RE2" in error["message"] and "lookaround" in error["message"], error["message"]
    response = client.post("/v1/jobs", json={"source": stack["minilm"], "options": {"target_modules": "a" * 1001}})
    assert response.status_code == 422 and "at most 1000" in response.json()["error"]["message"]

    # The same worker goes on, and a regex RE2 takes selects what Python's engine would.
    job_id = submit_job(client, stack["minilm"], {"rank": 4, "target_modules": r".*\.attention\.self\.(query|value)"})
    job = wait_for_job(client, job_id, timeout=120)
    assert job["state"] == "succeeded", job["error"]
    assert job["summary"]["layers"] == 12  # 6 layers × query, value


def test_a_stuck_job_is_not_handed_out_again_and_is_killed_once_cancelled(stack: dict) -> None:
    client = stack["client"]
    job_id = submit_job(client, stack["minilm"], SLOW)
    wait_for_job(client, job_id, lambda j: j["state"] in FINISHED or j["progress"]["layers_done"] >= 1, 120)
    children = pool_children(stack["worker"])
    assert len(children) == 1, children
    child = children[0]
    os.kill(child, signal.SIGSTOP)  # alive, and unable to run a single bytecode: its lease keeper too
    try:
        time.sleep(4 * LEASE)  # on a lease renewed only by the child, the sweeper resends the job within LEASE + 1 s
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert _events(client, job_id, "redelivered") == [], "a stuck job was handed out again while alive"
        assert job["state"] == "running" and job["attempts"] == 1, job
        assert _alive(child)

        asked = time.monotonic()
        response = client.post(f"/v1/jobs/{job_id}/cancel")
        assert response.status_code == 202 and response.json()["state"] == "cancelling"
        while _alive(child) and time.monotonic() - asked < GRACE + 30:
            time.sleep(0.05)
        killed = time.monotonic() - asked
        assert not _alive(child), "the stuck attempt was not stopped"
        job = wait_for_job(client, job_id, timeout=60)
        ended = time.monotonic() - asked
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGCONT)
    print(f"stuck job: killed {killed:.1f} s after the cancel request (grace {GRACE} s), cancelled after {ended:.1f} s")
    assert GRACE - 0.5 <= killed <= GRACE + 20  # the grace, a watchdog tick, room for a busy machine
    assert job["state"] == "cancelled" and job["error"] is None, job
    assert job["attempts"] == 1
    assert [e["data"]["state"] for e in _events(client, job_id, "state")] == ["queued", "running", "cancelling", "cancelled"]
    assert _events(client, job_id, "redelivered") == []
    assert output_keys(stack["s3"], BUCKET, job) == []  # the partial artifacts are gone
    assert client.get(f"/v1/jobs/{job_id}/artifacts").status_code == 409
    _the_next_job_succeeds(stack)
