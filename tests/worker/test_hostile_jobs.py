"""Hostile and broken sources as jobs: the real runner and the real engine in this process,
a real Redis-compatible server, local storage. Each job fails with the engine's (or the
service's) code in ``error.code`` before any artifact is published; none is internal_error."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from loftq.errors import UnsafePath
from service.models import JobCreate, JobState
from service.settings import Settings
from service.store import JobStore
from worker.runner import JobRunner
from worker.sources import HubSource, S3Source

INDEX = "model.safetensors.index.json"


class Env:
    def __init__(self, redis_url: str, tmp_path: Path, llama: Path, bert: Path) -> None:
        self.tmp, self.llama, self.bert = tmp_path, llama, bert
        self.models = tmp_path / "models"
        self.models.mkdir()
        self.artifacts = tmp_path / "artifacts"
        self.settings = Settings(
            redis_url=redis_url, storage="local", local_storage_root=self.artifacts, work_dir=tmp_path / "work",
            allowed_file_roots=[self.models], device="cpu", torch_threads=1,
        )
        self.store = JobStore.from_url(redis_url, prefix=f"hostile-{uuid.uuid4().hex[:8]}:")

    def model(self, base: Path | None = None) -> Path:
        path = self.models / "model"
        if base is None:
            path.mkdir()
        else:
            shutil.copytree(base, path)
        return path

    def run(self, source: str | None = None, **options: object):
        body = {"source": source or f"file://{self.models}/model", "options": {"rank": 4, "iters": 1, **options}}
        job = self.store.create(JobCreate.model_validate(body))
        JobRunner(self.store, self.settings, enqueue=lambda *message: None).run(job.id)
        job = self.store.get(job.id)
        assert job.state is JobState.failed, (job.state, job.error)
        assert not (self.artifacts / job.output / "manifest.json").exists()
        return job.error


@pytest.fixture
def env(redis_url: str, tmp_path: Path, tiny_llama: Path, tiny_bert: Path) -> Env:
    return Env(redis_url, tmp_path, tiny_llama, tiny_bert)


def _header_length(path: Path, length: int) -> None:
    data = path.read_bytes()
    path.write_bytes(length.to_bytes(8, "little") + data[8:])


def _replace_in_header(path: Path, old: str, new: str) -> None:
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + size].decode()
    assert old in header and len(new) == len(old)
    path.write_bytes(data[:8] + header.replace(old, new, 1).encode() + data[8 + size :])


def _pickle_only(env: Env) -> None:
    model = env.model()
    shutil.copy(env.bert / "config.json", model / "config.json")
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04never unpickled")


def _no_safetensors(env: Env) -> None:
    model = env.model()
    shutil.copy(env.bert / "config.json", model / "config.json")


def _truncated(env: Env) -> None:
    path = env.model(env.bert) / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)


def _header_beyond_file(env: Env) -> None:
    path = env.model(env.bert) / "model.safetensors"
    _header_length(path, path.stat().st_size)


def _header_of_hundreds_of_mb(env: Env) -> None:
    _header_length(env.model(env.bert) / "model.safetensors", 300 << 20)


def _invalid_header_json(env: Env) -> None:
    _replace_in_header(env.model(env.bert) / "model.safetensors", '"dtype":', '"dtype" ')


def _unknown_dtype(env: Env) -> None:
    _replace_in_header(env.model(env.bert) / "model.safetensors", '"dtype":"F32"', '"dtype":"Q32"')


def _overlapping_offsets(env: Env) -> None:
    path = env.model(env.bert) / "model.safetensors"
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]
    header[second]["data_offsets"] = [o - 4 for o in header[second]["data_offsets"]]
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size :])


def _shape_against_config(env: Env) -> None:
    model = env.model(env.llama)
    config = json.loads((model / "config.json").read_text())
    config["hidden_size"] = 128
    (model / "config.json").write_text(json.dumps(config))


def _copied_weight_transposed(env: Env) -> None:
    path = env.model(env.bert) / "model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("intermediate.dense.weight"))
    tensors[key] = torch.zeros(tuple(reversed(tensors[key].shape)))
    save_file(tensors, str(path), metadata={"format": "pt"})


def _index_outside(env: Env) -> None:
    model = env.model(env.llama)
    index = json.loads((model / INDEX).read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = "../other/model.safetensors"
    (model / INDEX).write_text(json.dumps(index))


CASES = {
    "missing directory": (lambda env: None, {}, "source_not_found", "no such checkpoint directory"),
    "no safetensors": (_no_safetensors, {}, "no_safetensors", "no safetensors weights"),
    "only pickle files": (_pickle_only, {}, "pickle_checkpoint", "pickle files are not loaded"),
    "truncated shard": (_truncated, {}, "corrupt_checkpoint", "runs past the end"),
    "header length beyond the file": (_header_beyond_file, {}, "corrupt_checkpoint", "beyond the file"),
    "header of hundreds of MB": (_header_of_hundreds_of_mb, {}, "corrupt_checkpoint", "exceeds the limit"),
    "invalid header JSON": (_invalid_header_json, {}, "corrupt_checkpoint", "not valid UTF-8 JSON"),
    "unknown dtype": (_unknown_dtype, {}, "corrupt_checkpoint", "unknown dtype 'Q32'"),
    "overlapping offsets": (_overlapping_offsets, {}, "corrupt_checkpoint", "overlaps"),
    "shape against config.json": (_shape_against_config, {}, "corrupt_checkpoint", "config.json implies"),
    "copied weight against config.json": (_copied_weight_transposed, {"target_modules": ["query"]}, "corrupt_checkpoint", "config.json implies"),
    "index leaving the checkpoint": (_index_outside, {}, "unsafe_path", "unsafe file name"),
    "rank above a layer": (lambda env: env.model(env.bert), {"rank": 65}, "invalid_options", "exceeds the smaller dimension"),
    "unknown target modules": (lambda env: env.model(env.bert), {"target_modules": ["q_proj"]}, "no_target_modules", "['q_proj']"),
    "pattern matching nothing": (lambda env: env.model(env.bert), {"target_modules": r".*\.q_proj"}, "no_target_modules", "matches no"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_source_fails_the_job_with_its_code(env: Env, case: str) -> None:
    prepare, options, code, needle = CASES[case]
    prepare(env)
    error = env.run(**options)
    assert error.code == code and needle in error.message, error


def test_a_source_that_left_the_roots_after_submission_is_invalid_source(env: Env) -> None:
    """Checked again by the worker: a symlink swapped in after POST does not get it out."""
    outside = Path(shutil.copytree(env.bert, env.tmp / "outside"))
    (env.models / "model").symlink_to(outside)
    error = env.run()
    assert error.code == "invalid_source" and "outside the allowed file roots" in error.message


def test_a_file_in_the_source_linking_outside_the_roots_is_unsafe_path(env: Env) -> None:
    model = env.model(env.bert)
    outside = Path(shutil.copy(model / "config.json", env.tmp / "config.json"))
    (model / "config.json").unlink()
    (model / "config.json").symlink_to(outside)
    error = env.run()
    assert error.code == "unsafe_path" and "outside the allowed file roots" in error.message


def test_a_model_above_the_size_limit_is_model_too_large(env: Env) -> None:
    env.model(env.bert)
    env.settings = env.settings.model_copy(update={"max_model_bytes": 1000})
    error = env.run()
    assert error.code == "model_too_large" and "LOFTQ_MAX_MODEL_BYTES" in error.message


# --------------------------------------------------------------------------- object keys


class _Listing:
    """An ObjectStore that only lists: names from another writer's bucket."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    def list(self, prefix: str) -> list[SimpleNamespace]:
        return [SimpleNamespace(key=prefix + key, size=1) for key in self.keys]


@pytest.mark.parametrize("name", ["../model.safetensors", "sub/../../x", "/etc/passwd", "a\x00b", "a//b"])
def test_object_keys_that_leave_the_checkpoint_are_unsafe_path(name: str, tmp_path: Path) -> None:
    source = S3Source("models", "llama", tmp_path, store=_Listing(["config.json", name]))
    with pytest.raises(UnsafePath) as info:
        source.list_files()
    assert info.value.code == "unsafe_path"


def test_hub_file_names_that_leave_the_checkpoint_are_unsafe_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, *a, **k: ["config.json", "../x.safetensors"])
    with pytest.raises(UnsafePath) as info:
        HubSource("org/model", None, tmp_path).list_files()
    assert info.value.code == "unsafe_path"
