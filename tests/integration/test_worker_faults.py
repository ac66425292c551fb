"""Faults injected for real into a running worker: its scratch disk fills up (a small tmpfs),
a job needs more memory than the worker allows (RLIMIT_AS, LOFTQ_WORKER_MEMORY_LIMIT_BYTES),
its pool child is SIGKILLed as the kernel's OOM killer would, and a job is cancelled halfway.
Each time the job ends with a clear state and code, and the same worker process then runs
the next job. A Redis-compatible server process, moto's S3 server, uvicorn and one Celery
worker process, like test_end_to_end.py, on their own queue and Redis database."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from conftest import (
    FINISHED,
    output_keys,
    pool_children,
    s3_client,
    service_env,
    start_worker,
    stop_processes,
    submit_job,
    upload_models,
    wait_for_job,
)

from service.models import ErrorInfo
from worker.limits import exhausted_resource

BUCKET = "faults-artifacts"
MODELS = "faults-models"
QUEUE = "loftq-worker-faults"
MEMORY_ALLOWANCE = 2 << 30
"""Address space a job may add to its pool child (LOFTQ_WORKER_MEMORY_LIMIT_BYTES): well above
what converting MiniLM adds (about 0.45 GiB with MALLOC_ARENA_MAX=2: transformers' import,
thread stacks, malloc arenas), well below the 4 GiB that reading ``big_layer``'s MLP needs."""
SLOW = {"iters": 8, "svd": "exact"}  # 0.2-0.5 s per MiniLM layer on 2 idle cores, seconds on a busy one


@pytest.fixture(scope="module")
def stack(
    redis_url: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, minilm: Path, start_api, wait_until
) -> Iterator[dict]:
    """API + one worker with S3 storage and a memory limit per job; MiniLM and tiny-bert in S3.
    A short lease (5 s), a short sweep interval (service/sweeper.py) and one delivery per job
    (LOFTQ_MAX_ATTEMPTS=1): a job whose pool child died ends ``worker_lost`` within seconds."""
    work = tmp_path_factory.mktemp("worker-faults")
    files_root = work / "files"
    files_root.mkdir()
    scratch = work / "scratch"
    scratch.mkdir()
    env = service_env(
        redis_url.replace("/0", "/7"), QUEUE, BUCKET, s3_endpoint, work,
        allowed_file_roots=json.dumps([str(files_root)]), lease_seconds="5", max_attempts="1",
        sweep_interval_seconds="1", worker_memory_limit_bytes=str(MEMORY_ALLOWANCE),
    ) | {"MALLOC_ARENA_MAX": "2"}
    log = work / "worker.log"
    worker = start_worker(env, log, "faults")
    api = None
    try:
        s3 = s3_client(s3_endpoint)
        for bucket in (BUCKET, MODELS):
            s3.create_bucket(Bucket=bucket)
        upload_models(s3, MODELS, {"tiny-bert": tiny_bert, "minilm": minilm})
        shutil.copytree(minilm, files_root / "minilm")  # read in place: no download before the layers
        api, base = start_api(env, work / "api.log")
        wait_until(lambda: b"ready." in log.read_bytes(), "worker ready", [worker])
        with httpx.Client(base_url=base, timeout=30) as client:
            yield {"client": client, "s3": s3, "files_root": files_root, "scratch": scratch, "worker": worker, "work": work}
    finally:
        stop_processes(api, [worker])


def _converting(client: httpx.Client, job_id: str) -> dict:
    """Once the engine has finished a layer: the job is well inside the conversion."""
    job = wait_for_job(client, job_id, lambda job: job["state"] in FINISHED or job["progress"]["layers_done"] >= 1)
    assert job["state"] == "running", job
    return job


def _the_next_job_succeeds(stack: dict) -> None:
    """The worker survived the fault: its parent process is the one the module started, and a
    job from S3 (download into scratch, upload of the result) runs to the end."""
    assert stack["worker"].poll() is None, "the worker process exited"
    client = stack["client"]
    job = wait_for_job(client, submit_job(client, f"s3://{MODELS}/tiny-bert/", {"rank": 4}))
    assert job["state"] == "succeeded", job["error"]
    assert "manifest.json" in [key.rsplit("/", 1)[-1] for key in output_keys(stack["s3"], BUCKET, job)]
    assert stack["worker"].poll() is None


@contextlib.contextmanager
def _tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted over ``path`` (the worker's scratch directory) for
    the duration; the directory underneath is untouched and visible again afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        for _ in range(50):  # busy for a moment after a job: retry before detaching it lazily
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        else:
            subprocess.run(["umount", "-l", str(path)], check=True)


# --------------------------------------------------------------------------- disk


MINILM_SHARD = 90_868_376  # bytes of MiniLM's model.safetensors, checked below


def test_a_full_scratch_disk_fails_the_job_with_disk_full_and_the_worker_carries_on(stack: dict, minilm: Path) -> None:
    """The disk fills while the source shard is downloaded (16 MiB: the 87 MiB shard does not
    fit), then while the output shard is written beside it (the shard and 64 MiB fit: the
    output gets a few layers past the 45 MiB of embeddings it starts with)."""
    assert (minilm / "model.safetensors").stat().st_size == MINILM_SHARD
    client = stack["client"]
    for where, size in (("download", 16 << 20), ("output", MINILM_SHARD + (64 << 20))):
        with _tmpfs(stack["scratch"], size) as scratch:
            job_id = submit_job(client, f"s3://{MODELS}/minilm/", {"rank": 4})
            job = wait_for_job(client, job_id)
            assert job["state"] == "failed", (where, job)
            assert job["error"]["code"] == "disk_full", (where, job["error"])
            assert "No space left on device" in job["error"]["message"]
            layers = job["progress"]["layers_done"]
            if where == "download":
                assert layers == 0  # nothing converted: the source never arrived
            else:
                assert 0 < layers < job["progress"]["layers_total"]  # failed while writing the output shard
            assert list(scratch.iterdir()) == [], f"{where}: the job's scratch was left behind"
            assert "manifest.json" not in [key.rsplit("/", 1)[-1] for key in output_keys(stack["s3"], BUCKET, job)]
            assert client.get(f"/v1/jobs/{job_id}/artifacts").status_code == 409
            if where == "output":
                _the_next_job_succeeds(stack)  # on the same small disk: the failed jobs' space is free again
                assert list(scratch.iterdir()) == []


# --------------------------------------------------------------------------- memory


@pytest.fixture(scope="module")
def big_layer(stack: dict) -> Path:
    """A BERT checkpoint whose MLP layers are 2^20 × 1024 fp32 (4 GiB each). The file is
    sparse: the attention layers before them hold real random weights and are fitted, the big
    ones are holes that are never read, because the job cannot allocate them."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=128, hidden_size=1024, intermediate_size=1 << 20, num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64
    )
    config.architectures = ["BertModel"]
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in BertModel(config).state_dict().items()}
    path = stack["files_root"] / "big-layer"
    path.mkdir()
    config.to_json_file(path / "config.json")
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        nbytes = 4 * torch.Size(shape).numel()
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    generator = torch.Generator().manual_seed(0)
    with open(path / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in shapes.items():
            if torch.Size(shape).numel() >= 1 << 28:
                f.seek(4 * torch.Size(shape).numel(), os.SEEK_CUR)
            else:
                f.write((torch.randn(shape, generator=generator) * 0.02).numpy().tobytes())
        f.truncate(len(raw) + 8 + offset)
    return path


def test_a_job_beyond_the_memory_limit_fails_out_of_memory_and_the_worker_carries_on(stack: dict, big_layer: Path) -> None:
    client = stack["client"]
    job = wait_for_job(client, submit_job(client, f"file://{big_layer}", {"rank": 4}))
    assert job["state"] == "failed", job
    assert job["error"]["code"] == "out_of_memory", job["error"]
    assert "can't allocate memory" in job["error"]["message"]
    assert job["progress"]["layers_done"] >= 4  # the attention layers fitted under the limit; the 4 GiB read did not
    assert "manifest.json" not in [key.rsplit("/", 1)[-1] for key in output_keys(stack["s3"], BUCKET, job)]
    _the_next_job_succeeds(stack)


def test_a_pool_child_killed_mid_job_ends_the_job_worker_lost_and_the_worker_forks_a_new_one(stack: dict) -> None:
    """SIGKILL to the pool child, what the kernel's OOM killer sends. The Celery parent sees
    the child die and forks another; once the dead child's lease expires, the job has had its
    one delivery (LOFTQ_MAX_ATTEMPTS=1 here) and ends ``worker_lost``."""
    client = stack["client"]
    job_id = submit_job(client, f"file://{stack['files_root'] / 'minilm'}", SLOW)
    _converting(client, job_id)
    children = pool_children(stack["worker"])
    assert len(children) == 1, children
    child = children[0]
    limits = Path(f"/proc/{child}/limits").read_text()
    status = Path(f"/proc/{child}/status").read_text()
    address_space_limit = next(line for line in limits.splitlines() if line.startswith("Max address space")).split()[3]
    assert address_space_limit != "unlimited"  # LOFTQ_WORKER_MEMORY_LIMIT_BYTES is applied in the child
    vm = {line.split(":")[0]: int(line.split()[1]) >> 10 for line in status.splitlines() if line.startswith(("VmSize", "VmPeak"))}
    print(f"pool child mid-job: address space limit {int(address_space_limit) >> 20} MiB, VmSize {vm['VmSize']} MiB, VmPeak {vm['VmPeak']} MiB")
    killed = time.monotonic()
    os.kill(child, signal.SIGKILL)

    job = wait_for_job(client, job_id, timeout=120)
    print(f"pool child killed: job {job['state']} ({(job['error'] or {}).get('code')}) after {time.monotonic() - killed:.1f} s")
    assert job["state"] == "failed", job
    assert job["error"]["code"] == "worker_lost", job["error"]
    assert job["progress"]["layers_done"] < job["progress"]["layers_total"]
    assert "manifest.json" not in [key.rsplit("/", 1)[-1] for key in output_keys(stack["s3"], BUCKET, job)]
    assert child not in pool_children(stack["worker"])
    _the_next_job_succeeds(stack)


# --------------------------------------------------------------------------- cancellation


def test_cancel_mid_job_stops_within_one_layer_and_leaves_no_artifacts(stack: dict) -> None:
    client = stack["client"]
    job_id = submit_job(client, f"file://{stack['files_root'] / 'minilm'}", SLOW)
    _converting(client, job_id)
    assert output_keys(stack["s3"], BUCKET, client.get(f"/v1/jobs/{job_id}").json())  # config and tokenizer are uploaded by now
    asked = time.monotonic()
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202
    accepted = response.json()
    assert accepted["state"] == "cancelling"
    at_cancel = accepted["progress"]["layers_done"]  # read in the transaction that set the flag

    job = wait_for_job(client, job_id, timeout=120)
    latency = time.monotonic() - asked
    events = client.get(f"/v1/jobs/{job_id}/events").json()["events"]
    seconds = [e["data"]["seconds"] for e in events if e["type"] == "layer"]
    print(
        f"cancel: {latency:.1f} s from the request to cancelled; layers done {at_cancel} when accepted, "
        f"{job['progress']['layers_done']} at the end (of {job['progress']['layers_total']}); "
        f"layer fits took {min(seconds):.1f}-{max(seconds):.1f} s"
    )
    assert job["state"] == "cancelled", job
    assert job["error"] is None
    assert at_cancel <= job["progress"]["layers_done"] <= at_cancel + 1  # at most the layer being fitted finished
    assert len(seconds) == job["progress"]["layers_done"]
    assert output_keys(stack["s3"], BUCKET, job) == []  # no manifest, no shards, no journal, no copied files
    assert client.get(f"/v1/jobs/{job_id}/artifacts").status_code == 409
    assert latency < 120  # one layer and the clean-up, with room for a loaded machine


# --------------------------------------------------------------------------- error codes


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (RuntimeError("while writing a shard"), None),
        (OSError(errno.EACCES, "Permission denied"), None),
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out_of_memory"),
        (OSError(errno.ENOMEM, "Cannot allocate memory"), "out_of_memory"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk_full"),
    ],
)
def test_exhaustion_is_recognised_through_the_cause_chain(exc: BaseException, code: str | None) -> None:
    """The chain as an engine thread or a library hands it on: the exhaustion two levels down."""
    try:
        try:
            raise exc
        except BaseException as inner:
            raise RuntimeError("conversion failed") from inner
    except RuntimeError as outer:
        wrapped = outer
    found = exhausted_resource(wrapped)
    assert (found.code if isinstance(found, ErrorInfo) else None) == code
    assert exhausted_resource(exc) == found
