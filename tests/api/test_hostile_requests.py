"""Hostile and broken ``POST /v1/jobs`` requests, through the real app against a real
Redis-compatible server: each is refused before a job exists, with its status and code in
the one error body. What only the model can decide (a rank above a layer's size, target
names it lacks) is accepted here and fails the job (tests/worker/test_hostile_jobs.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import api_app
from fastapi.testclient import TestClient

from api.errors import http_status
from service.errors import InvalidRequest, MalformedJson, request_validation_error

SOURCE = "s3://models/llama/"


@pytest.fixture
def api(redis_url: str, tmp_path: Path) -> Iterator[TestClient]:
    roots = tmp_path / "models"
    (roots / "bert").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    app = api_app(redis_url, tmp_path, "hostile", allowed_file_roots=[roots])
    with TestClient(app, raise_server_exceptions=False) as client:
        client.tmp = tmp_path
        yield client


def _refused(api: TestClient, body: object, status: int, code: str, needle: str) -> None:
    response = api.post("/v1/jobs", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and needle in error["message"], error
    assert api.get("/v1/jobs").json()["jobs"] == []  # nothing was created


# --------------------------------------------------------------------------- bodies that are not JSON


def test_validation_problems_map_to_malformed_json_or_invalid_request() -> None:
    broken = request_validation_error(
        [{"type": "json_invalid", "loc": ("body", 22), "msg": "JSON decode error", "ctx": {"error": "Expecting ',' delimiter"}}]
    )
    assert isinstance(broken, MalformedJson) and (http_status(broken), broken.code) == (400, "malformed_json")
    assert broken.message == "the body is not valid JSON: Expecting ',' delimiter (at character 22)"
    fields = request_validation_error(
        [{"type": "greater_than_equal", "loc": ("body", "options", "rank"), "msg": "Input should be greater than or equal to 1"},
         {"type": "missing", "loc": ("body", "source"), "msg": "Field required"}]
    )
    assert isinstance(fields, InvalidRequest) and (http_status(fields), fields.code) == (422, "invalid_request")
    assert fields.message == "body.options.rank: Input should be greater than or equal to 1; body.source: Field required"


MALFORMED = {
    "truncated": b'{"source": "s3://models/llama/"',
    "not json": b"source=s3://models/llama/",
    "trailing comma": b'{"source": "s3://models/llama/",}',
    "not utf-8": b'{"source": "s3://models/\xff/"}',
    "nested beyond the parser": b"[" * 100_000 + b"]" * 100_000,
    "integer beyond the parser": b'{"source": "s3://models/llama/", "options": {"rank": ' + b"9" * 5000 + b"}}",
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_bodies_are_400_malformed_json(api: TestClient, case: str) -> None:
    response = api.post("/v1/jobs", content=MALFORMED[case], headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "malformed_json"


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_bodies_are_refused_with_the_error_shape(api: TestClient, case: str) -> None:
    """Whatever the mapping, never a 5xx, never FastAPI's ``detail`` body, never a job."""
    response = api.post("/v1/jobs", content=MALFORMED[case], headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 422), response.text
    assert set(response.json()) == {"error"} and response.json()["error"]["code"]
    assert api.get("/v1/jobs").json()["jobs"] == []


@pytest.mark.parametrize("body", [[], "s3://models/llama/", None, 7, {"source": SOURCE, "options": []}])
def test_json_that_is_not_a_request_object_is_invalid_request(api: TestClient, body: object) -> None:
    _refused(api, body, 422, "invalid_request", "valid dictionary")


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"rank": 0}, "options.rank"),
        ({"rank": -4}, "options.rank"),
        ({"rank": 1.5}, "options.rank"),
        ({"rank": "sixteen"}, "options.rank"),
        ({"lora_alpha": 0}, "options.lora_alpha"),
        ({"iters": 0}, "options.iters"),
        ({"quant": "q7"}, "options.quant"),
        ({"quant": "nf4", "bits": 3}, "4-bit format, got bits=3"),
        ({"quant": "int", "bits": 9}, "options.bits"),
        ({"quant": "int", "bits": 1}, "options.bits"),
        ({"quant": "int8", "bits": 4}, "8-bit format, got bits=4"),
        ({"quant": "int8", "backbone_format": "bnb-4bit"}, "bnb-4bit"),
        ({"target_modules": []}, "options.target_modules"),
        ({"target_modules": ["q_proj", " "]}, "options.target_modules"),
        ({"target_modules": ""}, "options.target_modules"),
        ({"target_modules": 5}, "options.target_modules"),
        ({"bogus": 1}, "options.bogus"),
    ],
)
def test_invalid_options_are_422_naming_the_field(api: TestClient, options: dict, field: str) -> None:
    _refused(api, {"source": SOURCE, "options": options}, 422, "invalid_request", field)


def test_a_bad_rank_is_named_as_itself(api: TestClient) -> None:
    response = api.post("/v1/jobs", json={"source": SOURCE, "options": {"rank": 1.5}})
    assert "lora_alpha" not in response.json()["error"]["message"]


def test_a_rank_sent_as_a_float_is_that_integer(api: TestClient) -> None:
    response = api.post("/v1/jobs", json={"source": SOURCE, "options": {"rank": 8.0}})
    assert response.status_code == 202, response.text
    assert response.json()["request"]["options"]["rank"] == 8
    assert response.json()["request"]["options"]["lora_alpha"] == 8.0


def test_a_fixed_width_quantizer_without_bits_gets_its_own(api: TestClient) -> None:
    response = api.post("/v1/jobs", json={"source": SOURCE, "options": {"quant": "int8"}})
    assert response.status_code == 202, response.text
    assert response.json()["request"]["options"]["bits"] == 8


def test_what_only_the_model_decides_is_accepted_and_left_to_the_job(api: TestClient) -> None:
    for options in ({"rank": 60_000}, {"target_modules": ["no_such_module"]}, {"target_modules": r"nothing\.matches.*"}):
        response = api.post("/v1/jobs", json={"source": SOURCE, "options": options})
        assert response.status_code == 202, response.text
        assert response.json()["state"] == "queued"


# --------------------------------------------------------------------------- sources


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        ("ftp://host/model", "ftp"),
        ("http://host/model", "http"),
        ("https://huggingface.co/org/name", "https"),
        ("gs://bucket/model", "gs"),
        ("az://container/model", "az"),
        ("data:application/octet-stream;base64,AAAA", "data"),
        ("mailto:someone@example.com", "mailto"),
        ("/models/bert", "(none)"),
        ("models/bert", "(none)"),
    ],
)
def test_other_schemes_are_invalid_source(api: TestClient, source: str, shown: str) -> None:
    _refused(api, {"source": source}, 422, "invalid_source", f"unsupported scheme {shown};")


def test_a_supported_scheme_without_slashes_says_so(api: TestClient) -> None:
    _refused(api, {"source": "s3:/bucket/model"}, 422, "invalid_source", "'//' is missing after 's3:'")
    _refused(api, {"source": "file:/models/bert"}, 422, "invalid_source", "'//' is missing after 'file:'")


def test_file_uris_outside_the_allowed_roots(api: TestClient) -> None:
    roots, elsewhere = api.tmp / "models", api.tmp / "elsewhere"
    (roots / "escape").symlink_to(elsewhere)
    for source, needle in [
        ("file:///etc", "outside the allowed file roots"),
        (f"file://{elsewhere}", "outside the allowed file roots"),
        (f"file://{roots}-sibling", "outside the allowed file roots"),
        (f"file://{roots}/escape", "outside the allowed file roots"),
        (f"file://{roots}/../elsewhere", "'..'"),
        (f"file://{roots}/%2e%2e/elsewhere", "'..'"),
        (f"file://{roots}/a%00b", "NUL"),
        (f"file://{roots}/bert?x=1", "query strings"),
        ("file://host/models/bert", "absolute"),
    ]:
        _refused(api, {"source": source}, 422, "invalid_source", needle)


def test_file_uris_when_no_roots_are_configured(redis_url: str, tmp_path: Path) -> None:
    with TestClient(api_app(redis_url, tmp_path, "hostile", allowed_file_roots=[])) as api:
        _refused(api, {"source": f"file://{tmp_path}"}, 422, "invalid_source", "file:// URIs are disabled")


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("s3://models/a/../b", "'..'"),
        ("s3://models/a\x00b", "NUL"),
        ("s3://models/a\nb", "control characters"),
        ("s3://../x", "not a valid bucket"),
        ("hf://org/../name", "org/name"),
        ("hf://org/name@../main", "not a valid revision"),
    ],
)
def test_object_keys_and_repositories_with_dot_dot_or_nul(api: TestClient, source: str, needle: str) -> None:
    _refused(api, {"source": source}, 422, "invalid_source", needle)


def test_a_source_too_long_to_be_a_uri_is_invalid_request(api: TestClient) -> None:
    _refused(api, {"source": "s3://models/" + "a/" * 2000}, 422, "invalid_request", "body.source")


def test_a_file_source_that_does_not_exist_yet_is_left_to_the_job(api: TestClient) -> None:
    """Inside the roots but missing: the worker opens it and fails the job with source_not_found."""
    response = api.post("/v1/jobs", json={"source": f"file://{api.tmp}/models/not-there"})
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("output", ["../other", "/abs/out", "a/../../b", "a\x00b", "jobs/someone-else/", "a//b"])
def test_output_prefixes_with_dot_dot_absolute_or_nul(api: TestClient, output: str) -> None:
    response = api.post("/v1/jobs", json={"source": SOURCE, "output": output})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and "body.output" in error["message"], error


def test_nothing_is_queued_for_a_refused_request(api: TestClient) -> None:
    for body in ({"source": "ftp://x/y"}, {"source": SOURCE, "options": {"rank": 0}}):
        api.post("/v1/jobs", json=body)
    api.post("/v1/jobs", content=json.dumps({"source": SOURCE})[:-1], headers={"Content-Type": "application/json"})
    assert api.get("/v1/jobs").json()["jobs"] == []


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (b'{"rank": ' + b"9" * 401 + b"}", "options.rank"),  # beyond any float: no overflow inside validation
        (b'{"rank": 65537}', "options.rank"),
        (b'{"lora_alpha": Infinity}', "options.lora_alpha"),
        (b'{"lora_alpha": NaN}', "options.lora_alpha"),
        (b'{"damping": -Infinity}', "options.damping"),
        (b'{"target_modules": "(q|k"}', "options.target_modules"),
    ],
    ids=["rank beyond a float", "rank beyond any layer", "infinite alpha", "NaN alpha", "infinite damping", "invalid regex"],
)
def test_options_no_model_can_use_are_422_naming_the_field(api: TestClient, options: bytes, field: str) -> None:
    body = b'{"source": "s3://models/llama/", "options": ' + options + b"}"
    response = api.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and field in error["message"], error
    assert api.get("/v1/jobs").json()["jobs"] == []
