"""Calibration data in the worker: fetched from moto's S3 server and from file:// (in place,
confined to the allowed roots, size-limited), and a job's life with calibration through the
runner against a real Redis-compatible server, with the engine's ``convert`` replaced by a
script of the progress events and report a calibrated conversion produces."""

from __future__ import annotations

import sys
import types
import uuid
from pathlib import Path

import pytest

from loftq.errors import InvalidCalibrationData, UnsupportedArchitecture
from loftq.report import Calibration, Evaluation, LayerReport, ProgressEvent, Report, summarize
from service.errors import CalibrationDataNotFound, CalibrationDataTooLarge, InvalidCalibrationSource
from service.models import JobCreate, JobState
from service.settings import Settings
from service.storage import S3ObjectStore
from service.store import JobStore
from worker.runner import JobRunner
from worker.sources import fetch_calibration_data

TEXT = "The quick brown fox jumps over the lazy dog.\n" * 20


def _bucket(endpoint: str) -> S3ObjectStore:
    store = S3ObjectStore(f"calib-{uuid.uuid4().hex[:20]}", endpoint_url=endpoint)
    store.ensure_bucket()
    return store


def _put(store: S3ObjectStore, key: str, data: str, tmp_path: Path) -> None:
    """Through boto3 itself: other writers may create keys the service's own store refuses."""
    store.client.put_object(Bucket=store.bucket, Key=key, Body=data.encode())


def _files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


@pytest.fixture
def s3_settings(s3_env: str, tmp_path: Path) -> Settings:
    return Settings(s3_endpoint_url=s3_env, allowed_file_roots=[tmp_path / "files"])


# --------------------------------------------------------------------------- S3


def test_s3_single_object_is_downloaded_into_scratch(s3_settings: Settings, tmp_path: Path) -> None:
    store = _bucket(s3_settings.s3_endpoint_url)
    _put(store, "wiki/train.txt", TEXT, tmp_path)
    _put(store, "wiki/train.txt.bak", "not this one", tmp_path)
    scratch = tmp_path / "scratch"
    path = fetch_calibration_data(f"s3://{store.bucket}/wiki/train.txt", s3_settings, scratch, tenant="default")
    assert path == scratch / "train.txt" and path.read_text() == TEXT
    assert _files(scratch) == ["train.txt"]


def test_s3_prefix_downloads_every_text_object_keeping_relative_names(s3_settings: Settings, tmp_path: Path) -> None:
    store = _bucket(s3_settings.s3_endpoint_url)
    _put(store, "calib/a.txt", "first document\n", tmp_path)
    _put(store, "calib/sub/b.jsonl", '{"text": "second document"}\n', tmp_path)
    _put(store, "calib/C.TXT", "third\n", tmp_path)
    _put(store, "calib/README.md", "skipped: not calibration text", tmp_path)
    _put(store, "calib/.cache/old.txt", "skipped: hidden, as the engine skips it", tmp_path)
    _put(store, "calib/folder/", "", tmp_path)  # a console's "folder" placeholder
    _put(store, "calibration-other/x.txt", "a sibling prefix, not under calib/", tmp_path)
    scratch = tmp_path / "scratch"
    path = fetch_calibration_data(f"s3://{store.bucket}/calib/", s3_settings, scratch, tenant="default")
    assert path == scratch
    assert _files(scratch) == ["C.TXT", "a.txt", "sub/b.jsonl"]
    assert (scratch / "sub" / "b.jsonl").read_text() == '{"text": "second document"}\n'
    whole = fetch_calibration_data(f"s3://{store.bucket}/", s3_settings, tmp_path / "whole", tenant="default")
    assert _files(whole) == ["calib/C.TXT", "calib/a.txt", "calib/sub/b.jsonl", "calibration-other/x.txt"]


def test_s3_prefix_refuses_unsafe_object_names(s3_settings: Settings, tmp_path: Path) -> None:
    store = _bucket(s3_settings.s3_endpoint_url)
    _put(store, "calib/a.txt", "fine\n", tmp_path)
    _put(store, "calib/x//../../b.txt", "would land outside the scratch directory\n", tmp_path)
    with pytest.raises(InvalidCalibrationSource, match="unsafe object name"):
        fetch_calibration_data(f"s3://{store.bucket}/calib/", s3_settings, tmp_path / "scratch", tenant="default")
    assert not (tmp_path / "scratch").exists()  # refused from the listing, before any download


def test_s3_size_limit_is_checked_before_downloading(s3_settings: Settings, tmp_path: Path) -> None:
    store = _bucket(s3_settings.s3_endpoint_url)
    _put(store, "calib/a.txt", "x" * 600, tmp_path)
    _put(store, "calib/b.txt", "y" * 600, tmp_path)
    small = s3_settings.model_copy(update={"calibration_max_bytes": 1000})
    scratch = tmp_path / "scratch"
    with pytest.raises(CalibrationDataTooLarge, match="1200 bytes.*at most 1000") as info:
        fetch_calibration_data(f"s3://{store.bucket}/calib/", small, scratch, tenant="default")
    assert info.value.code == "calibration_data_too_large"
    assert not scratch.exists()
    assert fetch_calibration_data(f"s3://{store.bucket}/calib/a.txt", small, scratch, tenant="default").stat().st_size == 600


def test_s3_missing_data_is_calibration_data_not_found(s3_settings: Settings, tmp_path: Path) -> None:
    store = _bucket(s3_settings.s3_endpoint_url)
    _put(store, "calib/notes.md", "no text files here", tmp_path)
    for uri, reason in [
        (f"s3://{store.bucket}/calib/missing.txt", "no such object"),
        (f"s3://{store.bucket}/calib/", "no .txt or .jsonl objects"),
        (f"s3://{store.bucket}/empty/", "no .txt or .jsonl objects"),
        (f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/calib.txt", "cannot list the bucket"),
    ]:
        with pytest.raises(CalibrationDataNotFound, match=reason) as info:
            fetch_calibration_data(uri, s3_settings, tmp_path / "scratch", tenant="default")
        assert info.value.code == "calibration_data_not_found"


# --------------------------------------------------------------------------- file://


@pytest.fixture
def files(tmp_path: Path) -> Settings:
    (tmp_path / "files" / "calib" / "more").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    return Settings(allowed_file_roots=[tmp_path / "files"])


def test_file_text_is_copied_as_it_is_checked(files: Settings, tmp_path: Path) -> None:
    """The engine reads copies made while each file was checked: a link swapped into the
    directory after the check cannot reach the job."""
    text = tmp_path / "files" / "calib" / "a.txt"
    text.write_text(TEXT)
    (tmp_path / "files" / "calib" / "more" / "b.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "files" / "calib" / "notes.md").write_text("not calibration text")
    one = fetch_calibration_data(f"file://{text}", files, tmp_path / "one", tenant="default")
    assert one == tmp_path / "one" / "a.txt" and one.read_text() == TEXT
    whole = fetch_calibration_data(f"file://{tmp_path}/files/calib", files, tmp_path / "whole", tenant="default")
    assert whole == tmp_path / "whole"
    assert sorted(p.relative_to(whole).as_posix() for p in whole.rglob("*") if p.is_file()) == ["a.txt", "more/b.jsonl"]


def test_file_symlinks_must_stay_inside_the_roots(files: Settings, tmp_path: Path) -> None:
    calib = tmp_path / "files" / "calib"
    (calib / "a.txt").write_text(TEXT)
    (tmp_path / "elsewhere" / "secret.txt").write_text("secret")
    (calib / "leak.txt").symlink_to(tmp_path / "elsewhere" / "secret.txt")
    with pytest.raises(InvalidCalibrationSource, match="outside the allowed file roots") as info:
        fetch_calibration_data(f"file://{calib}", files, tmp_path / "scratch", tenant="default")
    assert info.value.code == "invalid_calibration_data"
    (calib / "leak.txt").unlink()
    (calib / "more" / "dir").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(InvalidCalibrationSource, match="outside the allowed file roots"):
        fetch_calibration_data(f"file://{calib}", files, tmp_path / "scratch", tenant="default")
    (calib / "more" / "dir").unlink()
    (calib / "more" / "loop").symlink_to(calib, target_is_directory=True)  # inside the roots: read once
    copied = fetch_calibration_data(f"file://{calib}", files, tmp_path / "scratch", tenant="default")
    assert [p.name for p in copied.rglob("*.txt")] == ["a.txt"]


def test_file_missing_empty_and_too_large(files: Settings, tmp_path: Path) -> None:
    calib = tmp_path / "files" / "calib"
    with pytest.raises(CalibrationDataNotFound, match="no such file"):
        fetch_calibration_data(f"file://{calib}/nope.txt", files, tmp_path / "scratch", tenant="default")
    (calib / "notes.md").write_text("not calibration text")
    with pytest.raises(CalibrationDataNotFound, match="no .txt or .jsonl files"):
        fetch_calibration_data(f"file://{calib}", files, tmp_path / "scratch", tenant="default")
    (calib / "a.txt").write_text("x" * 100)
    (calib / "more" / "b.txt").write_text("y" * 100)
    (calib / ".hidden.txt").write_text("z" * 100)  # not read by the engine, so not counted
    small = files.model_copy(update={"calibration_max_bytes": 150})
    with pytest.raises(CalibrationDataTooLarge, match="200 bytes"):
        fetch_calibration_data(f"file://{calib}", small, tmp_path / "scratch", tenant="default")
    assert fetch_calibration_data(f"file://{calib}/a.txt", small, tmp_path / "scratch", tenant="default").read_text() == "x" * 100


# --------------------------------------------------------------------------- the runner


def _layer(module: str, block: int) -> LayerReport:
    return LayerReport(
        module=module, key=f"{module}.weight", shard="model.safetensors", shape=(64, 64), fan_in_fan_out=False,
        error_quant=0.1, error=0.08, iter_errors=[0.05], best_iter=1, seconds=0.01,
        objective="activation", objective_error_quant=0.09, objective_error=0.05, block=block,
    )


def _report(layers: list[LayerReport]) -> Report:
    summary = summarize(layers, seconds=1.5, peak_rss_mb=100.0, peak_device_mb=None, shards=1, shards_resumed=0)
    summary.evaluation = Evaluation(
        sequences=4, tokens=128, cosine_quantized=0.97, cosine_initialised=0.99,
        perplexity_full_precision=250.0, perplexity_quantized=270.0, perplexity_initialised=255.0,
        gap_recovered=float("nan"),  # a degenerate measurement must not break the job record
    )
    calibration = Calibration(sha256="ab" * 32, documents=3, sequences=8, tokens=256, seq_len=32, packed=True,
                              propagation="initialised", blocks=2)
    return Report(format_version=2, source="x", architecture="LlamaForCausalLM", options={}, scaling=1.0, device="cpu",
                  versions={}, summary=summary, layers=layers, calibration=calibration)


class FakeEngine:
    """``loftq.converter.convert`` as a calibrated run drives it: two blocks with one layer
    each, then one shard. Records what it was given and the job's progress mid-run."""

    def __init__(self, store: JobStore, job_id: str, fail: Exception | None = None) -> None:
        self.store, self.job_id, self.fail = store, job_id, fail
        self.calls: list[dict] = []
        self.seen_progress: list[dict] = []

    def convert(self, source, destination, options, *, calibration_data=None, on_progress=None, should_stop=None, trust_parts=False):
        text = None
        if calibration_data is not None:
            path = Path(calibration_data)
            text = {p.name: p.read_text() for p in ([path] if path.is_file() else sorted(path.rglob("*.txt")))}
        self.calls.append({"calibration_data": calibration_data, "text": text, "objective": options.objective})
        if self.fail is not None:
            raise self.fail
        layers = [_layer("model.layers.0.mlp.down_proj", 0), _layer("model.layers.1.mlp.down_proj", 1)]
        on_progress(ProgressEvent("start", 0, 2, 0, 1))
        on_progress(ProgressEvent("calibration", 0, 2, 0, 1, blocks_done=0, blocks_total=2))
        for n, layer in enumerate(layers, 1):
            assert not should_stop()
            on_progress(ProgressEvent("calibration", n, 2, 0, 1, layer=layer, blocks_done=n, blocks_total=2))
            self.seen_progress.append(self.store.get(self.job_id).progress.model_dump())
        on_progress(ProgressEvent("shard", 2, 2, 1, 1, shard="model.safetensors", bytes_read=1000, bytes_written=900))
        self.seen_progress.append(self.store.get(self.job_id).progress.model_dump())
        return _report(layers)


@pytest.fixture
def runner_env(redis_url: str, s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    model = tmp_path / "files" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    settings = Settings(
        storage="local", local_storage_root=tmp_path / "artifacts", work_dir=tmp_path / "work",
        allowed_file_roots=[tmp_path / "files"], s3_endpoint_url=s3_env, device="cpu",
    )
    store = JobStore.from_url(redis_url, prefix=f"calib-runner-{uuid.uuid4().hex[:8]}:")
    bucket = _bucket(s3_env)
    _put(bucket, "calib/train.txt", TEXT, tmp_path)

    def start(fail: Exception | None = None, **request) -> tuple[FakeEngine, str]:
        body = {"source": f"file://{model}", "calibration_data": f"s3://{bucket.bucket}/calib/train.txt",
                "options": {"objective": "activation", "calibration": {"samples": 8, "seq_len": 32, "evaluate": True}}}
        job = store.create(JobCreate.model_validate({**body, **request}))
        engine = FakeEngine(store, job.id, fail)
        # The engine module is swapped out, so this test runs whatever state loftq/converter.py is in.
        monkeypatch.setitem(sys.modules, "loftq.converter", types.SimpleNamespace(convert=engine.convert))
        return engine, job.id

    return types.SimpleNamespace(settings=settings, store=store, start=start, work=tmp_path / "work")


def test_runner_fetches_calibration_data_and_maps_calibration_progress(runner_env) -> None:
    engine, job_id = runner_env.start()
    assert JobRunner(runner_env.store, runner_env.settings).run(job_id)
    job = runner_env.store.get(job_id)
    assert job.state is JobState.succeeded, job.error
    [call] = engine.calls
    assert call["text"] == {"train.txt": TEXT} and call["objective"] == "activation"
    assert Path(call["calibration_data"]).is_relative_to(runner_env.work)
    assert list(runner_env.work.iterdir()) == []  # the job's scratch, downloads included, is gone

    first, second, shard = engine.seen_progress
    assert first["stage"] == "calibrating" and (first["blocks_done"], first["blocks_total"]) == (1, 2)
    assert (first["layers_done"], first["layers_total"]) == (1, 2)
    assert second["stage"] == "calibrating" and second["blocks_done"] == 2
    assert shard["stage"] == "converting" and (shard["blocks_done"], shard["blocks_total"]) == (2, 2)
    assert (shard["bytes_read"], shard["bytes_written"]) == (1000, 900)
    assert job.progress.stage == "done" and job.progress.blocks_done == 2

    layer_events = [e.data for e in runner_env.store.events(job_id).events if e.type == "layer"]
    assert [(e["module"], e["index"], e["total"], e["block"]) for e in layer_events] == [
        ("model.layers.0.mlp.down_proj", 1, 2, 0),
        ("model.layers.1.mlp.down_proj", 2, 2, 1),
    ]
    assert layer_events[0]["objective"] == "activation" and layer_events[0]["objective_error"] == 0.05

    summary = job.summary
    assert summary.objective == "activation" and summary.mean_objective_error == pytest.approx(0.05)
    assert summary.evaluation.perplexity_initialised == 255.0 and summary.evaluation.cosine_quantized == 0.97
    assert summary.evaluation.gap_recovered is None
    assert summary.calibration.sequences == 8 and summary.calibration.sha256 == "ab" * 32


def test_runner_without_calibration_data_passes_none(runner_env) -> None:
    engine, job_id = runner_env.start(calibration_data=None, options={})
    assert JobRunner(runner_env.store, runner_env.settings).run(job_id)
    assert runner_env.store.get(job_id).state is JobState.succeeded
    assert engine.calls[0]["calibration_data"] is None


@pytest.mark.parametrize(
    "error",
    [InvalidCalibrationData("no sequence of 32 tokens in the text"), UnsupportedArchitecture("MoE blocks cannot be calibrated yet")],
)
def test_engine_calibration_errors_fail_the_job_with_their_code(runner_env, error: Exception) -> None:
    _, job_id = runner_env.start(fail=error)
    JobRunner(runner_env.store, runner_env.settings).run(job_id)
    job = runner_env.store.get(job_id)
    assert job.state is JobState.failed and job.error.code == error.code and str(error) in job.error.message


def test_calibration_fetch_failures_fail_the_job_before_converting(runner_env) -> None:
    engine, job_id = runner_env.start()
    small = runner_env.settings.model_copy(update={"calibration_max_bytes": 10})
    JobRunner(runner_env.store, small).run(job_id)
    job = runner_env.store.get(job_id)
    assert job.state is JobState.failed and job.error.code == "calibration_data_too_large"
    assert engine.calls == []

    engine, job_id = runner_env.start(calibration_data="s3://no-such-bucket-calib/x.txt")
    JobRunner(runner_env.store, runner_env.settings).run(job_id)
    job = runner_env.store.get(job_id)
    assert job.state is JobState.failed and job.error.code == "calibration_data_not_found"
    assert engine.calls == []
