"""Hostile and broken checkpoints at the engine: each ends in a LoftQError with its own code
before anything is converted (and the CLI prints that code and exits 2). The safetensors
header cases are in test_safetensors_io.py, path names in test_unsafe_paths.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
import torch
from safetensors.torch import load_file, save_file

from loftq.converter import convert_directory, plan
from loftq.errors import (
    CorruptCheckpoint,
    InvalidOptions,
    LoftQError,
    NoSafetensors,
    NoTargetModules,
    PickleCheckpoint,
    SourceNotFound,
    UnsafePath,
    UnsupportedCheckpoint,
)
from loftq.options import ConvertOptions
from loftq.storage import LocalSource

INDEX = "model.safetensors.index.json"


def _options(**kwargs: object) -> ConvertOptions:
    return ConvertOptions(**{"rank": 4, "device": "cpu", **kwargs})


def _copy(model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model, tmp_path / "src"))


def _refused(src: Path, error: type[LoftQError], code: str, **options: object) -> LoftQError:
    """Planning refuses ``src`` with ``error``/``code``; a full conversion too, writing no shard."""
    with pytest.raises(error) as planned:
        plan(LocalSource(src), _options(**options))
    assert planned.value.code == code
    out = src.parent / "out"
    with pytest.raises(error):
        convert_directory(src, out, _options(**options))
    assert not list(out.glob("*.safetensors")) and not (out / "manifest.json").exists()
    return planned.value


def _shard_of(src: Path, key: str) -> Path:
    return src / json.loads((src / INDEX).read_text())["weight_map"][key]


# --------------------------------------------------------------------------- what the source holds


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pkl", "model.ckpt", "sub/pytorch_model.bin"])
def test_pickle_only_sources_have_their_own_code(tiny_llama: Path, tmp_path: Path, name: str) -> None:
    src = tmp_path / "src"
    (src / name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_llama / "config.json", src / "config.json")
    (src / name).write_bytes(b"\x80\x04not a pickle anyone will load")
    error = _refused(src, PickleCheckpoint, "pickle_checkpoint")
    assert isinstance(error, UnsupportedCheckpoint)  # callers catching the broader class still do
    assert name in str(error)
    assert "pickle files are not loaded" in str(error) and "safetensors" in str(error)


def test_pickles_beside_safetensors_are_ignored(tiny_bert: Path, tmp_path: Path) -> None:
    src = _copy(tiny_bert, tmp_path)
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04never read")
    checkpoint, _, _ = plan(LocalSource(src), _options())
    assert checkpoint.shards == ["model.safetensors"]
    assert "pytorch_model.bin" not in checkpoint.aux_files


def test_a_source_without_weights_is_no_safetensors(tiny_llama: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(tiny_llama / "config.json", src / "config.json")
    (src / "README.md").write_text("a model card, no weights")
    error = _refused(src, NoSafetensors, "no_safetensors")
    assert isinstance(error, SourceNotFound) and "no safetensors weights" in str(error)


def test_safetensors_only_in_a_subdirectory_are_named(tiny_bert: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "onnx").mkdir(parents=True)
    shutil.copy(tiny_bert / "config.json", src / "config.json")
    shutil.copy(tiny_bert / "model.safetensors", src / "onnx" / "model.safetensors")
    error = _refused(src, NoSafetensors, "no_safetensors")
    assert "onnx/model.safetensors" in str(error)


@pytest.mark.parametrize("kind", ["missing", "a file"])
def test_a_source_that_does_not_exist(tmp_path: Path, kind: str) -> None:
    src = tmp_path / "model"
    if kind == "a file":
        src.write_text("not a directory")
    with pytest.raises(SourceNotFound) as info:
        convert_directory(src, tmp_path / "out", _options())
    assert info.value.code == "source_not_found" and str(src) in str(info.value)


# --------------------------------------------------------------------------- config.json and the index


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b'{"model_type": "bert",', "invalid JSON"),
        (b'["model_type", "bert"]', "not an object"),
        (b'{"model_type": "\xff"}', "invalid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid JSON"),
    ],
)
def test_a_broken_config_is_corrupt_checkpoint(tiny_bert: Path, tmp_path: Path, content: bytes, fragment: str) -> None:
    src = _copy(tiny_bert, tmp_path)
    (src / "config.json").write_bytes(content)
    error = _refused(src, CorruptCheckpoint, "corrupt_checkpoint")
    assert "config.json" in str(error) and fragment in str(error)


@pytest.mark.parametrize("content", [b'{"weight_map": {"a": "\xff"}}', b"[" * 100_000 + b"]" * 100_000, b'{"weight_map": []}'])
def test_a_broken_index_is_corrupt_checkpoint(tiny_llama: Path, tmp_path: Path, content: bytes) -> None:
    src = _copy(tiny_llama, tmp_path)
    (src / INDEX).write_bytes(content)
    error = _refused(src, CorruptCheckpoint, "corrupt_checkpoint")
    assert INDEX in str(error) and "invalid index" in str(error)


@pytest.mark.parametrize("shard", ["/etc/passwd", "model\x00.safetensors", "../outside.safetensors"])
def test_index_shard_names_that_leave_the_checkpoint(tiny_llama: Path, tmp_path: Path, shard: str) -> None:
    src = _copy(tiny_llama, tmp_path)
    index = json.loads((src / INDEX).read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = shard
    (src / INDEX).write_text(json.dumps(index))
    _refused(src, UnsafePath, "unsafe_path")


# --------------------------------------------------------------------------- shapes against config.json


def test_weights_of_another_architecture_are_corrupt_not_no_targets(tiny_llama: Path, tiny_bert: Path, tmp_path: Path) -> None:
    src = _copy(tiny_bert, tmp_path)
    shutil.copy(tiny_llama / "config.json", src / "config.json")
    error = _refused(src, CorruptCheckpoint, "corrupt_checkpoint")
    assert "config.json" in str(error) and "LlamaForCausalLM" in str(error)


def test_hidden_size_that_contradicts_the_weights(tiny_llama: Path, tmp_path: Path) -> None:
    src = _copy(tiny_llama, tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["hidden_size"] = 128
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptCheckpoint, match=r"has shape \[.*\] but config.json implies \[.*128.*\]") as info:
        convert_directory(src, tmp_path / "out", _options())
    assert info.value.code == "corrupt_checkpoint"
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize(("fixture", "key", "targets"), [
    ("tiny_llama", "model.layers.1.self_attn.k_proj.weight", ["q_proj"]),
    ("tiny_gpt2", "transformer.h.0.mlp.c_fc.weight", ["c_attn"]),
])
def test_a_copied_linear_weight_that_contradicts_config_is_refused(
    request: pytest.FixtureRequest, tmp_path: Path, fixture: str, key: str, targets: list[str]
) -> None:
    """Not a target, so it would only be copied: the output would still not load."""
    src = _copy(request.getfixturevalue(fixture), tmp_path)
    path = _shard_of(src, key) if (src / INDEX).exists() else src / "model.safetensors"
    tensors = load_file(path)
    rows, cols = tensors[key].shape
    tensors[key] = torch.zeros(cols, rows, dtype=tensors[key].dtype)  # transposed: same size, wrong layout
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CorruptCheckpoint, match=rf"{key} has shape \[{cols}, {rows}\] but config.json implies \[{rows}, {cols}\]"):
        convert_directory(src, tmp_path / "out", _options(target_modules=targets))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_copied_conv1d_weights_of_the_right_shape_pass(tiny_gpt2: Path, tmp_path: Path) -> None:
    report = convert_directory(tiny_gpt2, tmp_path / "out", _options(target_modules=["c_attn"]))
    assert {layer.module.rsplit(".", 1)[-1] for layer in report.layers} == {"c_attn"}
    assert (tmp_path / "out" / "manifest.json").exists()


# --------------------------------------------------------------------------- options the model decides


def test_rank_above_a_layers_smaller_dimension_is_refused_while_planning(tiny_llama: Path, tmp_path: Path) -> None:
    src = _copy(tiny_llama, tmp_path)
    error = _refused(src, InvalidOptions, "invalid_options", rank=33)  # k_proj is 32×64
    assert "rank 33 exceeds the smaller dimension" in str(error) and "k_proj" in str(error)
    plan(LocalSource(src), _options(rank=33, target_modules=["q_proj"]))  # 64×64 layers only: fine


def test_unknown_module_names_and_empty_patterns_say_which(tiny_llama: Path, tmp_path: Path) -> None:
    src = _copy(tiny_llama, tmp_path)
    names = _refused(src, NoTargetModules, "no_target_modules", target_modules=["q_proj", "nope"])
    assert "['nope'] match no linear layer" in str(names)
    pattern = _refused(src, NoTargetModules, "no_target_modules", target_modules=r".*\.attention\..*")
    assert r"'.*\\.attention\\..*' matches no linear layer" in str(pattern)
    with pytest.raises(ValidationError, match="not a valid regular expression"):  # before any model is read
        _options(target_modules="(")


def test_options_the_model_checks_accept_numbers_sent_as_json_floats() -> None:
    """A rank of 8.0 (JSON clients) is rank 8 with alpha 8, and a bad rank is named as itself."""
    options = ConvertOptions.model_validate_json('{"rank": 8.0}')
    assert options.rank == 8 and options.lora_alpha == 8.0 and options.scaling == 1.0
    assert ConvertOptions(rank=4, lora_alpha=None).lora_alpha == 4.0
    for rank in (0, -1, 1.5, "eight"):
        with pytest.raises(ValueError) as info:
            ConvertOptions(rank=rank)
        assert [e["loc"] for e in info.value.errors()] == [("rank",)]


def test_bits_left_out_follow_a_fixed_width_quantizer() -> None:
    assert [ConvertOptions(quant=q).bits for q in ("nf4", "fp4", "int8", "nf2", "nf3", "int")] == [4, 4, 8, 2, 3, 4]
    assert ConvertOptions(quant="int", bits=None).bits == 4
    for quant, bits in (("int8", 4), ("nf4", 3), ("nf2", 3)):
        with pytest.raises(ValueError, match=f"quant={quant} is a .*-bit format, got bits={bits}"):
            ConvertOptions(quant=quant, bits=bits)


# --------------------------------------------------------------------------- the CLI


def test_cli_prints_the_codes_and_exits_2(tiny_llama: Path, tmp_path: Path) -> None:
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    shutil.copy(tiny_llama / "config.json", pickles / "config.json")
    (pickles / "pytorch_model.bin").write_bytes(b"\x80\x04never read")
    empty = tmp_path / "empty"
    empty.mkdir()
    for src, code in ((pickles, "pickle_checkpoint"), (empty, "no_safetensors")):
        result = subprocess.run(
            [sys.executable, "-m", "loftq.cli", "convert", str(src), str(tmp_path / "out")],
            capture_output=True, text=True, timeout=300, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        )
        assert result.returncode == 2 and f"[{code}]" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
