"""The source policy (service/policy.py): grants, the service's own data, defaults. Unit tests of
the rules; tests/integration/test_tenant_data.py runs the attacks against the real service."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from service.errors import InvalidSource
from service.policy import Grant, SourceNotAllowed, SourcePolicy, parse_grant
from service.settings import Settings
from service.tenants import hash_key

KEYS = f"team-a:{hash_key('a')},team-b:{hash_key('b')}"


def _policy(tmp_path: Path, **settings) -> SourcePolicy:
    base = {"storage": "s3", "s3_bucket": "artifacts", "local_storage_root": tmp_path / "data" / "artifacts",
            "work_dir": tmp_path / "data" / "work", "data_dir": tmp_path / "data", "allowed_file_roots": [tmp_path]}
    return SourcePolicy(Settings(**{**base, **settings}))


def test_grants_parse_to_whole_segments() -> None:
    assert parse_grant("s3://") == Grant("s3")
    assert parse_grant("s3://models/llama/") == Grant("s3", bucket="models", prefix="llama")
    assert parse_grant("s3://models") == Grant("s3", bucket="models")
    assert parse_grant("hf://") == Grant("hf") and parse_grant("hf://meta-llama/") == Grant("hf", repo="meta-llama")
    assert parse_grant("hf://org/name") == Grant("hf", repo="org/name")
    assert parse_grant("file://") == Grant("file")
    assert parse_grant("file:///srv/models/") == Grant("file", path=os.path.realpath("/srv/models"))
    for bad in ("ftp://x/", "s3://models/../x/", "file://relative/dir", "hf://a/b/c", "models/", "s3://UPPER/"):
        with pytest.raises(ValueError, match="LOFTQ_TENANT_SOURCES"):
            parse_grant(bad)


def test_a_bad_grant_stops_the_service_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="LOFTQ_TENANT_SOURCES entry 'gs://bucket/'"):
        _policy(tmp_path, tenant_sources={"team-a": ["gs://bucket/"]})


def test_environment_takes_json_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOFTQ_TENANT_SOURCES", json.dumps({"*": ["hf://"]}))
    monkeypatch.setenv("LOFTQ_HF_TOKENS", json.dumps({"team-a": "hf_secret"}))
    settings = Settings()
    assert settings.tenant_sources == {"*": ["hf://"]}
    assert settings.hf_tokens["team-a"].get_secret_value() == "hf_secret" and "hf_secret" not in repr(settings)


def test_defaults_open_mode_reads_everything_and_keyed_tenants_only_their_own(tmp_path: Path) -> None:
    for settings in ({}, {"api_keys": KEYS}):  # the same answer where the keys are known (API) and not (worker)
        policy = _policy(tmp_path, **settings)
        policy.check_source("s3://any-bucket/model/", "default")
        policy.check_source("hf://org/name", "default")
        policy.check_source(f"file://{tmp_path}/models", "default")
    keyed = _policy(tmp_path, api_keys=KEYS)
    for uri in ("s3://any-bucket/model/", "hf://org/name", f"file://{tmp_path}/models"):
        with pytest.raises(SourceNotAllowed, match="nothing beyond its own data"):
            keyed.check_source(uri, "team-a")
    keyed.check_source("s3://artifacts/tenants/team-a/inputs/upl_0123456789abcdef0123/", "team-a")
    keyed.check_source("upload://upl_0123456789abcdef0123", "team-a")


def test_grants_match_whole_segments_per_tenant(tmp_path: Path) -> None:
    policy = _policy(
        tmp_path, api_keys=KEYS,
        tenant_sources={"team-a": ["s3://models/a/", "hf://meta-llama/", f"file://{tmp_path}/a/"], "*": ["hf://public/x"]},
    )
    policy.check_source("s3://models/a", "team-a")
    policy.check_source("s3://models/a/llama/", "team-a")
    policy.check_source("hf://meta-llama/Llama-3-8B@main", "team-a")
    policy.check_source(f"file://{tmp_path}/a/model", "team-a")
    policy.check_source("hf://public/x", "team-b")  # the "*" entry
    refused = [("s3://models/ab/", "team-a"), ("s3://models/", "team-a"), ("s3://other/a/", "team-a"),
               ("hf://meta-llama-fake/x", "team-a"), (f"file://{tmp_path}/ab", "team-a"), ("hf://public/y", "team-b"),
               ("s3://models/a/", "team-b")]
    for uri, tenant in refused:
        with pytest.raises(SourceNotAllowed):
            policy.check_source(uri, tenant)


def test_artifact_bucket_is_only_its_owners(tmp_path: Path) -> None:
    policy = _policy(tmp_path, api_keys=KEYS, tenant_sources={"*": ["s3://"]})
    policy.check_source("s3://artifacts/tenants/team-a/jobs/job_1/", "team-a")
    for uri in ("s3://artifacts/tenants/team-b/jobs/job_1/", "s3://artifacts/", "s3://artifacts/tenants", "s3://artifacts/jobs/x/"):
        with pytest.raises(SourceNotAllowed, match="other tenants' data"):
            policy.check_source(uri, "team-a")
    with pytest.raises(SourceNotAllowed):
        policy.check_calibration("s3://artifacts/tenants/team-b/data.txt", "team-a")
    open_api = _policy(tmp_path)
    open_api.check_source("s3://artifacts/jobs/job_1/", "default")
    for uri in ("s3://artifacts/", "s3://artifacts/tenants/team-a/"):
        with pytest.raises(SourceNotAllowed):
            open_api.check_source(uri, "default")
    local = _policy(tmp_path, storage="local")  # the bucket that has the artifact bucket's name is just a bucket then
    local.check_source("s3://artifacts/tenants/team-a/", "default")


def test_the_services_own_directories_are_nobodys_source(tmp_path: Path) -> None:
    policy = _policy(tmp_path)
    (tmp_path / "data" / "redis").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "data" / "artifacts", target_is_directory=True)
    for path in ("data", "data/redis", "data/artifacts/jobs/x", "data/work", "link", ""):
        with pytest.raises(SourceNotAllowed, match="service's own files"):
            policy.check_source(f"file://{tmp_path}/{path}", "default")
    with pytest.raises(SourceNotAllowed, match="service's own files"):
        policy.check_calibration(f"file://{tmp_path}/data/redis/appendonly.aof", "default")
    policy.check_source(f"file://{tmp_path}/models", "default")


def test_uri_parsing_still_comes_first(tmp_path: Path) -> None:
    policy = _policy(tmp_path)
    with pytest.raises(InvalidSource, match="U\\+202E"):
        policy.check_source("s3://models/\u202egnp.exe", "default")
    with pytest.raises(InvalidSource, match="upload://<id>"):
        policy.check_source("upload://../x", "default")


def test_hub_tokens_are_the_tenants_or_none(tmp_path: Path) -> None:
    policy = _policy(tmp_path, hf_tokens={"team-a": "hf_a"})
    assert policy.hub_token("team-a") == "hf_a"
    assert policy.hub_token("team-b") is False  # anonymous: huggingface_hub's None would use the worker's login
