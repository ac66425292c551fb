"""``calibration_data`` in job requests: URI parsing, the options that require it, and the
422s of ``POST /v1/jobs`` (through the real app against a real Redis-compatible server)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import api_app
from fastapi.testclient import TestClient

from api.errors import http_status
from loftq.options import RefineOptions
from service.errors import InvalidCalibrationSource, InvalidRequest
from service.models import Job, JobCreate, JobSummary, Progress
from service.settings import Settings
from service.uris import CalibrationLocation, check_job_inputs, needs_calibration_data, parse_calibration_uri


@pytest.fixture
def roots(tmp_path: Path) -> Settings:
    allowed = tmp_path / "data"
    (allowed / "calib").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    return Settings(allowed_file_roots=[allowed])


# --------------------------------------------------------------------------- parse_calibration_uri


def test_parse_accepts_objects_prefixes_and_files(roots: Settings, tmp_path: Path) -> None:
    assert parse_calibration_uri("s3://datasets/wiki/train.txt", roots) == CalibrationLocation(scheme="s3", bucket="datasets", key="wiki/train.txt")
    assert parse_calibration_uri("s3://datasets/c4.JSONL", roots) == CalibrationLocation(scheme="s3", bucket="datasets", key="c4.JSONL")
    assert parse_calibration_uri("s3://datasets/wiki/", roots) == CalibrationLocation(scheme="s3", bucket="datasets", key="wiki", prefix=True)
    assert parse_calibration_uri("s3://datasets/", roots) == CalibrationLocation(scheme="s3", bucket="datasets", key="", prefix=True)
    assert parse_calibration_uri("s3://datasets", roots) == CalibrationLocation(scheme="s3", bucket="datasets", key="", prefix=True)
    real = os.path.realpath(tmp_path / "data" / "calib")
    assert parse_calibration_uri(f"file://{tmp_path}/data/calib", roots) == CalibrationLocation(scheme="file", path=real)
    assert parse_calibration_uri(f"file://{tmp_path}/data/calib/a%20b.txt", roots).path == f"{real}/a b.txt"


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("", "empty"),
        ("hf://org/dataset", "unsupported scheme hf"),
        ("https://example.com/calib.txt", "unsupported scheme https"),
        ("/abs/calib.txt", "unsupported scheme"),
        ("s3://", "needs a bucket"),
        ("s3://UPPER/calib.txt", "not a valid bucket"),
        ("s3://datasets/a/../calib.txt", "'..'"),
        ("s3://datasets/a//calib.txt", "empty path segments"),
        ("s3://datasets/calib.txt?versionId=1", "query strings"),
        ("s3://datasets/calib.csv", "must name a .txt or .jsonl object"),
        ("s3://datasets/wiki", "end with /"),
        ("s3://datasets/calib\x00.txt", "NUL"),
        ("file://host/calib.txt", "absolute"),
    ],
)
def test_parse_refuses(roots: Settings, uri: str, reason: str) -> None:
    with pytest.raises(InvalidCalibrationSource, match=reason) as info:
        parse_calibration_uri(uri, roots)
    assert http_status(info.value) == 422 and info.value.code == "invalid_calibration_data"
    assert info.value.message.startswith("calibration_data: ")


def test_parse_file_follows_the_source_rules(roots: Settings, tmp_path: Path) -> None:
    with pytest.raises(InvalidCalibrationSource, match="outside the allowed file roots"):
        parse_calibration_uri(f"file://{tmp_path}/elsewhere/calib.txt", roots)
    with pytest.raises(InvalidCalibrationSource, match="'..'"):
        parse_calibration_uri(f"file://{tmp_path}/data/%2e%2e/elsewhere", roots)
    (tmp_path / "data" / "escape").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InvalidCalibrationSource, match="outside the allowed file roots"):
        parse_calibration_uri(f"file://{tmp_path}/data/escape", roots)
    with pytest.raises(InvalidCalibrationSource, match="no allowed_file_roots"):
        parse_calibration_uri(f"file://{tmp_path}/data/calib", Settings(allowed_file_roots=[]))


# --------------------------------------------------------------------------- options that need it


@pytest.mark.parametrize(
    ("options", "needed"),
    [
        ({}, False),
        ({"objective": "weight"}, False),
        ({"calibration": {"samples": 8}}, False),  # settings alone do not ask for calibration
        ({"objective": "activation"}, True),
        ({"objective": "activation-diag"}, True),
        ({"calibration": {"evaluate": True}}, True),
        ({"refinement": {"steps": 5}}, False),  # refinement settings alone do not switch it on
        ({"refine": "none"}, False),
        ({"refine": "block"}, True),
        ({"refine": "model"}, True),
        ({"refine": "block+model"}, True),
    ],
)
def test_which_options_need_calibration_data(roots: Settings, options: dict, needed: bool) -> None:
    request = JobCreate(source="s3://models/x/", options=options)
    assert (needs_calibration_data(request) is not None) is needed
    if needed:
        with pytest.raises(InvalidRequest, match="^calibration_data: required: .*add calibration_data") as info:
            check_job_inputs(request, roots)
        assert http_status(info.value) == 422 and info.value.code == "invalid_request"
        check_job_inputs(request.model_copy(update={"calibration_data": "s3://datasets/calib.txt"}), roots)
    else:
        check_job_inputs(request, roots)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"objective": "activation"}, "options.objective='activation' fits each layer in the metric of its calibration inputs"),
        ({"refine": "block"}, "options.refine='block' refines the adapters on calibration text"),
        ({"calibration": {"evaluate": True}}, "options.calibration.evaluate measures the model on held-out calibration text"),
    ],
)
def test_the_reason_is_the_options_own_named_by_its_path(options: dict, reason: str) -> None:
    """``ConvertOptions.calibration_reason`` says why; the API names the field as it is in the request."""
    request = JobCreate(source="s3://models/x/", options=options)
    assert needs_calibration_data(request) == reason
    assert request.options.calibration_reason in reason


def test_calibration_data_is_kept_with_the_job_and_old_records_still_load() -> None:
    body = {"source": "s3://models/x/", "calibration_data": "s3://datasets/calib.txt", "options": {"objective": "activation"}}
    assert JobCreate.model_validate(body).calibration_data == "s3://datasets/calib.txt"
    # A record written before calibration existed (and one with options that now need it) still loads.
    old = {"id": "job_1", "state": "failed", "created_at": "2024-05-01T12:00:00Z", "output": "jobs/job_1/",
           "request": {"source": "s3://models/x/", "options": {"objective": "activation"}}}
    assert Job.model_validate(old).request.calibration_data is None
    assert Progress().blocks_done == Progress().blocks_total == 0
    assert JobSummary(layers=1, mean_error_quant=0.2, mean_error=0.1, seconds=1.0).evaluation is None


# --------------------------------------------------------------------------- POST /v1/jobs


@pytest.fixture
def api(redis_url: str, tmp_path: Path) -> TestClient:
    roots = tmp_path / "data"
    (roots / "calib").mkdir(parents=True)
    with TestClient(api_app(redis_url, tmp_path, "calib", allowed_file_roots=[roots])) as client:
        client.roots = roots
        yield client


def test_post_keeps_calibration_data_and_returns_it(api: TestClient) -> None:
    body = {
        "source": "s3://models/llama/",
        "calibration_data": "s3://datasets/calib/",
        "options": {"objective": "activation", "calibration": {"samples": 8, "seq_len": 32, "evaluate": True}},
    }
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["request"]["calibration_data"] == "s3://datasets/calib/"
    assert job["progress"]["blocks_done"] == job["progress"]["blocks_total"] == 0
    stored = api.get(f"/v1/jobs/{job['id']}").json()
    assert stored["request"]["calibration_data"] == "s3://datasets/calib/"
    assert stored["request"]["options"]["calibration"]["samples"] == 8
    file_uri = f"file://{api.roots}/calib"
    assert api.post("/v1/jobs", json={**body, "calibration_data": file_uri}).status_code == 202
    plain = api.post("/v1/jobs", json={"source": "s3://models/llama/"}).json()
    assert plain["request"]["calibration_data"] is None


@pytest.mark.parametrize(
    ("body", "code", "needle"),
    [
        ({"options": {"objective": "activation"}}, "invalid_request", "calibration_data: required"),
        ({"options": {"calibration": {"evaluate": True}}}, "invalid_request", "calibration_data: required"),
        ({"calibration_data": "hf://org/data"}, "invalid_calibration_data", "calibration_data: "),
        ({"calibration_data": "s3://datasets/a/../b.txt"}, "invalid_calibration_data", "'..'"),
        ({"calibration_data": "s3://datasets/calib.parquet"}, "invalid_calibration_data", ".txt or .jsonl"),
        ({"calibration_data": "file:///etc/passwd"}, "invalid_calibration_data", "outside the allowed file roots"),
        ({"calibration_data": ""}, "invalid_calibration_data", "empty"),
        ({"calibration_data": 7}, "invalid_request", "calibration_data"),
        ({"options": {"objective": "hessian"}, "calibration_data": "s3://d/c.txt"}, "invalid_request", "objective"),
        ({"options": {"calibration": {"samples": 0}}}, "invalid_request", "samples"),
        ({"options": {"calibration": {"propagation": "sideways"}}}, "invalid_request", "propagation"),
        ({"options": {"refine": "bogus"}, "calibration_data": "s3://d/c.txt"}, "invalid_request", "options.refine: Input should be 'none', 'block', 'model' or 'block+model'"),
        ({"options": {"refine": "block"}}, "invalid_request", "calibration_data: required: options.refine='block' refines the adapters on calibration text"),
        ({"options": {"refinement": {"holdout": 1.0}}}, "invalid_request", "options.refinement.holdout"),
        ({"options": {"refinement": {"steps": 0, "lr": "fast"}}}, "invalid_request", "options.refinement.lr"),
        ({"options": {"refinement": {"epochs": 3}}}, "invalid_request", "options.refinement.epochs"),
        ({"options": {"refine": "model"}, "distributed": True}, "invalid_request", "a distributed job needs options.refine='none', not 'model'"),
    ],
)
def test_post_refuses_bad_calibration_requests(api: TestClient, body: dict, code: str, needle: str) -> None:
    response = api.post("/v1/jobs", json={"source": "s3://models/llama/", **body})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code and needle in error["message"], error


def test_post_keeps_the_refinement_options(api: TestClient) -> None:
    body = {"source": "s3://models/llama/", "calibration_data": "s3://datasets/calib/",
            "options": {"objective": "activation", "refine": "block+model", "refinement": {"steps": 50, "model_lr": 1e-5}}}
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    options = api.get(f"/v1/jobs/{response.json()['id']}").json()["request"]["options"]
    assert options["refine"] == "block+model"
    assert options["refinement"] == {**RefineOptions().model_dump(), "steps": 50, "model_lr": 1e-5}


def test_a_bad_source_is_still_reported_first(api: TestClient) -> None:
    response = api.post("/v1/jobs", json={"source": "ftp://x/y", "calibration_data": "hf://a/b"})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_source"
