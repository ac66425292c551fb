"""The jobs API client and the ``loftq-jobs`` CLI against an in-process fake of the HTTP contract
(``httpx.MockTransport``); no server, no network, no torch in the client."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from loftq_client import ApiError, ChecksumMismatch, LoftQClient, UnsafeArtifactPath, parse_sse
from loftq_client import cli as cli_module
from loftq_client.client import progress_description
from loftq_client.models import Job, WebhookDelivery

BASE = "http://api.test"
S3 = "https://s3.example.com"
KEY = "sekret"
T0 = "2024-05-01T12:00:00Z"


def _err(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}})


class FakeServer:
    """A dict of jobs behind the documented routes. ``script[id]`` holds patches applied one per
    ``GET /v1/jobs/{id}`` (or the string ``"503"`` to answer one poll with an error, or ``"gone"``
    to remove the job, as its worker does once a job deleted while running has stopped)."""

    def __init__(self, api_key: str | None = KEY) -> None:
        self.api_key = api_key
        self.jobs: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []  # creation order
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.files: dict[str, dict[str, bytes]] = {}  # job -> path -> content
        self.absolute: set[str] = set()  # paths served through a presigned S3 URL
        self.corrupt: set[str] = set()  # paths served with one byte flipped
        self.sse: dict[str, bytes] = {}
        self.script: dict[str, list[Any]] = {}
        self.idempotency: dict[str, str] = {}
        self.deliveries: dict[str, list[dict[str, Any]]] = {}
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self.handle)

    def client(self, api_key: str | None = KEY, **kwargs: Any) -> LoftQClient:
        return LoftQClient(BASE + "/", api_key, transport=self.transport, **kwargs)

    # -- helpers for tests --

    def add_job(self, state: str = "queued", source: str = "s3://models/tiny/", **fields: Any) -> dict[str, Any]:
        job_id = f"job{len(self.order) + 1:03d}"
        job = {
            "id": job_id,
            "state": state,
            "created_at": T0,
            "started_at": None,
            "finished_at": None,
            "request": {"source": source, "output": None, "options": {"rank": 16}, "metadata": {}},
            "output": f"jobs/{job_id}/",
            "progress": {"stage": "queued", "layers_done": 0, "layers_total": 0, "shards_done": 0,
                         "shards_total": 0, "bytes_read": 0, "bytes_written": 0, "eta_seconds": None},
            "error": None,
            "summary": None,
            "attempts": 0,
            "tenant": "default",
            "server_only_field": {"added": "later"},  # newer servers may add fields
        }
        job.update(fields)
        self.jobs[job_id] = job
        self.order.append(job_id)
        self.events[job_id] = []
        return job

    # -- routes --

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        url = request.url
        if url.host == "s3.example.com":
            return self._s3(request)
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _err(401, "unauthorized", "missing or wrong API key")
        path, method = url.path, request.method
        if path == "/v1/jobs" and method == "POST":
            return self._create(request)
        if path == "/v1/jobs" and method == "GET":
            return self._list(request)
        m = re.fullmatch(r"/v1/jobs/([^/]+)(/.*)?", path)
        if not m:
            return httpx.Response(404, text="no such route")
        job_id, rest = m.group(1), m.group(2) or ""
        if job_id not in self.jobs:
            return _err(404, "job_not_found", f"no job {job_id}")
        job = self.jobs[job_id]
        if rest == "" and method == "GET":
            steps = self.script.get(job_id)
            if steps:
                step = steps.pop(0)
                if step == "503":
                    return _err(503, "unavailable", "redis is restarting")
                if step == "gone":
                    del self.jobs[job_id]
                    return _err(404, "job_not_found", f"no job {job_id}")
                _deep_update(job, step)
            return httpx.Response(200, json=job)
        if rest == "/cancel" and method == "POST":
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return _err(409, "invalid_transition", f"job is {job['state']}")
            job["state"] = "cancelled" if job["state"] == "queued" else "cancelling"
            return httpx.Response(202, json=job)
        if rest == "" and method == "DELETE":
            if job["state"] in ("running", "cancelling"):  # removed once its worker stops
                job["state"] = "cancelling"
                return httpx.Response(202, json=job)
            del self.jobs[job_id]
            return httpx.Response(204)
        if rest == "/webhooks" and method == "GET":
            return httpx.Response(200, json={"job_id": job_id, "deliveries": self.deliveries.get(job_id, [])})
        if rest == "/events" and method == "GET":
            return self._events(job_id, request)
        if rest == "/events/stream" and method == "GET":
            body = self.sse.get(job_id, b"")
            chunks = [body[i : i + 7] for i in range(0, len(body), 7)]  # lines split across chunks
            return httpx.Response(200, headers={"Content-Type": "text/event-stream"}, content=iter(chunks))
        if rest == "/artifacts" and method == "GET":
            if job["state"] != "succeeded":
                return _err(409, "job_not_finished", f"job is {job['state']}")
            return httpx.Response(200, json={"job_id": job_id, "artifacts": [
                {"path": p, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                 "url": f"{S3}/bucket/jobs/{job_id}/{p}?X-Amz-Signature=abc" if p in self.absolute
                 else f"/v1/jobs/{job_id}/artifacts/files/{p}"}
                for p, data in self.files.get(job_id, {}).items()
            ]})
        if rest.startswith("/artifacts/files/") and method == "GET":
            return self._file(job_id, rest.removeprefix("/artifacts/files/"))
        return httpx.Response(405, text="method not allowed")

    def _create(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if not str(body.get("source", "")).startswith(("s3://", "file://", "hf://")):
            return _err(422, "invalid_source", f"unsupported source {body.get('source')!r}")
        key = request.headers.get("Idempotency-Key")
        if key and key in self.idempotency:
            job = self.jobs[self.idempotency[key]]
        else:
            job = self.add_job(source=body["source"])
            job["request"] = {"source": body["source"], "output": body.get("output"),
                              "options": body.get("options", {}), "metadata": body.get("metadata", {}),
                              "calibration_data": body.get("calibration_data"),
                              **{k: body[k] for k in ("distributed", "shards_per_part") if k in body},
                              "webhook_url": body.get("webhook_url"),
                              "webhook_events_filter": body.get("webhook_events_filter")}
            if key:
                self.idempotency[key] = job["id"]
            if body.get("webhook_url"):  # the secret is in this answer only, never stored in the record
                return httpx.Response(202, json={**job, "webhook_secret": f"whsec_{job['id']}c2VjcmV0"},
                                      headers={"Location": f"/v1/jobs/{job['id']}"})
        return httpx.Response(202, json={**job, "webhook_secret": None}, headers={"Location": f"/v1/jobs/{job['id']}"})

    def _list(self, request: httpx.Request) -> httpx.Response:
        params = request.url.params
        limit = int(params.get("limit", 20))
        ids = [i for i in reversed(self.order) if params.get("state") in (None, self.jobs[i]["state"])]
        if "after" in params:
            ids = ids[ids.index(params["after"]) + 1 :]
        page, more = ids[:limit], len(ids) > limit
        return httpx.Response(200, json={"jobs": [self.jobs[i] for i in page], "has_more": more,
                                         "next_after": page[-1] if more else None})

    def _events(self, job_id: str, request: httpx.Request) -> httpx.Response:
        events = self.events[job_id]
        after = request.url.params.get("after")
        start = next((n + 1 for n, e in enumerate(events) if e["id"] == after), 0)
        page = events[start : start + 2]
        return httpx.Response(200, json={"events": page, "next_after": page[-1]["id"] if page else after})

    def _file(self, job_id: str, path: str) -> httpx.Response:
        data = self.files.get(job_id, {}).get(path)
        if data is None:
            return _err(404, "artifact_not_found", path)
        if path in self.corrupt:
            data = data[:10] + bytes([data[10] ^ 0xFF]) + data[11:]
        return httpx.Response(200, content=iter([data[i : i + 1000] for i in range(0, len(data), 1000)]))

    def _s3(self, request: httpx.Request) -> httpx.Response:
        assert "Authorization" not in request.headers, "API key leaked to the presigned URL"
        assert request.url.params.get("X-Amz-Signature") == "abc"
        _, _, job_id, path = request.url.path.lstrip("/").split("/", 3)
        return self._file(job_id, path)


def _deep_update(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


# -- jobs -----------------------------------------------------------------------------------------


def test_create_get_and_extra_fields(server: FakeServer) -> None:
    with server.client() as client:
        job = client.create_job("s3://models/tiny/", output="out/x/", metadata={"team": "nlp"},
                                rank=8, lora_alpha=16.0, quant="nf4", svd=None, target_modules=["q_proj"])
        assert job.state == "queued" and not job.finished
        assert job.request.options == {"rank": 8, "lora_alpha": 16.0, "quant": "nf4", "target_modules": ["q_proj"]}
        assert job.request.metadata == {"team": "nlp"} and job.request.output == "out/x/"
        assert job.model_extra["server_only_field"] == {"added": "later"}
        again = client.get_job(job.id)
        assert again.id == job.id and again.created_at.year == 2024
    post = server.requests[0]
    assert post.method == "POST" and post.headers["Authorization"] == f"Bearer {KEY}"
    assert "svd" not in json.loads(post.content)["options"]  # None options are left to the server


def test_idempotency_key_returns_the_same_job(server: FakeServer) -> None:
    with server.client() as client:
        a = client.create_job("hf://org/model", idempotency_key="k1")
        b = client.create_job("hf://org/model", idempotency_key="k1")
        c = client.create_job("hf://org/model")
    assert a.id == b.id != c.id
    assert server.requests[0].headers["Idempotency-Key"] == "k1"
    assert "Idempotency-Key" not in server.requests[2].headers


def test_iter_jobs_follows_pagination(server: FakeServer) -> None:
    for n in range(7):
        server.add_job(state="succeeded" if n % 2 else "queued")
    with server.client() as client:
        page = client.list_jobs(limit=3)
        assert [j.id for j in page.jobs] == ["job007", "job006", "job005"] and page.has_more
        assert page.next_after == "job005"
        assert [j.id for j in client.iter_jobs(page_size=3)] == [f"job{n:03d}" for n in range(7, 0, -1)]
        assert [j.id for j in client.iter_jobs(state="succeeded", page_size=2)] == ["job006", "job004", "job002"]
    lists = [r for r in server.requests if r.url.path == "/v1/jobs"]
    assert lists[-1].url.params["state"] == "succeeded" and lists[-1].url.params["after"] == "job004"


def test_cancel(server: FakeServer) -> None:
    job_id = server.add_job(state="running")["id"]
    with server.client() as client:
        assert client.cancel_job(job_id).state == "cancelling"


# -- errors ---------------------------------------------------------------------------------------


def test_api_error_404_and_422(server: FakeServer) -> None:
    with server.client() as client:
        with pytest.raises(ApiError) as info:
            client.get_job("nope")
        assert (info.value.status, info.value.code, info.value.message) == (404, "job_not_found", "no job nope")
        with pytest.raises(ApiError) as info:
            client.create_job("ftp://elsewhere/model")
        assert info.value.status == 422 and info.value.code == "invalid_source"
        assert "ftp://elsewhere/model" in info.value.message
        with pytest.raises(ApiError) as info:
            client.artifacts(server.add_job(state="running")["id"])
        assert (info.value.status, info.value.code) == (409, "job_not_finished")
    with server.client(api_key=None) as client, pytest.raises(ApiError) as info:
        client.get_job("job001")
    assert (info.value.status, info.value.code) == (401, "unauthorized")


@pytest.mark.parametrize(
    ("response", "code", "message"),
    [
        (httpx.Response(422, json={"detail": [{"loc": ["body", "options", "rank"], "msg": "must be >= 1"}]}),
         "validation_error", "options.rank: must be >= 1"),
        (httpx.Response(400, json={"detail": "bad things"}), "http_400", "bad things"),
        (httpx.Response(502, text="<html>Bad Gateway</html>"), "http_502", "<html>Bad Gateway</html>"),
        (httpx.Response(500, content=b""), "http_500", "Internal Server Error"),
    ],
)
def test_api_error_fallbacks(response: httpx.Response, code: str, message: str) -> None:
    transport = httpx.MockTransport(lambda request: response)
    with LoftQClient(BASE, transport=transport) as client, pytest.raises(ApiError) as info:
        client.get_job("x")
    assert (info.value.status, info.value.code, info.value.message) == (response.status_code, code, message)
    assert code in str(info.value)


# -- waiting --------------------------------------------------------------------------------------


def test_wait_returns_the_finished_job_with_progress(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    job_id = server.add_job()["id"]
    server.script[job_id] = [
        {"state": "running", "progress": {"stage": "converting", "layers_total": 4, "layers_done": 1}},
        "503",  # a transient error while polling is retried
        {"progress": {"layers_done": 3}},
        {"state": "succeeded", "progress": {"stage": "done", "layers_done": 4},
         "summary": {"layers": 4, "mean_error_quant": 0.2, "mean_error": 0.1, "seconds": 1.5}},
    ]
    with server.client() as client:
        job = client.wait(job_id, poll_interval=0.001, timeout=5)
    assert job.state == "succeeded" and job.finished and job.summary.layers == 4
    assert server.script[job_id] == []
    captured = capsys.readouterr()
    assert captured.out == "" and "4/4" in captured.err


def test_wait_returns_a_failed_job(server: FakeServer) -> None:
    job_id = server.add_job()["id"]
    server.script[job_id] = [{"state": "failed", "error": {"code": "invalid_source", "message": "no safetensors"}}]
    with server.client() as client:
        job = client.wait(job_id, poll_interval=0.001, progress=False)
    assert job.state == "failed" and job.error.code == "invalid_source"


def test_wait_times_out(server: FakeServer) -> None:
    job_id = server.add_job(state="running")["id"]
    with server.client() as client, pytest.raises(TimeoutError, match="still running"):
        client.wait(job_id, poll_interval=0.01, timeout=0.05, progress=False)


def test_wait_does_not_retry_client_errors(server: FakeServer) -> None:
    with server.client() as client, pytest.raises(ApiError, match="job_not_found"):
        client.wait("missing", poll_interval=0.001, progress=False)
    assert len(server.requests) == 1


# -- events ---------------------------------------------------------------------------------------

SSE = (
    b": connected\n\n"
    b"retry: 2000\n\n"
    b'id: 1\nevent: state\ndata: {"id": "1", "type": "state",\ndata:  "time": "2024-05-01T12:00:01Z",\n'
    b'data:  "data": {"state": "running"}}\n\n'
    b": heartbeat\n\n"
    b"event: ping\ndata: {}\n\n"
    b'id: 2\r\nevent: layer\r\ndata: {"name": "model.layers.0.q_proj", "error": 0.125}\r\n\r\n'
    b"id: 3\nevent: log\ndata: line one\ndata: line two\n\n"
    b"data:\n\n"
    b'id: 4\nevent: state\ndata: {"id": "4", "type": "state", "time": "2024-05-01T12:00:09Z", "data": {"state": "succeeded"}}\n'
)


def test_stream_events_parses_sse(server: FakeServer) -> None:
    job_id = server.add_job(state="running")["id"]
    server.sse[job_id] = SSE
    with server.client() as client:
        events = list(client.stream_events(job_id, after="0"))
    assert [(e.id, e.type) for e in events] == [("1", "state"), ("2", "layer"), ("3", "log"), ("4", "state")]
    assert events[0].data == {"state": "running"} and events[0].time.second == 1
    assert events[1].data == {"name": "model.layers.0.q_proj", "error": 0.125}  # payload-only data
    assert events[2].data == {"text": "line one\nline two"}  # multi-line, not JSON
    assert events[3].data == {"state": "succeeded"}  # last block without the closing blank line
    stream = server.requests[-1]
    assert stream.url.params["after"] == "0" and stream.headers["Accept"] == "text/event-stream"


def test_parse_sse_on_plain_lines() -> None:
    lines = [": hi", "event: progress", 'data: {"layers_done": 2}', "", "id: 9", ""]
    (event,) = parse_sse(lines)
    assert event.type == "progress" and event.data == {"layers_done": 2} and event.id == ""


def test_stream_events_error(server: FakeServer) -> None:
    with server.client() as client, pytest.raises(ApiError) as info:
        list(client.stream_events("missing"))
    assert info.value.code == "job_not_found"


def test_events_pages(server: FakeServer) -> None:
    job_id = server.add_job()["id"]
    server.events[job_id] = [{"id": str(n), "type": "layer", "time": T0, "data": {"n": n}} for n in range(1, 6)]
    with server.client() as client:
        page = client.events(job_id)
        assert [e.id for e in page.events] == ["1", "2"] and page.next_after == "2"
        assert [e.data["n"] for e in client.iter_events(job_id, after="1")] == [2, 3, 4, 5]


# -- artifacts ------------------------------------------------------------------------------------


def _finished_with_files(server: FakeServer) -> str:
    job_id = server.add_job(state="succeeded")["id"]
    server.files[job_id] = {
        "config.json": b'{"model_type": "llama"}' * 3,
        "loftq_init/adapter_model.safetensors": bytes(range(256)) * 40,
        "model.safetensors": bytes(reversed(range(256))) * 30,
    }
    server.absolute.add("model.safetensors")
    return job_id


def test_download_verifies_and_writes(server: FakeServer, tmp_path: Path) -> None:
    job_id = _finished_with_files(server)
    with server.client() as client:
        assert [a.path for a in client.artifacts(job_id)] == list(server.files[job_id])
        paths = client.download(job_id, tmp_path / "out")
        assert paths == [tmp_path / "out" / p for p in server.files[job_id]]
        for path, (name, data) in zip(paths, server.files[job_id].items()):
            assert path.read_bytes() == data, name
        assert not list((tmp_path / "out").rglob("*.partial"))
        fetched = len(server.requests)
        assert client.download(job_id, tmp_path / "out") == paths  # verified files are not fetched again
        assert len(server.requests) == fetched + 1  # only the artifact list


def test_download_checksum_mismatch_leaves_no_file(server: FakeServer, tmp_path: Path) -> None:
    job_id = _finished_with_files(server)
    server.corrupt.add("loftq_init/adapter_model.safetensors")
    with server.client() as client, pytest.raises(ChecksumMismatch) as info:
        client.download(job_id, tmp_path)
    assert info.value.path == "loftq_init/adapter_model.safetensors"
    assert info.value.actual_sha256 != info.value.expected_sha256 and info.value.actual_size == info.value.expected_size
    assert not (tmp_path / "loftq_init" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "loftq_init" / "adapter_model.safetensors.partial").exists()


def test_download_refuses_escaping_paths(server: FakeServer, tmp_path: Path) -> None:
    job_id = server.add_job(state="succeeded")["id"]
    server.files[job_id] = {"../evil.sh": b"rm -rf /"}
    with server.client() as client, pytest.raises(UnsafeArtifactPath):
        client.download(job_id, tmp_path / "out")
    assert not (tmp_path / "evil.sh").exists()


def test_client_does_not_import_heavy_modules() -> None:
    code = "import sys, loftq_client, loftq_client.cli; bad = [m for m in ('torch', 'loftq', 'api') if m in sys.modules]; print(bad)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# -- CLI ------------------------------------------------------------------------------------------


@pytest.fixture
def run_cli(server: FakeServer, monkeypatch: pytest.MonkeyPatch):
    made: list[tuple[str, str | None]] = []

    def factory(url: str, api_key: str | None) -> LoftQClient:
        made.append((url, api_key))
        return LoftQClient(url, api_key, transport=server.transport)

    monkeypatch.setattr(cli_module, "make_client", factory)
    runner = CliRunner()

    def run(*args: str):
        result = runner.invoke(cli_module.app, list(args), env={"LOFTQ_URL": BASE, "LOFTQ_API_KEY": KEY})
        run.made = made
        return result

    return run


def test_cli_submit(server: FakeServer, run_cli) -> None:
    result = run_cli("submit", "s3://models/tiny/", "--rank", "8", "--alpha", "16", "--quant", "int8",
                     "--target", "q_proj", "--target", "v_proj", "--svd", "exact", "--backbone-format", "dequantized",
                     "--meta", "team=nlp", "--meta", "ticket=A-1=2", "--output", "out/tiny/")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "job001"
    assert run_cli.made == [(BASE, KEY)]
    request = server.jobs["job001"]["request"]
    # No bits: the server's quantizer registry implies them from quant (loftq/quantizers/registry.py).
    assert request["options"] == {"rank": 8, "lora_alpha": 16.0, "quant": "int8", "svd": "exact",
                                  "target_modules": ["q_proj", "v_proj"], "backbone_format": "dequantized"}
    assert request["metadata"] == {"team": "nlp", "ticket": "A-1=2"} and request["output"] == "out/tiny/"


def test_cli_submit_wait(server: FakeServer, run_cli) -> None:
    server.script["job001"] = [{"state": "running", "progress": {"layers_total": 2, "layers_done": 1}},
                               {"state": "succeeded", "progress": {"layers_done": 2}}]
    result = run_cli("submit", "hf://org/model", "--wait", "--poll-interval", "0.001")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "job001" and "job001 succeeded" in result.stderr

    server.script["job002"] = [{"state": "failed", "error": {"code": "oom", "message": "out of memory"}}]
    result = run_cli("submit", "hf://org/model", "--wait", "--poll-interval", "0.001")
    assert result.exit_code == 1 and "error [oom] out of memory" in result.stderr


def test_cli_errors(run_cli) -> None:
    result = run_cli("status", "nope")
    assert result.exit_code == 2 and result.stderr.strip() == "error [job_not_found] no job nope"
    result = run_cli("submit", "ftp://x")
    assert result.exit_code == 2 and result.stderr.startswith("error [invalid_source]")
    result = run_cli("submit", "s3://x/", "--meta", "novalue")
    assert result.exit_code == 2 and "error [invalid_metadata]" in result.stderr


def test_cli_connection_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    monkeypatch.setattr(cli_module, "make_client", lambda url, key: LoftQClient(url, key, transport=httpx.MockTransport(refuse)))
    result = CliRunner().invoke(cli_module.app, ["--url", "http://down.test", "cancel", "x"])
    assert result.exit_code == 2 and result.stderr.startswith("error [connection_error] http://down.test")


def test_cli_status_list_cancel(server: FakeServer, run_cli) -> None:
    server.add_job(state="succeeded", summary={"layers": 4, "mean_error_quant": 0.2, "mean_error": 0.1, "seconds": 2.0})
    server.add_job(state="running", progress={"stage": "converting", "layers_done": 3, "layers_total": 8})
    result = run_cli("status", "job002")
    assert result.exit_code == 0, result.output
    assert "running" in result.stdout and "converting" in result.stdout and "3/8" in result.stdout
    result = run_cli("status", "job001", "--json")
    assert json.loads(result.stdout)["summary"]["layers"] == 4

    result = run_cli("list")
    assert result.exit_code == 0 and result.stdout.index("job002") < result.stdout.index("job001")
    result = run_cli("list", "--state", "succeeded", "--limit", "5")
    assert "job001" in result.stdout and "job002" not in result.stdout
    result = run_cli("list", "--limit", "1", "--json")
    assert [j["id"] for j in json.loads(result.stdout)] == ["job002"]

    result = run_cli("cancel", "job002")
    assert result.exit_code == 0 and result.stdout.strip() == "job002 cancelling"


def test_cli_logs(server: FakeServer, run_cli) -> None:
    job_id = server.add_job()["id"]
    server.events[job_id] = [{"id": str(n), "type": "layer", "time": T0, "data": {"n": n}} for n in range(1, 4)]
    server.sse[job_id] = SSE
    result = run_cli("logs", job_id)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f'2024-05-01T12:00:00+00:00 layer {{"n": {n}}}' for n in (1, 2, 3)]
    result = run_cli("logs", job_id, "--follow")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and lines[0].endswith('state {"state": "running"}') and '"succeeded"' in lines[-1]


def test_cli_download(server: FakeServer, run_cli, tmp_path: Path) -> None:
    job_id = _finished_with_files(server)
    result = run_cli("download", job_id, str(tmp_path))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(tmp_path / p) for p in server.files[job_id]]
    server.corrupt.add("config.json")
    result = run_cli("download", job_id, str(tmp_path / "again"))
    assert result.exit_code == 2 and result.stderr.startswith("error [checksum_mismatch] config.json")


# -- calibrated jobs ------------------------------------------------------------------------------

EVALUATED = {
    "layers": 14, "mean_error_quant": 0.11, "mean_error": 0.09, "seconds": 3.5, "objective": "activation",
    "mean_objective_error_quant": 0.1, "mean_objective_error": 0.04,
    "evaluation": {"sequences": 4, "tokens": 128, "cosine_quantized": 0.971234, "cosine_initialised": 0.991234,
                   "perplexity_full_precision": 250.5, "perplexity_quantized": 270.25, "perplexity_initialised": 255.125,
                   "gap_recovered": 0.7519},
    "calibration": {"sha256": "ab" * 32, "documents": 3, "sequences": 8, "tokens": 256, "seq_len": 32,
                    "packed": True, "propagation": "initialised", "blocks": 2},
}


def test_create_job_with_calibration_data(server: FakeServer) -> None:
    with server.client() as client:
        job = client.create_job("s3://models/llama/", calibration_data="s3://datasets/calib/", objective="activation",
                                calibration={"samples": 8, "seq_len": None, "evaluate": True}, rank=None)
        assert job.request.calibration_data == "s3://datasets/calib/"
        assert job.request.options == {"objective": "activation", "calibration": {"samples": 8, "evaluate": True}}
        plain = client.create_job("s3://models/llama/", calibration={"samples": None})
    body = json.loads(server.requests[-1].content)
    assert "calibration_data" not in body and body["options"] == {}  # a dict option left empty is dropped
    assert plain.request.calibration_data is None


def test_calibrated_job_models() -> None:
    job = Job.model_validate({"id": "job1", "state": "running", "created_at": T0, "summary": EVALUATED,
                              "progress": {"stage": "calibrating", "layers_done": 3, "layers_total": 14,
                                           "blocks_done": 1, "blocks_total": 2}})
    assert job.summary.evaluation.perplexity_initialised == 255.125 and job.summary.calibration.blocks == 2
    assert progress_description(job) == "job1 running [calibrating block 1/2]"
    job.progress.stage = "converting"
    assert progress_description(job) == "job1 running [converting]"
    old = Job.model_validate({"id": "job2", "state": "succeeded", "created_at": T0,
                              "summary": {"layers": 1, "mean_error_quant": 0.2, "mean_error": 0.1, "seconds": 1.0}})
    assert old.summary.evaluation is None and old.summary.objective == "weight" and old.progress.blocks_total == 0


def test_cli_submit_calibration_flags(server: FakeServer, run_cli) -> None:
    result = run_cli("submit", "s3://models/llama/", "--calibration-data", "s3://datasets/calib.txt",
                     "--objective", "activation", "--evaluate", "--calib-samples", "8", "--calib-seq-len", "32",
                     "--eval-samples", "4", "--propagation", "full-precision", "--rank", "4")
    assert result.exit_code == 0, result.output
    request = server.jobs["job001"]["request"]
    assert request["calibration_data"] == "s3://datasets/calib.txt"
    assert request["options"] == {"rank": 4, "objective": "activation", "calibration": {
        "samples": 8, "seq_len": 32, "eval_samples": 4, "propagation": "full-precision", "evaluate": True}}

    result = run_cli("submit", "s3://models/llama/", "--objective", "activation-diag", "--calibration-data", "s3://d/c/")
    assert result.exit_code == 0, result.output
    assert server.jobs["job002"]["request"]["options"] == {"objective": "activation-diag"}  # no --evaluate: server default


def test_cli_status_shows_calibration_progress_and_evaluation(server: FakeServer, run_cli) -> None:
    server.add_job(state="running", progress={"stage": "calibrating", "layers_done": 3, "layers_total": 14,
                                              "blocks_done": 1, "blocks_total": 2},
                   request={"source": "s3://models/llama/", "calibration_data": "s3://datasets/calib.txt",
                            "options": {"objective": "activation"}, "metadata": {}})
    server.add_job(state="succeeded", summary=EVALUATED)
    result = run_cli("status", "job001")
    assert result.exit_code == 0, result.output
    assert "calibrating" in result.stdout and "1/2" in result.stdout and "s3://datasets/calib.txt" in result.stdout
    result = run_cli("status", "job002")
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert "full precision 250.5, quantized 270.2, initialised 255.1" in out
    assert "quantized 0.971234, initialised 0.991234" in out and "75.2%" in out
    assert "activation: mean error 0.04 (quant only 0.1)" in out
    assert "8 sequences × 32 tokens from 3 documents" in out and "4 held-out sequences, 128 tokens" in out
    result = run_cli("status", "job002", "--json")
    assert json.loads(result.stdout)["summary"]["evaluation"]["gap_recovered"] == 0.7519


REFINED = {
    **EVALUATED,
    "refinement": {"mode": "block+model", "blocks_total": 2, "blocks_accepted": 1, "blocks_rejected": 1,
                   "mean_block_gain": 0.125, "heldout_sequences": 2, "seconds": 7.25,
                   "model": {"loss": "kl", "heldout_before": 0.0421, "heldout_after": 0.0312, "accepted": True, "steps": 20, "seconds": 4.0}},
}


def test_create_job_passes_refine_through(server: FakeServer) -> None:
    with server.client() as client:
        job = client.create_job("s3://models/llama/", calibration_data="s3://datasets/calib/", objective="activation",
                                refine="block+model", refinement={"steps": 50, "lr": None, "model_lr": 1e-5})
    assert job.request.options == {"objective": "activation", "refine": "block+model", "refinement": {"steps": 50, "model_lr": 1e-5}}


def test_refined_job_summary_parses() -> None:
    job = Job.model_validate({"id": "job1", "state": "succeeded", "created_at": T0, "summary": REFINED})
    refinement = job.summary.refinement
    assert (refinement.mode, refinement.blocks_accepted, refinement.blocks_total, refinement.mean_block_gain) == ("block+model", 1, 2, 0.125)
    assert refinement.model.heldout_after == 0.0312 and refinement.model.accepted
    partial = Job.model_validate({"id": "job2", "state": "succeeded", "created_at": T0,
                                  "summary": {**EVALUATED, "refinement": {"mode": "model", "model": {"loss": "hidden-mse", "heldout_after": None},
                                                                          "added_later": 1}}})
    assert partial.summary.refinement.blocks_total == 0 and partial.summary.refinement.model.heldout_after is None
    assert Job.model_validate({"id": "job3", "state": "succeeded", "created_at": T0, "summary": EVALUATED}).summary.refinement is None


def test_cli_submit_refine_flags(server: FakeServer, run_cli) -> None:
    result = run_cli("submit", "s3://models/llama/", "--calibration-data", "s3://datasets/calib.txt", "--refine", "block+model",
                     "--refine-steps", "50", "--refine-lr", "0.002", "--refine-batch-size", "2", "--refine-holdout", "0.25",
                     "--model-refine-steps", "10", "--model-refine-lr", "1e-5", "--model-refine-batch-size", "1")
    assert result.exit_code == 0, result.output
    assert server.jobs["job001"]["request"]["options"] == {"refine": "block+model", "refinement": {
        "steps": 50, "lr": 0.002, "batch_size": 2, "holdout": 0.25, "model_steps": 10, "model_lr": 1e-5, "model_batch_size": 1}}
    result = run_cli("submit", "s3://models/llama/", "--calibration-data", "s3://d/c/", "--refine", "block")
    assert result.exit_code == 0, result.output
    assert server.jobs["job002"]["request"]["options"] == {"refine": "block"}  # no settings: server defaults


def test_cli_status_shows_the_refinement(server: FakeServer, run_cli) -> None:
    server.add_job(state="succeeded", summary=REFINED)
    result = run_cli("status", "job001")
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert "refinement block+model: 1/2 blocks accepted, mean held-out gain 12.5%, 7.2 s" in out
    assert "model stage held-out kl 0.0421 → 0.0312, accepted, 20 steps" in out


def test_create_distributed_job(server: FakeServer) -> None:
    with server.client() as client:
        job = client.create_job("s3://models/llama/", distributed=True, shards_per_part=2, rank=8)
        assert job.request.distributed is True and job.request.shards_per_part == 2
        plain = client.create_job("s3://models/llama/")
    assert plain.request.distributed is False
    body = json.loads(server.requests[-1].content)
    assert "distributed" not in body and "shards_per_part" not in body  # server defaults apply


def test_cli_submit_distributed(server: FakeServer, run_cli) -> None:
    result = run_cli("submit", "s3://models/tiny/", "--distributed", "--shards-per-part", "3")
    assert result.exit_code == 0, result.output
    request = server.jobs["job001"]["request"]
    assert request["distributed"] is True and request["shards_per_part"] == 3


def test_api_key_from_the_environment(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """LOFTQ_API_KEY is the key when none is passed; an explicit "" sends none."""
    job = server.add_job()
    monkeypatch.setenv("LOFTQ_API_KEY", KEY)
    with LoftQClient(BASE, transport=server.transport) as client:
        assert client.get_job(job["id"]).id == job["id"]
    assert server.requests[-1].headers["Authorization"] == f"Bearer {KEY}"
    with LoftQClient(BASE, "", transport=server.transport) as client, pytest.raises(ApiError) as info:
        client.get_job(job["id"])
    assert info.value.code == "unauthorized" and "Authorization" not in server.requests[-1].headers


def test_cli_api_key_option(server: FakeServer, run_cli) -> None:
    """--api-key wins over LOFTQ_API_KEY and reaches the client."""
    job = server.add_job()
    result = run_cli("--api-key", "other-key", "status", job["id"])
    assert result.exit_code == 2 and "unauthorized" in result.output
    assert run_cli.made[-1][1] == "other-key"
    assert run_cli("status", job["id"]).exit_code == 0 and run_cli.made[-1][1] == KEY


# -- deleting jobs --------------------------------------------------------------------------------


def test_delete_job_removed_at_once(server: FakeServer) -> None:
    queued = server.add_job()["id"]
    finished = server.add_job(state="succeeded")["id"]
    with server.client() as client:
        assert client.delete_job(queued) is None
        assert client.delete_job(finished) is None
        with pytest.raises(ApiError) as info:
            client.get_job(finished)
    assert (info.value.status, info.value.code) == (404, "job_not_found")
    deletes = [r for r in server.requests if r.method == "DELETE"]
    assert [r.url.path for r in deletes] == [f"/v1/jobs/{queued}", f"/v1/jobs/{finished}"]
    assert all(r.headers["Authorization"] == f"Bearer {KEY}" for r in deletes)
    assert server.jobs == {}


def test_delete_running_job_returns_the_cancelling_job(server: FakeServer) -> None:
    job_id = server.add_job(state="running", progress={"stage": "converting", "layers_done": 2, "layers_total": 8})["id"]
    with server.client() as client:
        job = client.delete_job(job_id)
    assert isinstance(job, Job) and job.id == job_id and job.state == "cancelling"
    assert job.progress.layers_done == 2 and job_id in server.jobs  # still there until its worker stops


def test_delete_job_not_found(server: FakeServer) -> None:
    job_id = server.add_job(state="failed")["id"]
    with server.client() as client:
        assert client.delete_job(job_id) is None
        with pytest.raises(ApiError) as info:
            client.delete_job(job_id)  # deleting again
    assert (info.value.status, info.value.code) == (404, "job_not_found")


def test_delete_job_unexpected_body() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(202, text="accepted"))
    with LoftQClient(BASE, transport=transport) as client, pytest.raises(ApiError) as info:
        client.delete_job("x")
    assert info.value.code == "invalid_response"


def test_wait_deleted_polls_until_gone(server: FakeServer) -> None:
    job_id = server.add_job(state="running")["id"]
    server.script[job_id] = [{}, "503", {"state": "cancelled"}, "gone"]
    with server.client() as client:
        assert client.delete_job(job_id).state == "cancelling"
        assert client.wait_deleted(job_id, poll_interval=0.001, timeout=5) is None
    assert server.script[job_id] == [] and job_id not in server.jobs
    gets = [r for r in server.requests if r.method == "GET"]
    assert len(gets) == 4


def test_wait_deleted_times_out_and_refuses_other_errors(server: FakeServer) -> None:
    job_id = server.add_job(state="cancelling")["id"]
    with server.client() as client, pytest.raises(TimeoutError, match=f"job {job_id} is not deleted after 0.05 s: still cancelling"):
        client.wait_deleted(job_id, poll_interval=0.01, timeout=0.05)

    def forbidden(request: httpx.Request) -> httpx.Response:
        return _err(403, "forbidden", "no")
    with LoftQClient(BASE, transport=httpx.MockTransport(forbidden)) as client, pytest.raises(ApiError, match="forbidden"):
        client.wait_deleted("x", poll_interval=0.001)


# -- webhooks -------------------------------------------------------------------------------------

DELIVERIES = [
    {"id": "msg_0123456789abcdef0123456789abcdef", "event": "job.started", "target": "job",
     "url": "https://hooks.example.com/loftq", "state": "delivered", "attempts": 1, "created_at": T0,
     "last_attempt_at": "2024-05-01T12:00:01Z", "last_status": 204, "last_error": None,
     "delivered_at": "2024-05-01T12:00:01Z"},
    {"id": "msg_fedcba9876543210fedcba9876543210", "event": "job.succeeded", "target": "tenant",
     "url": "https://tenant.example.com/hook", "state": "pending", "attempts": 3, "created_at": T0,
     "last_attempt_at": "2024-05-01T12:01:00Z", "last_status": 503, "last_error": "HTTP 503 from the receiver",
     "delivered_at": None},
    {"id": "msg_00000000000000000000000000000042", "event": "job.failed", "target": "job",
     "url": "https://hooks.example.com/loftq", "state": "failed", "attempts": 8, "created_at": T0,
     "last_attempt_at": None, "last_status": None, "last_error": "connection refused", "delivered_at": None},
]


def test_create_job_sends_webhook_and_parses_the_secret(server: FakeServer) -> None:
    with server.client() as client:
        job = client.create_job("s3://models/tiny/", webhook_url="https://hooks.example.com/loftq",
                                webhook_events=("job.succeeded", "job.failed"))
        assert job.webhook_secret == "whsec_job001c2VjcmV0"
        assert job.request.webhook_url == "https://hooks.example.com/loftq"
        assert job.request.webhook_events_filter == ["job.succeeded", "job.failed"]
        assert client.get_job(job.id).webhook_secret is None  # shown once only
        single = client.create_job("s3://models/tiny/", webhook_url="https://h.example.com/", webhook_events="job.progress")
        plain = client.create_job("s3://models/tiny/")
    body = json.loads(server.requests[0].content)
    assert body["webhook_url"] == "https://hooks.example.com/loftq"
    assert body["webhook_events_filter"] == ["job.succeeded", "job.failed"]
    assert "webhook_events" not in body["options"]  # a webhook argument, not an engine option
    assert json.loads(server.requests[2].content)["webhook_events_filter"] == ["job.progress"]
    assert single.webhook_secret is not None
    plain_body = json.loads(server.requests[-1].content)
    assert "webhook_url" not in plain_body and "webhook_events_filter" not in plain_body  # server defaults
    assert plain.webhook_secret is None and plain.request.webhook_url is None


def test_webhook_deliveries_parse(server: FakeServer) -> None:
    job_id = server.add_job(state="succeeded")["id"]
    server.deliveries[job_id] = [{**DELIVERIES[0], "added_later": True}, *DELIVERIES[1:]]
    with server.client() as client:
        deliveries = client.webhook_deliveries(job_id)
        assert client.webhook_deliveries(server.add_job()["id"]) == []
        with pytest.raises(ApiError) as info:
            client.webhook_deliveries("missing")
    assert info.value.code == "job_not_found"
    assert isinstance(deliveries[0], WebhookDelivery)
    assert [(d.id, d.event, d.target, d.state, d.attempts) for d in deliveries] == [
        (d["id"], d["event"], d["target"], d["state"], d["attempts"]) for d in DELIVERIES
    ]
    first, second, third = deliveries
    assert first.last_status == 204 and first.delivered_at.second == 1 and first.model_extra["added_later"] is True
    assert second.last_error == "HTTP 503 from the receiver" and second.delivered_at is None
    assert third.last_attempt_at is None and third.last_status is None
    assert server.requests[0].url.path == f"/v1/jobs/{job_id}/webhooks"


def test_package_exports_the_webhook_models() -> None:
    import loftq_client

    assert loftq_client.WebhookDelivery is WebhookDelivery
    assert loftq_client.WebhookDeliveryList.model_validate({"job_id": "j", "deliveries": DELIVERIES}).deliveries[2].attempts == 8
    assert loftq_client.WEBHOOK_EVENTS[1] == "job.progress" and "job.progress" not in loftq_client.DEFAULT_WEBHOOK_EVENTS
    assert {"WebhookDelivery", "WebhookDeliveryList", "WEBHOOK_EVENTS"} <= set(loftq_client.__all__)


# -- CLI: delete and webhooks ---------------------------------------------------------------------


def test_cli_delete(server: FakeServer, run_cli) -> None:
    server.add_job(state="succeeded")
    server.add_job(state="running")
    result = run_cli("delete", "job001")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "job001 deleted" and "job001" not in server.jobs
    result = run_cli("delete", "job002")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "job002 cancelling; it is removed once its worker stops"
    result = run_cli("delete", "job001")
    assert result.exit_code == 2 and result.stderr.strip() == "error [job_not_found] no job job001"


def test_cli_delete_wait(server: FakeServer, run_cli) -> None:
    server.add_job(state="running")
    server.script["job001"] = [{}, "503", {"state": "cancelled"}, "gone"]
    result = run_cli("delete", "job001", "--wait", "--poll-interval", "0.001", "--timeout", "10")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "job001 deleted"
    assert "job001 cancelling; it is removed once its worker stops" in result.stderr
    assert server.script["job001"] == [] and "job001" not in server.jobs

    server.add_job(state="queued")  # removed at once: --wait has nothing to wait for
    result = run_cli("delete", "job002", "--wait")
    assert result.exit_code == 0 and result.stdout.strip() == "job002 deleted"


def test_cli_delete_wait_timeout(server: FakeServer, run_cli) -> None:
    server.add_job(state="running")
    result = run_cli("delete", "job001", "--wait", "--poll-interval", "0.01", "--timeout", "0.05")
    assert result.exit_code == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error [timeout] job job001 is not deleted after 0.05 s: still cancelling")
    assert "loftq-jobs status job001" in error and result.stdout == ""


def test_cli_submit_webhook(server: FakeServer, run_cli) -> None:
    result = run_cli("submit", "s3://models/tiny/", "--webhook-url", "https://hooks.example.com/loftq",
                     "--webhook-event", "job.succeeded", "--webhook-event", "job.progress")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "job001"  # the secret never goes to stdout
    assert "whsec_job001c2VjcmV0" in result.stderr and "whsec_" not in result.stdout
    assert "shown only once" in result.stderr and "webhook-signature" in result.stderr
    assert "Standard Webhooks" in result.stderr
    request = server.jobs["job001"]["request"]
    assert request["webhook_url"] == "https://hooks.example.com/loftq"
    assert request["webhook_events_filter"] == ["job.succeeded", "job.progress"]

    result = run_cli("submit", "s3://models/tiny/")
    assert result.exit_code == 0 and "secret" not in result.stderr
    assert server.jobs["job002"]["request"]["webhook_url"] is None

    # A replayed Idempotency-Key answers without the secret: say so rather than print nothing.
    run_cli("submit", "s3://models/tiny/", "--webhook-url", "https://h.example.com/", "--idempotency-key", "k")
    result = run_cli("submit", "s3://models/tiny/", "--webhook-url", "https://h.example.com/", "--idempotency-key", "k")
    assert result.exit_code == 0 and result.stdout.strip() == "job003"
    assert "whsec_" not in result.stderr and "shown only once" in result.stderr


def test_cli_status_shows_the_webhook(server: FakeServer, run_cli) -> None:
    server.add_job(request={"source": "s3://m/", "options": {}, "metadata": {},
                            "webhook_url": "https://hooks.example.com/loftq", "webhook_events_filter": None})
    result = run_cli("status", "job001")
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert "https://hooks.example.com/loftq (job.started, job.succeeded, job.failed, job.cancelled)" in out


def test_cli_webhooks_table(server: FakeServer, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "60")  # narrower than the table: ids must still come out whole
    job_id = server.add_job(state="succeeded")["id"]
    server.deliveries[job_id] = DELIVERIES
    result = run_cli("webhooks", job_id)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for delivery in DELIVERIES:
        (row,) = [line for line in lines if delivery["id"] in line]  # whole, on one line
        assert delivery["event"] in row and delivery["target"] in row and delivery["state"] in row
    rows = {d["id"]: next(line for line in lines if d["id"] in line) for d in DELIVERIES}
    assert re.search(r"\b8\b", rows[DELIVERIES[2]["id"]]) and "connection" in rows[DELIVERIES[2]["id"]]
    assert "204" in rows[DELIVERIES[0]["id"]] and "503" in rows[DELIVERIES[1]["id"]]
    assert "receiver" in result.stdout  # errors may wrap, never vanish

    result = run_cli("webhooks", job_id, "--json")
    assert result.exit_code == 0, result.output
    parsed = json.loads(result.stdout)
    assert [d["id"] for d in parsed] == [d["id"] for d in DELIVERIES]
    assert parsed[1]["last_status"] == 503 and parsed[0]["url"] == "https://hooks.example.com/loftq"

    empty = server.add_job()["id"]
    result = run_cli("webhooks", empty)
    assert result.exit_code == 0 and result.stdout == "" and "no webhook deliveries" in result.stderr
    assert json.loads(run_cli("webhooks", empty, "--json").stdout) == []
    result = run_cli("webhooks", "missing")
    assert result.exit_code == 2 and "job_not_found" in result.stderr
