"""service.storage: the local and S3 artifact stores behave alike (S3 against moto's real HTTP
server on loopback), keys cannot escape, S3 uploads are multipart above the threshold and
carry their sha256, presigned URLs serve the bytes."""

from __future__ import annotations

import hashlib
import os
import urllib.request
import uuid
from pathlib import Path

import pytest

from loftq.errors import LoftQError
from service.settings import Settings
from service.storage import (
    LocalObjectStore,
    S3ObjectStore,
    StoredObject,
    UnsafeKey,
    safe_key,
    store_from_settings,
)


def _bucket() -> str:
    return f"test-{uuid.uuid4().hex[:20]}"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "local":
        return LocalObjectStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_env")
    s3 = S3ObjectStore(_bucket(), endpoint_url=endpoint)
    s3.ensure_bucket()
    return s3


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_upload_download_read_and_sha256(store, tmp_path: Path) -> None:
    data = os.urandom(1000)
    src = _file(tmp_path / "src.bin", data)
    store.upload_file(src, "jobs/a/model.safetensors")
    assert store.read_bytes("jobs/a/model.safetensors") == data
    assert store.sha256("jobs/a/model.safetensors") == hashlib.sha256(data).hexdigest()

    out = tmp_path / "deep" / "out.bin"
    store.download_file("jobs/a/model.safetensors", out)
    assert out.read_bytes() == data
    with store.open_read("jobs/a/model.safetensors") as f:
        assert f.read() == data


def test_missing_objects(store, tmp_path: Path) -> None:
    assert store.read_bytes("jobs/none/x.json") is None
    assert store.sha256("jobs/none/x.json") is None
    assert store.list("jobs/none/") == []
    with pytest.raises(FileNotFoundError):
        store.download_file("jobs/none/x.json", tmp_path / "x.json")
    with pytest.raises(FileNotFoundError):
        store.open_read("jobs/none/x.json")
    store.delete("jobs/none/x.json")  # no error
    store.delete_prefix("jobs/none/")


def test_list_is_complete_and_sorted_and_delete_prefix_is_exact(store, tmp_path: Path) -> None:
    src = _file(tmp_path / "f", b"abc")
    keys = ["jobs/a/b.txt", "jobs/a/a.txt", "jobs/a/sub/c.txt", "jobs/ab/d.txt", "other/e.txt"]
    for key in keys:
        store.upload_file(src, key)
    assert store.list("jobs/a/") == [StoredObject(k, 3) for k in ["jobs/a/a.txt", "jobs/a/b.txt", "jobs/a/sub/c.txt"]]
    assert [o.key for o in store.list("jobs/a")] == ["jobs/a/a.txt", "jobs/a/b.txt", "jobs/a/sub/c.txt", "jobs/ab/d.txt"]
    assert len(store.list("")) == 5

    store.delete_prefix("jobs/a/")
    assert [o.key for o in store.list("")] == ["jobs/ab/d.txt", "other/e.txt"]
    store.delete("other/e.txt")
    assert [o.key for o in store.list("")] == ["jobs/ab/d.txt"]
    with pytest.raises(UnsafeKey):
        store.delete_prefix("")


def test_overwrite_replaces_content_and_hash(store, tmp_path: Path) -> None:
    store.upload_file(_file(tmp_path / "1", b"one"), "k/v")
    store.upload_file(_file(tmp_path / "2", b"two!"), "k/v")
    assert store.read_bytes("k/v") == b"two!"
    assert store.sha256("k/v") == hashlib.sha256(b"two!").hexdigest()
    assert store.list("k/") == [StoredObject("k/v", 4)]


@pytest.mark.parametrize("backend", ["local", "s3"])
@pytest.mark.parametrize("key", ["", "/abs", "../x", "a/../../x", "a/..", "a\x00b", "a//b", "./a", "a/", ".", "a\\..\\b"])
def test_unsafe_keys_are_refused(backend: str, tmp_path: Path, key: str) -> None:
    # Refused before any request: the S3 store points at a closed port.
    store = LocalObjectStore(tmp_path / "store") if backend == "local" else S3ObjectStore("b-unused", endpoint_url="http://127.0.0.1:9")
    src = _file(tmp_path / "f", b"x")
    with pytest.raises(UnsafeKey) as info:
        store.upload_file(src, key)
    assert isinstance(info.value, ValueError) and isinstance(info.value, LoftQError)
    for call in (store.read_bytes, store.sha256, store.open_read, store.delete):
        with pytest.raises(UnsafeKey):
            call(key)
    with pytest.raises(UnsafeKey):
        store.download_file(key, tmp_path / "out")
    with pytest.raises(UnsafeKey):
        store.presigned_url(key, 60)


def test_safe_key_accepts_ordinary_keys() -> None:
    for key in ["a", "jobs/1/model-00001-of-00002.safetensors", ".loftq-partial/x.json", "a..b/c"]:
        assert safe_key(key) == key


def test_local_store_refuses_symlink_out_of_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    store = LocalObjectStore(tmp_path / "root")
    (store.root / "link").symlink_to(outside)
    with pytest.raises(UnsafeKey):
        store.read_bytes("link/secret")
    with pytest.raises(UnsafeKey):
        store.open_read("link/secret")


def test_local_store_specifics(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "root")
    assert store.ping()
    assert store.presigned_url("a/b", 60) is None
    store.upload_file(_file(tmp_path / "f", b"x"), "a/b/c")
    store.delete_prefix("a/")
    assert list(store.root.iterdir()) == []  # emptied directories are pruned


def test_s3_presigned_url_serves_the_bytes(s3_env: str, tmp_path: Path) -> None:
    store = S3ObjectStore(_bucket(), endpoint_url=s3_env)
    store.ensure_bucket()
    store.ensure_bucket()  # idempotent
    data = os.urandom(4096)
    store.upload_file(_file(tmp_path / "f", data), "jobs/j/loftq_init/adapter_model.safetensors")
    url = store.presigned_url("jobs/j/loftq_init/adapter_model.safetensors", 300)
    assert url and url.startswith(s3_env) and "Signature" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == data


def test_s3_sha256_comes_from_metadata(s3_env: str, tmp_path: Path) -> None:
    store = S3ObjectStore(_bucket(), endpoint_url=s3_env)
    store.ensure_bucket()
    src = _file(tmp_path / "f", b"payload")
    store.upload_file(src, "given", sha256="ab" * 32)
    assert store.client.head_object(Bucket=store.bucket, Key="given")["Metadata"]["sha256"] == "ab" * 32
    assert store.sha256("given") == "ab" * 32  # trusted, not recomputed
    store.upload_file(src, "computed")
    assert store.client.head_object(Bucket=store.bucket, Key="computed")["Metadata"]["sha256"] == hashlib.sha256(b"payload").hexdigest()
    # An object written by someone else (no metadata) is hashed as a stream.
    store.client.put_object(Bucket=store.bucket, Key="foreign", Body=b"payload")
    assert store.sha256("foreign") == hashlib.sha256(b"payload").hexdigest()


def test_s3_multipart_upload_above_threshold(s3_env: str, tmp_path: Path) -> None:
    store = S3ObjectStore(_bucket(), endpoint_url=s3_env, multipart_threshold=5 * 2**20)
    store.ensure_bucket()
    data = os.urandom(12 * 2**20)
    store.upload_file(_file(tmp_path / "big", data), "big.safetensors")
    head = store.client.head_object(Bucket=store.bucket, Key="big.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # three 5 MiB parts (5 + 5 + 2)
    assert head["ContentLength"] == len(data)
    assert store.sha256("big.safetensors") == hashlib.sha256(data).hexdigest()
    out = tmp_path / "back"
    store.download_file("big.safetensors", out)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()

    small = S3ObjectStore(store.bucket, endpoint_url=s3_env)  # default 64 MiB threshold: one PUT
    small.upload_file(_file(tmp_path / "small", data[: 6 * 2**20]), "small")
    assert "-" not in small.client.head_object(Bucket=store.bucket, Key="small")["ETag"]


def test_s3_list_paginates(s3_env: str, tmp_path: Path) -> None:
    store = S3ObjectStore(_bucket(), endpoint_url=s3_env)
    store.ensure_bucket()
    for i in range(7):
        store.client.put_object(Bucket=store.bucket, Key=f"p/{i:02d}", Body=b"x" * i)
    calls = []
    real = store.client.get_paginator

    class SmallPages:
        def __init__(self, paginator):
            self.paginator = paginator

        def paginate(self, **kwargs):
            calls.append(kwargs)
            return self.paginator.paginate(**kwargs, PaginationConfig={"PageSize": 3})

    store.client.get_paginator = lambda name: SmallPages(real(name))
    assert store.list("p/") == [StoredObject(f"p/{i:02d}", i) for i in range(7)]
    assert calls
    store.delete_prefix("p/")
    assert store.list("p/") == []


def test_s3_ping_and_missing_bucket(s3_env: str, tmp_path: Path) -> None:
    store = S3ObjectStore(_bucket(), endpoint_url=s3_env)
    assert store.ping() is False
    store.ensure_bucket()
    assert store.ping() is True
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url="http://127.0.0.1:9", config=Config(retries={"total_max_attempts": 1}))
    assert S3ObjectStore("nowhere", client=client).ping() is False


def test_store_from_settings(tmp_path: Path, s3_env: str) -> None:
    local = store_from_settings(Settings(storage="local", local_storage_root=tmp_path / "a"))
    assert isinstance(local, LocalObjectStore) and local.root == tmp_path / "a"
    s3 = store_from_settings(Settings(storage="s3", s3_bucket="b-settings", s3_endpoint_url=s3_env, s3_region="us-east-1"))
    assert isinstance(s3, S3ObjectStore) and s3.bucket == "b-settings"
    assert s3.client.meta.endpoint_url == s3_env


def test_no_torch_import() -> None:
    import subprocess
    import sys

    code = "import sys, service.storage, worker.sources; assert 'torch' not in sys.modules, 'torch imported'"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
