"""The service end to end with real parts: uvicorn on loopback, a real Redis-compatible
server process, a real Celery worker process and moto's S3 server."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import s3_client, service_env, start_worker, stop_processes, upload_models

BUCKET = "artifacts"
MODELS = "models"


@pytest.fixture(scope="module")
def stack(
    redis_url: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, tiny_llama: Path, start_api
) -> Iterator[dict]:
    """API + worker processes configured like production (S3 storage), models uploaded to S3."""
    work = tmp_path_factory.mktemp("service")
    files_root = work / "files"
    files_root.mkdir()
    env = service_env(
        redis_url.replace("/0", "/1"), "loftq-e2e", BUCKET, s3_endpoint, work, allowed_file_roots=json.dumps([str(files_root)])
    )
    s3 = s3_client(s3_endpoint)
    for bucket in (BUCKET, MODELS):
        s3.create_bucket(Bucket=bucket)
    upload_models(s3, MODELS, {"tiny-bert": tiny_bert, "tiny-llama": tiny_llama})

    worker = start_worker(env, work / "worker.log", "e2e")
    api = None
    try:
        api, base = start_api(env, work / "api.log")
        yield {"base": base, "s3": s3, "files_root": files_root, "logs": work}
    finally:
        stop_processes(api, [worker])


def _poll(client: httpx.Client, job_id: str, *, until: set[str], timeout: float = 240) -> tuple[dict, list[dict]]:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        seen.append(job)
        if job["state"] in until:
            return job, seen
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} still {seen[-1]['state']}")


def test_raw_http_job_from_s3_succeeds_and_artifacts_load(stack: dict, tmp_path: Path, tiny_bert: Path) -> None:
    with httpx.Client(base_url=stack["base"], timeout=30) as client:
        response = client.post("/v1/jobs", json={"source": f"s3://{MODELS}/tiny-bert/", "options": {"rank": 8, "lora_alpha": 16, "iters": 2}})
        assert response.status_code == 202, response.text
        job = response.json()
        assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
        assert job["state"] == "queued"
        job, seen = _poll(client, job["id"], until={"succeeded", "failed"})
        assert job["state"] == "succeeded", job["error"]
        assert job["started_at"] and job["finished_at"] and job["summary"]["layers"] == 13
        assert job["progress"]["layers_done"] == job["progress"]["layers_total"] == 13
        assert job["progress"]["bytes_read"] == (tiny_bert / "model.safetensors").stat().st_size
        assert job["progress"]["bytes_written"] > 0
        events = client.get(f"/v1/jobs/{job['id']}/events").json()["events"]
        layer_events = [e for e in events if e["type"] == "layer"]
        assert [e["data"]["index"] for e in layer_events] == list(range(1, 14))
        states = [e["data"]["state"] for e in events if e["type"] == "state"]
        assert states == ["queued", "running", "succeeded"]

        listing = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["artifacts"]
        paths = {a["path"] for a in listing}
        assert {"model.safetensors", "config.json", "loftq_init/adapter_config.json", "loftq_init/adapter_model.safetensors", "manifest.json"} <= paths
        out = tmp_path / "download"
        for artifact in listing:
            assert artifact["url"].startswith(stack["s3"].meta.endpoint_url)  # presigned S3 URL
            data = httpx.get(artifact["url"], timeout=30).content
            assert len(data) == artifact["size"] and hashlib.sha256(data).hexdigest() == artifact["sha256"]
            (out / artifact["path"]).parent.mkdir(parents=True, exist_ok=True)
            (out / artifact["path"]).write_bytes(data)

    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = peft.PeftModel.from_pretrained(transformers.AutoModel.from_pretrained(str(out)), str(out), subfolder="loftq_init")
    assert sum(1 for n, _ in model.named_modules() if n.endswith("lora_A")) == 13


def test_sdk_job_from_s3(stack: dict, tmp_path: Path) -> None:
    from loftq_client import LoftQClient

    with LoftQClient(stack["base"]) as client:
        job = client.create_job(f"s3://{MODELS}/tiny-llama/", rank=4, iters=1, metadata={"team": "e2e"})
        done = client.wait(job.id, poll_interval=0.2, timeout=240, progress=False)
        assert done.state == "succeeded", done.error
        assert client.get_job(job.id).model_dump()["request"]["metadata"] == {"team": "e2e"}
        files = client.download(job.id, tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert any(p.name == "adapter_model.safetensors" for p in files)


def test_listing_pagination_and_filters(stack: dict) -> None:
    with httpx.Client(base_url=stack["base"], timeout=30) as client:
        ids = [client.post("/v1/jobs", json={"source": f"s3://{MODELS}/nothing-here-{i}/"}).json()["id"] for i in range(3)]
        for job_id in ids:
            _poll(client, job_id, until={"failed", "succeeded"})
        page = client.get("/v1/jobs", params={"limit": 2}).json()
        assert len(page["jobs"]) == 2 and page["has_more"]
        assert [j["id"] for j in page["jobs"]] == ids[::-1][:2]  # newest first
        rest = client.get("/v1/jobs", params={"limit": 2, "after": page["next_after"]}).json()
        assert rest["jobs"][0]["id"] == ids[0]
        failed = client.get("/v1/jobs", params={"state": "failed", "limit": 100}).json()["jobs"]
        assert set(ids) <= {j["id"] for j in failed}


def test_missing_source_fails_with_a_code(stack: dict) -> None:
    with httpx.Client(base_url=stack["base"], timeout=30) as client:
        job_id = client.post("/v1/jobs", json={"source": f"s3://{MODELS}/does-not-exist/"}).json()["id"]
        job, _ = _poll(client, job_id, until={"failed", "succeeded"})
    assert job["state"] == "failed"
    assert job["error"]["code"] == "source_not_found"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"source": "s3://models/x/", "options": {"rank": 0}}, "rank"),
        ({"source": "s3://models/x/", "options": {"quant": "q7"}}, "quant"),
        ({"source": "s3://models/x/", "options": {"bogus": 1}}, "bogus"),
        ({"options": {}}, "source"),
    ],
)
def test_invalid_options_are_422_naming_the_field(stack: dict, body: dict, field: str) -> None:
    response = httpx.post(f"{stack['base']}/v1/jobs", json=body, timeout=30)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and field in error["message"]


def test_bad_sources_are_refused_up_front(stack: dict) -> None:
    for source in ("ftp://example/x", "file:///etc", "s3://", "file:///tmp/../etc"):
        response = httpx.post(f"{stack['base']}/v1/jobs", json={"source": source}, timeout=30)
        assert response.status_code == 422, source
        assert response.json()["error"]["code"] == "invalid_source"


def test_calibrated_job_with_evaluation_from_s3(stack: dict, calib_llama: Path, calibration_text: Path) -> None:
    """objective=activation with held-out evaluation: the calibration text comes from S3, the
    report carries the calibration and the evaluation, and the per-layer plot is an artifact."""
    s3 = stack["s3"]
    for path in calib_llama.iterdir():
        s3.upload_file(str(path), MODELS, f"calib-llama/{path.name}")
    s3.upload_file(str(calibration_text), MODELS, "calibration/wiki.txt")
    body = {
        "source": f"s3://{MODELS}/calib-llama/",
        "calibration_data": f"s3://{MODELS}/calibration/wiki.txt",
        "options": {"rank": 4, "objective": "activation",
                    "calibration": {"samples": 8, "seq_len": 32, "eval_samples": 4, "evaluate": True}},
    }
    with httpx.Client(base_url=stack["base"], timeout=30) as client:
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        assert response.json()["request"]["calibration_data"] == body["calibration_data"]
        job, _ = _poll(client, response.json()["id"], until={"succeeded", "failed"})
        assert job["state"] == "succeeded", job["error"]
        layers = job["summary"]["layers"]
        assert layers == 14  # 2 blocks × 7 linear layers, the head excluded
        progress = job["progress"]
        assert progress["stage"] == "done" and progress["blocks_done"] == progress["blocks_total"] == 2
        assert progress["layers_done"] == progress["layers_total"] == layers

        summary = job["summary"]
        assert summary["objective"] == "activation"
        assert summary["mean_output_error"] < summary["mean_output_error_quant"]
        assert summary["calibration"]["sequences"] == 8 and summary["calibration"]["seq_len"] == 32
        evaluation = summary["evaluation"]
        assert evaluation["sequences"] == 4 and evaluation["tokens"] > 0
        for key in ("perplexity_full_precision", "perplexity_quantized", "perplexity_initialised", "cosine_initialised"):
            assert evaluation[key] is not None and evaluation[key] > 0, key

        events = client.get(f"/v1/jobs/{job['id']}/events").json()["events"]
        layer_events = [e["data"] for e in events if e["type"] == "layer"]
        assert len(layer_events) == layers and {e["block"] for e in layer_events} == {0, 1}
        assert all(e["objective"] == "activation" for e in layer_events)

        listing = {a["path"]: a for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["artifacts"]}
        assert {"loftq_report.json", "loftq_layers.png", "manifest.json", "tokenizer.json"} <= set(listing)
        png = httpx.get(listing["loftq_layers.png"]["url"], timeout=30).content
        assert png.startswith(b"\x89PNG") and hashlib.sha256(png).hexdigest() == listing["loftq_layers.png"]["sha256"]
        report = httpx.get(listing["loftq_report.json"]["url"], timeout=30).json()
    assert report["calibration"]["sequences"] == 8 and report["calibration"]["sha256"] == summary["calibration"]["sha256"]
    assert report["calibration"]["sha256"] == hashlib.sha256(calibration_text.read_bytes()).hexdigest()
    assert report["summary"]["evaluation"]["perplexity_initialised"] == pytest.approx(evaluation["perplexity_initialised"])
    assert report["options"]["objective"] == "activation"


def test_calibration_requests_are_checked_up_front(stack: dict) -> None:
    source = f"s3://{MODELS}/tiny-llama/"
    cases = [
        ({"options": {"objective": "activation"}}, "invalid_request", "add calibration_data"),
        ({"options": {"calibration": {"evaluate": True}}}, "invalid_request", "add calibration_data"),
        ({"calibration_data": "hf://org/dataset"}, "invalid_calibration_data", "calibration_data"),
        ({"calibration_data": "file:///etc/passwd"}, "invalid_calibration_data", "outside the allowed file roots"),
    ]
    for body, code, needle in cases:
        response = httpx.post(f"{stack['base']}/v1/jobs", json={"source": source, **body}, timeout=30)
        assert response.status_code == 422, body
        error = response.json()["error"]
        assert error["code"] == code and needle in error["message"], error


def test_missing_calibration_data_fails_the_job_with_a_code(stack: dict) -> None:
    body = {"source": f"s3://{MODELS}/tiny-llama/", "calibration_data": f"s3://{MODELS}/no-calibration-here/",
            "options": {"objective": "activation"}}
    with httpx.Client(base_url=stack["base"], timeout=30) as client:
        job, _ = _poll(client, client.post("/v1/jobs", json=body).json()["id"], until={"failed", "succeeded"})
    assert job["state"] == "failed" and job["error"]["code"] == "calibration_data_not_found"


def test_unknown_job_is_404(stack: dict) -> None:
    response = httpx.get(f"{stack['base']}/v1/jobs/job_nope", timeout=30)
    assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found"


def test_cancel_a_running_job_frees_the_worker(stack: dict, minilm: Path) -> None:
    root = stack["files_root"]
    target = root / "minilm"
    if not target.exists():
        shutil.copytree(minilm, target)
    with httpx.Client(base_url=stack["base"], timeout=30) as client:
        slow = client.post("/v1/jobs", json={"source": f"file://{target}", "options": {"iters": 40, "svd": "exact"}}).json()
        job, _ = _poll(client, slow["id"], until={"running"})
        deadline = time.monotonic() + 120
        while client.get(f"/v1/jobs/{slow['id']}").json()["progress"]["layers_done"] < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        first = client.post(f"/v1/jobs/{slow['id']}/cancel")
        second = client.post(f"/v1/jobs/{slow['id']}/cancel")
        assert first.status_code == second.status_code == 202
        job, _ = _poll(client, slow["id"], until={"cancelled", "succeeded", "failed"}, timeout=120)
        assert job["state"] == "cancelled"
        assert job["progress"]["layers_done"] < job["progress"]["layers_total"]
        assert client.get(f"/v1/jobs/{slow['id']}/artifacts").status_code == 409
        after = client.post(f"/v1/jobs/{slow['id']}/cancel").json()
        assert after["state"] == "cancelled"  # a no-op once finished
        quick = client.post("/v1/jobs", json={"source": f"s3://{MODELS}/tiny-bert/", "options": {"rank": 4}}).json()
        job, _ = _poll(client, quick["id"], until={"succeeded", "failed"})
        assert job["state"] == "succeeded"


def test_events_as_server_sent_events(stack: dict) -> None:
    with httpx.Client(base_url=stack["base"], timeout=60) as client:
        job_id = client.post("/v1/jobs", json={"source": f"s3://{MODELS}/tiny-bert/", "options": {"rank": 4}}).json()["id"]
        frames = []
        with client.stream("GET", f"/v1/jobs/{job_id}/events/stream") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("data: "):
                    frames.append(json.loads(line[6:]))
        assert frames[-1]["type"] == "state" and frames[-1]["data"]["state"] == "succeeded"
        assert sum(1 for f in frames if f["type"] == "layer") == 13
        plain = client.get(f"/v1/jobs/{job_id}/events", params={"after": frames[0]["id"]}).json()["events"]
        assert [e["id"] for e in plain] == [f["id"] for f in frames[1:]]


def test_health_and_metrics(stack: dict) -> None:
    assert httpx.get(f"{stack['base']}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{stack['base']}/readyz").json()
    assert ready["status"] == "ready" and all(ready["checks"].values())
    text = httpx.get(f"{stack['base']}/metrics").text
    assert 'loftq_jobs{state="succeeded"}' in text and "loftq_queue_depth" in text
    layer_count = next(line for line in text.splitlines() if line.startswith("loftq_layer_duration_seconds_count"))
    assert float(layer_count.split()[-1]) >= 13
    assert "loftq_job_duration_seconds_bucket" in text
    assert httpx.get(f"{stack['base']}/openapi.json").json()["info"]["title"] == "loftq-service"


def test_loftq_jobs_command_against_the_real_server(stack: dict, tmp_path: Path) -> None:
    def jobs(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "loftq_client.cli", "--url", stack["base"], *args],
            capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
        )

    submitted = jobs("submit", f"s3://{MODELS}/tiny-bert/", "--rank", "4", "--meta", "who=cli", "--wait")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[0]
    assert job_id.startswith("job_")
    status = jobs("status", job_id, "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["state"] == "succeeded"
    logs = jobs("logs", job_id)
    assert logs.returncode == 0 and "encoder.layer.0.attention.self.query" in logs.stdout
    downloaded = jobs("download", job_id, str(tmp_path))
    assert downloaded.returncode == 0, downloaded.stderr
    assert (tmp_path / "loftq_init" / "adapter_model.safetensors").is_file()
    missing = jobs("status", "job_missing")
    assert missing.returncode == 2 and "[job_not_found]" in missing.stderr


@pytest.mark.parametrize("output", ["/", "../x", "a/../b", "jobs/", "jobs/job_0001/", "a//b"])
def test_output_prefixes_that_could_touch_other_jobs_are_refused(stack: dict, output: str) -> None:
    response = httpx.post(f"{stack['base']}/v1/jobs", json={"source": f"s3://{MODELS}/tiny-bert/", "output": output}, timeout=30)
    assert response.status_code == 422, output
    assert "output" in response.json()["error"]["message"]


def test_a_malformed_event_cursor_is_422(stack: dict) -> None:
    with httpx.Client(base_url=stack["base"], timeout=30) as client:
        job_id = client.post("/v1/jobs", json={"source": f"s3://{MODELS}/missing/"}).json()["id"]
        for path in (f"/v1/jobs/{job_id}/events", f"/v1/jobs/{job_id}/events/stream"):
            response = client.get(path, params={"after": "garbage"})
            assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"
