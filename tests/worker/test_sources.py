"""worker.sources: source URI validation, the S3 and Hub sources, and the ObjectStore
destination driving the real engine against moto's S3 server."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from api.errors import http_status
from loftq.errors import LoftQError, SourceNotFound
from service.errors import InvalidSource, ModelTooLarge
from service.locations import FileLocation, HubLocation, S3Location
from service.policy import SourceNotAllowed, SourcePolicy
from service.settings import Settings
from service.storage import LocalObjectStore, S3ObjectStore, StorageUnavailable
from service.uris import parse_source_uri
from worker.sources import HubSource, ObjectStoreDestination, S3Source, open_source


def _files_under(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if not p.is_dir()] if directory.exists() else []


def _bucket(s3_env: str) -> S3ObjectStore:
    store = S3ObjectStore(f"test-{uuid.uuid4().hex[:20]}", endpoint_url=s3_env)
    store.ensure_bucket()
    return store


# --------------------------------------------------------------------------- parse_source_uri


@pytest.fixture
def roots(tmp_path: Path) -> Settings:
    allowed = tmp_path / "models"
    (allowed / "bert").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    return Settings(allowed_file_roots=[allowed])


def test_parse_accepts_supported_uris(roots: Settings, tmp_path: Path) -> None:
    real = os.path.realpath(tmp_path / "models" / "bert")
    assert parse_source_uri(f"file://{tmp_path}/models/bert", roots) == FileLocation(path=real)
    assert parse_source_uri(f"file://{tmp_path}/models/bert/", roots) == FileLocation(path=real)
    assert parse_source_uri(f"FILE://{tmp_path}/models", roots) == FileLocation(path=os.path.realpath(tmp_path / "models"))
    # Need not exist yet (the worker checks that when it opens it), but must be inside a root.
    assert parse_source_uri(f"file://{tmp_path}/models/not%20yet", roots) == FileLocation(path=f"{os.path.realpath(tmp_path / 'models')}/not yet")
    assert parse_source_uri("s3://my-bucket/models/bert", roots) == S3Location(bucket="my-bucket", key="models/bert")
    assert parse_source_uri("s3://my-bucket/models/bert/", roots) == S3Location(bucket="my-bucket", key="models/bert")
    assert parse_source_uri("s3://my.bucket-1", roots) == S3Location(bucket="my.bucket-1", key="")
    assert parse_source_uri("hf://google-bert/bert-base-uncased", roots) == HubLocation(repo="google-bert/bert-base-uncased")
    assert parse_source_uri("hf://Org/Name_1.5@refs/pr/3", roots) == HubLocation(repo="Org/Name_1.5", revision="refs/pr/3")
    assert parse_source_uri("hf://org/name@0123abcd", roots) == HubLocation(repo="org/name", revision="0123abcd")


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("ftp://host/model", "unsupported scheme"),
        ("http://host/model", "unsupported scheme"),
        ("/abs/path", "unsupported scheme"),
        ("models/bert", "unsupported scheme"),
        ("", "empty"),
        ("s3://", "needs a bucket"),
        ("s3:///prefix", "needs a bucket"),
        ("s3://UPPER/x", "not a valid bucket"),
        ("s3://b/../x", "'..'"),
        ("s3://bucket/a/../b", "'..'"),
        ("s3://bucket/a/./b", "'..'"),
        ("s3://bucket/a//b", "empty path segments"),
        ("s3://bucket/a\x00b", "NUL"),
        ("hf://just-a-name", "org/name"),
        ("hf://a/b/c", "org/name"),
        ("hf://org/../x", "org/name"),
        ("hf://org/name@", "not a valid revision"),
        ("hf://org/name@../main", "not a valid revision"),
        ("hf://org/na me", "org/name"),
        ("hf://org/name\x00", "NUL"),
    ],
)
def test_parse_refuses(roots: Settings, uri: str, reason: str) -> None:
    with pytest.raises(InvalidSource, match=reason) as info:
        parse_source_uri(uri, roots)
    assert http_status(info.value) == 422 and info.value.code == "invalid_source"


def test_parse_file_roots(roots: Settings, tmp_path: Path) -> None:
    with pytest.raises(InvalidSource, match="outside the allowed file roots"):
        parse_source_uri(f"file://{tmp_path}/elsewhere", roots)
    with pytest.raises(InvalidSource, match="outside the allowed file roots"):
        parse_source_uri(f"file://{tmp_path}/models-sibling", roots)  # a prefix of the name is not a parent
    with pytest.raises(InvalidSource, match="'..'"):
        parse_source_uri(f"file://{tmp_path}/models/../elsewhere", roots)
    with pytest.raises(InvalidSource, match="'..'"):
        parse_source_uri(f"file://{tmp_path}/models/%2e%2e/elsewhere", roots)
    with pytest.raises(InvalidSource, match="NUL"):
        parse_source_uri(f"file://{tmp_path}/models/a%00b", roots)
    with pytest.raises(InvalidSource, match="absolute"):
        parse_source_uri("file://host/models", roots)
    with pytest.raises(InvalidSource, match="no allowed_file_roots"):
        parse_source_uri(f"file://{tmp_path}/models/bert", Settings(allowed_file_roots=[]))


def test_parse_file_follows_symlinks(roots: Settings, tmp_path: Path) -> None:
    escape = tmp_path / "models" / "escape"
    escape.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InvalidSource, match="outside the allowed file roots"):
        parse_source_uri(f"file://{escape}", roots)
    # A symlink from outside into a root is fine: the real path counts.
    inward = tmp_path / "elsewhere" / "in"
    inward.symlink_to(tmp_path / "models" / "bert")
    assert parse_source_uri(f"file://{inward}", roots) == FileLocation(path=os.path.realpath(tmp_path / "models" / "bert"))


def test_open_source_file_refuses_symlinked_files_leaving_the_roots(roots: Settings, tmp_path: Path) -> None:
    model = tmp_path / "models" / "bert"
    (model / "config.json").write_text("{}")
    (tmp_path / "elsewhere" / "secret").write_text("secret")
    (model / "tokenizer.json").symlink_to(tmp_path / "elsewhere" / "secret")
    # Refused while listing: the name of a file elsewhere is never even read as part of the checkpoint.
    with pytest.raises(LoftQError, match="outside the allowed file roots"):
        open_source(f"file://{model}", roots, tmp_path / "scratch", tenant="default")
    (model / "tokenizer.json").unlink()
    source = open_source(f"file://{model}", roots, tmp_path / "scratch", tenant="default")
    from loftq.storage import LocalSource

    assert isinstance(source, LocalSource)
    assert source.list_files() == ["config.json"]
    with source.open_local("config.json") as path:
        assert path.read_text() == "{}"
    with pytest.raises(InvalidSource):
        open_source("ftp://x/y", roots, tmp_path / "scratch", tenant="default")
    with pytest.raises(ModelTooLarge, match="LOFTQ_MAX_MODEL_BYTES"):
        open_source(f"file://{model}", roots.model_copy(update={"max_model_bytes": 1}), tmp_path / "scratch", tenant="default")
    (model / "tokenizer.json").symlink_to(tmp_path / "elsewhere" / "secret")  # planted after the listing
    with pytest.raises(LoftQError, match="outside the allowed file roots"):
        with source.open_local("tokenizer.json"):
            pass


# --------------------------------------------------------------------------- S3Source


def test_s3_source_lists_relative_names_and_downloads_one_file_at_a_time(s3_env: str, tmp_path: Path) -> None:
    store = _bucket(s3_env)
    src = tmp_path / "f"
    for key, data in [("m/config.json", b"{}"), ("m/sub/tok.json", b"tok"), ("m/", b""), ("mx/other", b"no")]:
        src.write_bytes(data)
        store.upload_file(src, key) if not key.endswith("/") else store.client.put_object(Bucket=store.bucket, Key=key, Body=b"")
    scratch = tmp_path / "scratch"
    settings = Settings(s3_endpoint_url=s3_env)
    source = open_source(f"s3://{store.bucket}/m/", settings, scratch, tenant="default")
    assert isinstance(source, S3Source)
    assert source.name == f"s3://{store.bucket}/m"
    assert source.list_files() == ["config.json", "sub/tok.json"]
    assert source.total_bytes() == 5
    with pytest.raises(ModelTooLarge, match="5 bytes"):  # from the listing, before any download
        open_source(f"s3://{store.bucket}/m/", Settings(s3_endpoint_url=s3_env, max_model_bytes=4), scratch, tenant="default")
    assert _files_under(scratch) == []
    with source.open_local("sub/tok.json") as path:
        assert path.read_bytes() == b"tok"
        assert path.is_relative_to(scratch)
        with source.open_local("config.json") as other:  # nested opens get their own files
            assert other.read_bytes() == b"{}"
        assert len(_files_under(scratch)) == 1
    assert _files_under(scratch) == []
    with pytest.raises(SourceNotFound):
        with source.open_local("missing.json"):
            pass
    # A file deleted after listing, and the scratch file cleaned up after an error in the block.
    store.delete("m/config.json")
    with pytest.raises(SourceNotFound, match="disappeared"):
        with source.open_local("config.json"):
            pass
    with pytest.raises(RuntimeError):
        with source.open_local("sub/tok.json"):
            raise RuntimeError("engine failed")
    assert _files_under(scratch) == []


def test_s3_source_missing(s3_env: str, tmp_path: Path) -> None:
    store = _bucket(s3_env)
    with pytest.raises(SourceNotFound, match="no objects"):
        S3Source(store.bucket, "nothing/here", tmp_path, endpoint_url=s3_env).list_files()
    with pytest.raises(SourceNotFound):
        S3Source("no-such-bucket-" + uuid.uuid4().hex[:8], "x", tmp_path, endpoint_url=s3_env).list_files()


# --------------------------------------------------------------------------- HubSource


def test_hub_source_with_patched_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    calls = []

    def list_repo_files(self, repo_id, *, revision=None, repo_type=None, token=None):
        calls.append(("list", repo_id, revision))
        if repo_id != "org/model":
            import httpx

            request = httpx.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
            raise RepositoryNotFoundError("404 repository not found", response=httpx.Response(404, request=request))
        return ["config.json", "model.safetensors", "tokenizer/vocab.txt"]

    def hf_hub_download(repo_id, filename, *, revision=None, local_dir=None, token=None, **kwargs):
        calls.append(("download", repo_id, filename, revision))
        assert local_dir is not None, "downloads must bypass the shared Hub cache"
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"{repo_id}:{filename}@{revision}".encode())
        (Path(local_dir) / ".cache").mkdir(exist_ok=True)
        (Path(local_dir) / ".cache" / "meta").write_text("x")
        return str(path)

    def model_info(self, repo_id, *, revision=None, files_metadata=False, token=None):
        calls.append(("info", repo_id, revision))
        if repo_id != "org/model":
            list_repo_files(self, repo_id)  # raises the hub's not-found error
        assert files_metadata, "sizes come with the files' metadata"
        sizes = {"config.json": 2, "model.safetensors": 1000, "tokenizer/vocab.txt": 30}
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=name, size=size) for name, size in sizes.items()])

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)

    scratch = tmp_path / "scratch"
    with pytest.raises(ModelTooLarge, match="1032 bytes, above this service's limit of 1000") as refused:
        open_source("hf://org/model@v1", Settings(max_model_bytes=1000), scratch, tenant="default")
    assert refused.value.code == "model_too_large" and http_status(refused.value) == 413
    calls.clear()
    source = open_source("hf://org/model@v1", Settings(), scratch, tenant="default")
    assert isinstance(source, HubSource)
    assert source.name == "org/model"
    assert source.list_files() == ["config.json", "model.safetensors", "tokenizer/vocab.txt"]
    with source.open_local("tokenizer/vocab.txt") as path:
        assert path.read_bytes() == b"org/model:tokenizer/vocab.txt@v1"
        assert path.is_relative_to(scratch)
    assert _files_under(scratch) == []
    assert calls == [("info", "org/model", "v1"), ("list", "org/model", "v1"), ("download", "org/model", "tokenizer/vocab.txt", "v1")]

    with pytest.raises(SourceNotFound):
        with source.open_local("not-listed.bin"):
            pass
    with pytest.raises(SourceNotFound, match="not found"):
        open_source("hf://org/other", Settings(), scratch, tenant="default").list_files()
    assert HubSource("org/model", None, scratch).revision is None


def test_an_unreachable_hub_is_storage_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode and a Hub that refuses connections are the storage's fault, not a missing
    source and not an internal error (huggingface_hub's real errors, no network)."""
    import httpx
    import huggingface_hub
    from huggingface_hub import errors

    def unreachable(self, repo_id, **kwargs):
        raise httpx.ConnectError("[Errno 111] Connection refused")

    for failure in (unreachable, lambda self, repo_id, **kwargs: (_ for _ in ()).throw(errors.OfflineModeIsEnabled("offline"))):
        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", failure)
        with pytest.raises(StorageUnavailable, match="cannot be reached") as refused:
            open_source("hf://org/model", Settings(), tmp_path / "scratch", tenant="default")
        assert refused.value.code == "storage_unavailable" and "hf://org/model" in refused.value.message


# --------------------------------------------------------------------------- ObjectStoreDestination


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_destination_protocol(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = LocalObjectStore(tmp_path / "store") if backend == "local" else _bucket(request.getfixturevalue("s3_env"))
    scratch = tmp_path / "scratch"
    dest = ObjectStoreDestination(store, "jobs/j1", scratch)
    staged = dest.staging_path(".loftq-partial/model.safetensors.json")
    assert staged.is_relative_to(scratch) and staged.parent.is_dir()
    staged.write_text('{"a": 1}')
    dest.publish(".loftq-partial/model.safetensors.json")
    assert _files_under(scratch) == []
    assert dest.read_text(".loftq-partial/model.safetensors.json") == '{"a": 1}'
    assert dest.sha256(".loftq-partial/model.safetensors.json") == hashlib.sha256(b'{"a": 1}').hexdigest()
    assert store.read_bytes("jobs/j1/.loftq-partial/model.safetensors.json") == b'{"a": 1}'
    with dest.open_local(".loftq-partial/model.safetensors.json") as path:
        assert path.read_text() == '{"a": 1}'
    assert _files_under(scratch) == []

    dest.staging_path("manifest.json").write_text("m")
    dest.publish("manifest.json", sha256="cd" * 32)
    if backend == "s3":
        assert dest.sha256("manifest.json") == "cd" * 32  # the engine's hash is stored, not recomputed
    dest.staging_path("manifest.json.bak").write_text("b")
    dest.publish("manifest.json.bak")

    assert dest.read_text("nope.json") is None and dest.sha256("nope.json") is None
    with pytest.raises(SourceNotFound):
        with dest.open_local("nope.json"):
            pass
    dest.remove("manifest.json")
    assert dest.read_text("manifest.json") is None
    assert dest.read_text("manifest.json.bak") == "b"  # remove is exact, not a string prefix
    dest.remove(".loftq-partial")
    assert [o.key for o in store.list("jobs/")] == ["jobs/j1/manifest.json.bak"]
    dest.remove("never-existed")
    for bad in ("../x", "/abs", "a/../../b", "a\x00"):
        with pytest.raises(LoftQError):
            dest.staging_path(bad)
        with pytest.raises(LoftQError):
            dest.remove(bad)
    with pytest.raises(LoftQError, match="never staged"):
        dest.publish("unstaged.json")


# --------------------------------------------------------------------------- the engine end to end


@pytest.fixture(scope="module")
def bert_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny 1-layer BERT saved twice: as one file, and sharded with an index."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(4)
    config = BertConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    model = BertModel(config)
    single, sharded = tmp_path_factory.mktemp("bert-1l"), tmp_path_factory.mktemp("bert-1l-sharded")
    model.save_pretrained(str(single), safe_serialization=True)
    model.save_pretrained(str(sharded), safe_serialization=True, max_shard_size="100KB")
    return {"single": single, "sharded": sharded}


def _upload_dir(store: S3ObjectStore, directory: Path, prefix: str) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            store.upload_file(path, f"{prefix}/{path.relative_to(directory).as_posix()}")


def test_engine_converts_from_s3_to_s3(s3_env: str, bert_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from loftq.converter import convert
    from loftq.options import ConvertOptions

    store = _bucket(s3_env)
    _upload_dir(store, bert_checkpoints["single"], "models/bert")
    source_scratch, dest_scratch = tmp_path / "src-scratch", tmp_path / "dst-scratch"

    source = S3Source(store.bucket, "models/bert", source_scratch, endpoint_url=s3_env)
    destination = ObjectStoreDestination(store, "jobs/j1/output", dest_scratch)
    report = convert(source, destination, ConvertOptions(rank=4))
    assert report.summary.layers == len(report.layers) >= 6 and report.source == f"s3://{store.bucket}/models/bert"

    objects = {o.key.removeprefix("jobs/j1/output/"): o for o in store.list("jobs/j1/output/")}
    assert "manifest.json" in objects
    assert not any(name.startswith(".loftq-partial") for name in objects)  # the journal is cleared
    manifest = json.loads(store.read_bytes("jobs/j1/output/manifest.json"))
    listed = {entry["path"]: entry for entry in manifest["files"]}
    assert {"model.safetensors", "config.json", "loftq_init/adapter_model.safetensors", "loftq_init/adapter_config.json", "loftq_report.json"} <= set(listed)
    assert set(listed) == set(objects) - {"manifest.json"}
    for name, entry in listed.items():
        key = f"jobs/j1/output/{name}"
        data = store.read_bytes(key)
        assert entry["size"] == objects[name].size == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() == store.sha256(key), name
    adapter_config = json.loads(store.read_bytes("jobs/j1/output/loftq_init/adapter_config.json"))
    assert adapter_config["base_model_name_or_path"] == f"s3://{store.bucket}/models/bert"

    assert _files_under(source_scratch) == [] and _files_under(dest_scratch) == []


def test_engine_resumes_through_the_object_store(s3_env: str, bert_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """A cancelled run leaves journal records in the bucket; the next run trusts them (through
    read_text and the sha256 metadata) and converts only the remaining shards."""
    from loftq.converter import convert
    from loftq.errors import Cancelled
    from loftq.options import ConvertOptions

    model = bert_checkpoints["sharded"]
    shards = sorted(p.name for p in model.glob("*.safetensors"))
    assert len(shards) >= 2 and (model / "model.safetensors.index.json").is_file()
    store = _bucket(s3_env)
    _upload_dir(store, model, "m")
    scratch = tmp_path / "scratch"
    source = S3Source(store.bucket, "m", scratch / "src", endpoint_url=s3_env)
    destination = ObjectStoreDestination(store, "out", scratch / "dst")

    shards_done = []
    with pytest.raises(Cancelled):
        convert(
            source,
            destination,
            ConvertOptions(rank=4),
            on_progress=lambda e: shards_done.append(e.shard) if e.stage == "shard" else None,
            should_stop=lambda: bool(shards_done),
        )
    assert store.read_bytes("out/manifest.json") is None
    assert store.list("out/.loftq-partial/")
    assert _files_under(scratch) == []

    report = convert(source, destination, ConvertOptions(rank=4))
    assert report.summary.shards == len(shards) and report.summary.shards_resumed == 1
    manifest = json.loads(store.read_bytes("out/manifest.json"))
    for entry in manifest["files"]:
        assert entry["sha256"] == hashlib.sha256(store.read_bytes(f"out/{entry['path']}")).hexdigest()
    assert {e["path"] for e in manifest["files"]} >= {*shards, "model.safetensors.index.json"}
    assert store.list("out/.loftq-partial/") == []
    assert _files_under(scratch) == []


def test_a_location_parsed_at_submission_is_checked_again_not_trusted(tmp_path: Path) -> None:
    """The job carries its source as parsed at POST; the worker resolves a file path again, so a
    directory swapped for a link to elsewhere meanwhile is refused, and grants are checked anew."""
    models, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    (models / "bert").mkdir(parents=True)
    elsewhere.mkdir()
    settings = Settings(allowed_file_roots=[models])
    parsed = parse_source_uri(f"file://{models}/bert", settings)
    policy = SourcePolicy(settings)
    assert policy.check_source(f"file://{models}/bert", "default", parsed) == parsed
    (models / "bert").rmdir()
    (models / "bert").symlink_to(elsewhere)
    with pytest.raises(InvalidSource, match="outside the allowed file roots"):
        policy.check_source(f"file://{models}/bert", "default", parsed)
    hub = HubLocation(repo="org/model")
    narrowed = SourcePolicy(Settings(tenant_sources={"default": ["hf://other-org/"]}))
    with pytest.raises(SourceNotAllowed):
        narrowed.check_source("hf://org/model", "default", hub)
