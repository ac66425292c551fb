"""The embedded default, started exactly as the README says, and the README's curl session
run against it, so the documentation cannot rot."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.redis_server import free_port

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_block(marker: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- {marker}.*?-->\s*```bash\n(.*?)```", text, re.S)
    assert match, f"README has no {marker} block"
    return match.group(1)


def _serve_command() -> list[str]:
    """The README's first command, minus the install step that CI has already run."""
    first = README.read_text().split("```bash\n", 1)[1].splitlines()[0]
    command = first.split("&&")[-1].split()
    assert command[:2] == ["loftq-service", "serve"], first
    executable = shutil.which(command[0]) or str(Path(sys.executable).with_name(command[0]))
    return [executable, *command[1:]]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("embedded")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOFTQ_")}
    process = subprocess.Popen(
        [*_serve_command(), "--port", str(port), "--device", "cpu"],
        cwd=workdir,
        env={**env, "HF_HUB_OFFLINE": "1"},
        stdout=open(workdir / "serve.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("loftq-service serve did not become ready:\n" + (workdir / "serve.log").read_text()[-3000:])
        time.sleep(0.3)
    yield base, workdir
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
    # 0, not -SIGTERM: serve ran its shutdown, which stops the worker and the job store it started.
    assert process.wait() == 0, (workdir / "serve.log").read_text()[-3000:]
    assert not list((workdir / "loftq-data" / "work").glob("*")), "scratch space is cleaned after jobs"


def test_readme_curl_session_converts_and_downloads(embedded, minilm: Path) -> None:
    base, workdir = embedded
    script = _readme_block("curl-session")
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=workdir,
        env={**os.environ, "API": base, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = workdir / "minilm-loftq"
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["files"]:
        assert hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
    report = json.loads((out / "loftq_report.json").read_text())
    assert report["summary"]["layers"] == 37 and report["summary"]["mean_error"] < report["summary"]["mean_error_quant"]


def test_embedded_refuses_files_outside_its_root_and_serves_only_manifest_files(embedded) -> None:
    base, _ = embedded
    response = httpx.post(f"{base}/v1/jobs", json={"source": "file:///etc"}, timeout=30)
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_source"
    jobs = httpx.get(f"{base}/v1/jobs", params={"state": "succeeded"}, timeout=30).json()["jobs"]
    assert jobs, "the curl session's job is listed"
    job_id = jobs[0]["id"]
    for path in ("../../../etc/passwd", "nope.bin"):
        response = httpx.get(f"{base}/v1/jobs/{job_id}/artifacts/files/{path}", timeout=30)
        assert response.status_code == 404


def test_embedded_data_directory_is_never_a_source(embedded) -> None:
    """The data directory lies under the default file:// root (the directory serve started in),
    and holds every job's artifacts and the job store's files: naming it, anything in it, or a
    directory that contains it, as a source or as calibration text is refused."""
    base, workdir = embedded
    data = workdir / "loftq-data"
    jobs = httpx.get(f"{base}/v1/jobs", params={"state": "succeeded"}, timeout=30).json()["jobs"]
    assert jobs, "the curl session's job is listed"
    output = data / "artifacts" / jobs[0]["output"]
    assert (output / "manifest.json").is_file()
    link = workdir / "innocent-looking"
    link.symlink_to(data / "artifacts", target_is_directory=True)
    for source in (output, data / "artifacts", data / "redis", data, workdir, link):
        response = httpx.post(f"{base}/v1/jobs", json={"source": f"file://{source}"}, timeout=30)
        assert response.status_code == 422, (source, response.text)
        assert response.json()["error"]["code"] == "source_not_allowed", response.text
    calibrated = {"source": f"file://{workdir}/minilm", "options": {"objective": "activation"}}
    for text in (data / "redis", output / "loftq_report.json"):
        response = httpx.post(f"{base}/v1/jobs", json={**calibrated, "calibration_data": f"file://{text}"}, timeout=30)
        assert response.status_code == 422 and response.json()["error"]["code"] == "source_not_allowed", response.text


def test_embedded_upload_converts_without_a_shared_directory(embedded, tiny_bert: Path) -> None:
    """A model outside the allowed roots is uploaded through the API (local storage) and converted."""
    from loftq_client import LoftQClient

    base, _ = embedded
    with LoftQClient(base) as client:
        upload = client.upload_model(tiny_bert)
        assert upload.state == "complete" and upload.source == f"upload://{upload.id}"
        job = client.wait(client.create_job(upload.source, rank=8).id, timeout=300)
        assert job.state == "succeeded", job.error
        files = {artifact.path for artifact in client.artifacts(job.id)}
    assert {"config.json", "model.safetensors", "manifest.json"} <= files


def test_embedded_refuses_to_bind_beyond_loopback() -> None:
    result = subprocess.run([*_serve_command(), "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "loopback" in result.stderr
