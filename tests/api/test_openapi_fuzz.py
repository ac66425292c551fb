"""Schemathesis over the API's own OpenAPI document, against a real server: uvicorn on
loopback, a real Redis-compatible server, local artifact storage, API keys on.

Every operation in ``/openapi.json`` is called with generated requests (valid and invalid),
and every answer must pass the checks that matter: no 5xx, status codes and content types
the document declares, bodies and headers that match the declared schemas, 401 where the key
is left out, 405 for undeclared methods. No worker runs, so jobs stay queued; a few jobs are
put in the other states by hand (a cancelled one, a succeeded one with artifacts on disk),
and generated job ids are sometimes swapped for theirs so the paths past the 404 are
exercised too. Derandomized and without an example database, so CI runs the same requests.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")

from conftest import stop_processes  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

from service.lifecycle import Lifecycle
from service.models import JobState, JobSummary  # noqa: E402
from service.store import JobStore  # noqa: E402
from service.tenants import hash_key  # noqa: E402

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "loftq-hypothesis"))

TENANT = "fuzz"
KEY = "lq_openapi-fuzz-key"
BODY = {"source": "s3://models/llama/", "options": {"rank": 8}}
ARTIFACT = "model.safetensors"


def _finish(store: JobStore, job_id: str, storage: Path, output: str) -> None:
    """Move a queued job to succeeded the way a worker would, with a manifest and one file."""
    data = b"not really a checkpoint"
    directory = storage / output
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ARTIFACT).write_bytes(data)
    manifest = {"files": [{"path": ARTIFACT, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}]}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    Lifecycle(store).transition(job_id, JobState.running)
    summary = JobSummary(layers=1, mean_error_quant=0.1, mean_error=0.05, seconds=0.1)
    Lifecycle(store).transition(job_id, JobState.succeeded, summary=summary)


@pytest.fixture(scope="module")
def fuzz_api(redis_url: str, start_api: Callable, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The API process, and jobs of the fuzzed tenant in each reachable state."""
    work = tmp_path_factory.mktemp("openapi-fuzz")
    url = redis_url.replace("/0", "/6")
    env = {
        **os.environ,
        "LOFTQ_REDIS_URL": url,
        "LOFTQ_QUEUE": f"fuzz-{uuid.uuid4().hex[:8]}",  # nobody consumes it
        "LOFTQ_STORAGE": "local",
        "LOFTQ_LOCAL_STORAGE_ROOT": str(work / "artifacts"),
        "LOFTQ_WORK_DIR": str(work / "scratch"),
        "LOFTQ_ALLOWED_FILE_ROOTS": json.dumps([str(work / "files")]),
        "LOFTQ_API_KEYS": f"{TENANT}:{hash_key(KEY)}",
        "LOFTQ_TENANT_SOURCES": json.dumps({TENANT: ["s3://models/"]}),
        "LOFTQ_MAX_MODEL_BYTES": str(2**62),  # raised like the rate limits: an upload may declare any schema-valid size
        "LOFTQ_SUBMISSIONS_PER_MINUTE": "100000",
        "LOFTQ_MAX_QUEUED_JOBS_PER_TENANT": "100000",
    }
    (work / "files").mkdir()
    process, base = start_api(env, work / "api.log")
    try:
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            jobs = [client.post("/v1/jobs", json=BODY).json() for _ in range(3)]
            queued, cancelled, succeeded = (job["id"] for job in jobs)
            assert client.post(f"/v1/jobs/{cancelled}/cancel").json()["state"] == "cancelled"
            _finish(JobStore.from_url(url), succeeded, work / "artifacts", jobs[2]["output"])
            # Uploads: one open (its empty file can be PUT again and again), one complete.
            open_upload = client.post("/v1/uploads", json={"files": {"empty.txt": 0, "config.json": 2}}).json()["id"]
            complete = client.post("/v1/uploads", json={"files": {"config.json": 2}}).json()
            assert client.put(complete["files"][0]["url"], content=b"{}").status_code == 204
            assert client.post(f"/v1/uploads/{complete['id']}/complete").status_code == 200
        yield {
            "base": base, "log": work / "api.log", "queued": queued, "cancelled": cancelled, "succeeded": succeeded,
            "open_upload": open_upload, "complete_upload": complete["id"], "headers": headers,
        }
    finally:
        stop_processes(process, [])


def _document() -> dict:
    """The OpenAPI document the API serves, built from the app without a server (Schemathesis
    parametrizes at collection time); ``test_the_served_document_is_the_fuzzed_one`` checks it
    is what ``/openapi.json`` returns."""
    from api.main import create_app
    from service.settings import Settings

    root = Path(tempfile.gettempdir()) / "loftq-openapi-fuzz"
    settings = Settings(redis_url="redis://127.0.0.1:1/0", local_storage_root=root, api_keys=f"{TENANT}:{hash_key(KEY)}")
    return create_app(settings).openapi()


DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(
    DOCUMENT,
    config=schemathesis.Config.from_dict(
        {
            "auth": {"openapi": {"HTTPBearer": {"bearer": KEY}}},
            "operations": [
                {
                    # Sources and calibration URIs are checked against the server's allowed roots
                    # and naming rules, and options against each other (bits for the quantizer,
                    # calibration data for the objective): rules no JSON schema states, so a
                    # schema-valid body may be refused with 422 in the error body. Every other
                    # status keeps the check's default expectation.
                    "include-name": "POST /v1/jobs",
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": ["2xx", "401", "404", "409", "422", "429"],
                        }
                    },
                },
                {
                    # An event cursor is two numbers below 2^64; the pattern cannot say "below".
                    "include-path-regex": "^/v1/jobs/\\{job_id\\}/events",
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": ["2xx", "401", "404", "409", "422", "429"],
                        }
                    },
                },
                {
                    # The body is the file's raw bytes, which must be a declared file of an open
                    # upload and exactly its declared size: nothing a schema can state.
                    "include-name": "PUT /v1/uploads/{upload_id}/files/{path}",
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": ["2xx", "401", "404", "409", "413", "422", "429"],
                        }
                    },
                },
            ],
        }
    ),
)


STATUSES: defaultdict[str, Counter[int]] = defaultdict(Counter)
"""Status codes seen per operation in this run."""


def test_the_served_document_is_the_fuzzed_one(fuzz_api: dict) -> None:
    assert httpx.get(f"{fuzz_api['base']}/openapi.json", timeout=30).json() == DOCUMENT


def _valid(case, location: str) -> bool:
    """Whether Schemathesis generated this part of the request as schema-valid: only such
    parts are swapped below, so a case meant to be refused stays one."""
    component = case.meta.components.get(location) if case.meta is not None else None
    return component is None or component.mode is schemathesis.GenerationMode.POSITIVE


def _real_job(case, jobs: dict) -> None:
    """Swap the generated job id for a real one in most cases (chosen from the generated
    value, so the run stays deterministic). A queued job's event stream never ends, so the
    stream gets finished jobs only; a DELETE gets a job made for it (the others must outlive
    it), queued or cancelled."""
    params = case.path_parameters or {}
    if "job_id" not in params or not _valid(case, "path"):
        return
    pick = int(hashlib.sha256(str(params["job_id"]).encode()).hexdigest(), 16)
    if case.method.upper() == "DELETE":
        if pick % 3:
            made = httpx.post(f"{jobs['base']}/v1/jobs", json=BODY, headers=jobs["headers"], timeout=30).json()["id"]
            if pick % 3 == 2:
                httpx.post(f"{jobs['base']}/v1/jobs/{made}/cancel", headers=jobs["headers"], timeout=30)
            params["job_id"] = made
        return
    if case.path.endswith("/stream"):
        options = (jobs["cancelled"], jobs["succeeded"], params["job_id"])
    elif case.path.endswith("/artifacts/files/{path}"):
        options = (jobs["succeeded"], jobs["succeeded"], params["job_id"])
        if pick % 3 == 0:
            params["path"] = (ARTIFACT, "manifest.json")[pick // 3 % 2]
    else:
        options = (jobs["queued"], jobs["succeeded"], jobs["cancelled"], params["job_id"])
        if pick % len(options) == len(options) - 1 and case.query:
            # Generated cursors and limits are often refused (422) before the lookup: this case
            # is kept, without them, for the unknown job's 404, which every job route must reach.
            case.query = {}
    params["job_id"] = options[pick % len(options)]


def _real_upload(case, api: dict) -> None:
    """Swap the generated upload id for a real one in most cases, as ``_real_job`` does; a
    DELETE gets an upload made for it (the others must outlive it), a PUT the open upload's
    empty file (a request without a body is then a whole upload of it)."""
    params = case.path_parameters or {}
    if "upload_id" not in params or not _valid(case, "path"):
        return
    pick = int(hashlib.sha256(str(params["upload_id"]).encode()).hexdigest(), 16)
    if pick % 3 == 0:
        return
    if case.method.upper() == "DELETE":
        made = httpx.post(f"{api['base']}/v1/uploads", json={"files": {"a.txt": 1}}, headers=api["headers"], timeout=30)
        params["upload_id"] = made.json()["id"]
    elif case.path.endswith("/files/{path}"):
        params["upload_id"], params["path"] = api["open_upload"], "empty.txt"
    else:
        params["upload_id"] = (api["open_upload"], api["complete_upload"])[pick % 2]


def _real_sources(case) -> None:
    """Swap a generated source (and calibration URI) for one the server accepts in two cases
    out of three: almost no random string is a URI it takes, and the jobs created are what
    the other routes then list, get and cancel."""
    body = case.body
    if not isinstance(body, dict) or not isinstance(body.get("source"), str) or not _valid(case, "body"):
        return
    pick = int(hashlib.sha256(body["source"].encode()).hexdigest(), 16)
    if pick % 3:
        body["source"] = f"s3://models/fuzz-{pick % 1000}/"
        if isinstance(body.get("calibration_data"), str) and len(body["calibration_data"]) <= 2048:
            body["calibration_data"] = "s3://datasets/calibration/"


@schema.parametrize()
@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_conforms(case, fuzz_api: dict) -> None:
    _real_job(case, fuzz_api)
    _real_upload(case, fuzz_api)
    _real_sources(case)
    response = case.call_and_validate(base_url=fuzz_api["base"], timeout=30)
    STATUSES[case.operation.label][response.status_code] += 1


def test_the_run_got_past_auth_and_lookup() -> None:
    """A run where every request was refused (a wrong key, limits hit, no job found) would
    pass the checks above and test nothing: every operation must have answered 2xx, and
    the job routes 404 as well."""
    if not STATUSES:
        pytest.skip("the fuzz run was not selected")
    for operation in schema.get_all_operations():
        label = operation.ok().label
        assert any(200 <= status < 300 for status in STATUSES[label]), (label, dict(STATUSES[label]))
        if "{job_id}" in label:
            assert STATUSES[label][404] > 0, (label, dict(STATUSES[label]))
    submitted = STATUSES["POST /v1/jobs"]
    assert submitted[202] >= 5, dict(submitted)
