"""Hostile and broken checkpoints at the engine: each ends in a LoftQError with its own code
before anything is converted (and the CLI prints that code and exits 2). The safetensors
header cases are in test_safetensors_io.py, path names in test_unsafe_paths.py."""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError
import torch
from safetensors.torch import load_file, save_file
from torch.nn.modules.module import register_module_module_registration_hook

from loftq.architecture import MAX_BUFFER_BYTES, PARTS_FLOOR, PARTS_PER_TENSOR
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
    UnsupportedArchitecture,
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


# --------------------------------------------------------------------------- config.json's sizes and classes


def _edit_config(src: Path, **changes: object) -> None:
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **changes}))


def _tensor_count(src: Path) -> int:
    if (src / INDEX).exists():
        return len(json.loads((src / INDEX).read_text())["weight_map"])
    return len(load_file(src / "model.safetensors"))


@contextlib.contextmanager
def _modules_built() -> Iterator[list[str]]:
    """Names of the submodules registered (built) inside the block, in this process."""
    built: list[str] = []
    handle = register_module_module_registration_hook(lambda module, name, value: built.append(name))
    try:
        yield built
    finally:
        handle.remove()


def test_60000_declared_layers_are_refused_before_any_is_built(tiny_llama: Path, tmp_path: Path) -> None:
    """60 000 layers over a checkpoint that stores two: the config object and the meta model
    alone took a minute and 2.6 GB, and the conversion succeeded."""
    src = _copy(tiny_llama, tmp_path)
    _edit_config(src, num_hidden_layers=60000)
    with _modules_built() as built:
        error = _refused(src, CorruptCheckpoint, "corrupt_checkpoint")
    assert built == []  # refused from config.json and the index alone
    assert "config.json" in str(error) and "num_hidden_layers=60000" in str(error)
    assert f"holds tensors ({_tensor_count(src)})" in str(error)


@pytest.mark.parametrize(("fixture", "changes", "field"), [
    ("tiny_gpt2", {"n_layer": 100000}, "n_layer=100000"),  # GPT-2's own name for num_hidden_layers
    ("tiny_bert", {"num_hidden_layers": 2**40}, f"num_hidden_layers={2**40}"),
])
def test_layer_counts_of_other_names_and_sizes_are_refused(
    request: pytest.FixtureRequest, tmp_path: Path, fixture: str, changes: dict, field: str
) -> None:
    src = _copy(request.getfixturevalue(fixture), tmp_path)
    _edit_config(src, **changes)
    with _modules_built() as built:
        error = _refused(src, CorruptCheckpoint, "corrupt_checkpoint")
    assert built == [] and field in str(error)


def test_declared_layers_the_weights_do_not_hold_are_named(tiny_llama: Path, tmp_path: Path) -> None:
    src = _copy(tiny_llama, tmp_path)
    _edit_config(src, num_hidden_layers=3)  # fewer than the tensors, one more than stored
    error = _refused(src, CorruptCheckpoint, "corrupt_checkpoint")
    assert "num_hidden_layers=3 declares 3 entries of model.layers in LlamaForCausalLM" in str(error)
    assert "holds weights for only 2 (none for model.layers.2)" in str(error)


def test_a_layer_missing_from_the_weights_is_named(tiny_bert: Path, tmp_path: Path) -> None:
    src = _copy(tiny_bert, tmp_path)
    tensors = load_file(src / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".layer.1." not in k}, str(src / "model.safetensors"), metadata={"format": "pt"})
    error = _refused(src, CorruptCheckpoint, "corrupt_checkpoint")
    assert "num_hidden_layers=2 declares 2 entries of encoder.layer" in str(error)
    assert "only 1 (none for encoder.layer.1)" in str(error)


def test_an_index_padded_to_back_the_declared_layers_is_refused_at_its_shard(tiny_llama: Path, tmp_path: Path) -> None:
    """The index alone plans the conversion; a shard that lacks what the index maps to it
    fails the run instead of converting the layers it has and skipping the rest."""
    src = _copy(tiny_llama, tmp_path)
    index = json.loads((src / INDEX).read_text())
    layer_1 = {k: v for k, v in index["weight_map"].items() if k.startswith("model.layers.1.")}
    for name, shard in layer_1.items():
        index["weight_map"][name.replace(".layers.1.", ".layers.2.")] = shard
    (src / INDEX).write_text(json.dumps(index))
    _edit_config(src, num_hidden_layers=3)
    plan(LocalSource(src), _options())  # what the index claims backs the config
    with pytest.raises(CorruptCheckpoint, match=r"the index maps model\.layers\.2\..* to .*, which does not hold it") as info:
        convert_directory(src, tmp_path / "out", _options())
    assert info.value.code == "corrupt_checkpoint" and not (tmp_path / "out" / "manifest.json").exists()


@pytest.fixture(scope="module")
def tiny_funnel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Funnel sizes its layers by a list (block_sizes), under no layer-count name."""
    from transformers import FunnelConfig, FunnelModel

    torch.manual_seed(4)
    config = FunnelConfig(vocab_size=128, block_sizes=[1, 1], d_model=64, n_head=4, d_head=16, d_inner=128)
    path = tmp_path_factory.mktemp("tiny-funnel")
    FunnelModel(config).save_pretrained(str(path))
    return path


def test_any_field_that_multiplies_modules_stops_the_build_early(tiny_funnel: Path, tmp_path: Path) -> None:
    plan(LocalSource(tiny_funnel), _options())  # as saved: fine
    src = _copy(tiny_funnel, tmp_path)
    _edit_config(src, block_sizes=[100000, 1])
    with _modules_built() as built:
        error = _refused(src, CorruptCheckpoint, "corrupt_checkpoint")
    assert "block_sizes[0]=100000" in str(error) and f"the checkpoint holds {_tensor_count(src)} tensors" in str(error)
    assert len(built) < 2 * (PARTS_PER_TENSOR * _tensor_count(src) + PARTS_FLOOR)  # stopped, twice (plan, convert)


def test_a_shared_layer_declared_many_times_is_not_refused(tmp_path: Path) -> None:
    """ALBERT runs one stored layer num_hidden_layers times: counts are bounded by the tensors,
    and only module lists the model really builds must be backed."""
    from transformers import AlbertConfig, AlbertModel

    config = AlbertConfig(
        vocab_size=128, embedding_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=12,
        num_attention_heads=4, max_position_embeddings=64,
    )
    AlbertModel(config).save_pretrained(str(tmp_path / "albert"))
    _, _, layout = plan(LocalSource(tmp_path / "albert"), _options())
    assert any("albert_layer_groups.0.albert_layers.0" in t.module for t in layout.targets.values())


@pytest.mark.parametrize(("fixture", "changes", "needles"), [
    # BERT's position ids and token type ids: 2 × 16 GiB of int64 before any weight was read
    ("tiny_bert", {"max_position_embeddings": 2**31}, ["max_position_embeddings=2147483648", "embeddings.position_ids", "32.0 GiB"]),
    # Llama's rotary frequencies, sized by a derived number: the buffer is named
    ("tiny_llama", {"head_dim": 2**34}, ["model.rotary_emb.inv_freq", "64.0 GiB"]),
])
def test_buffers_sized_by_config_are_bounded(
    request: pytest.FixtureRequest, tmp_path: Path, fixture: str, changes: dict, needles: list[str]
) -> None:
    """Buffers are built on meta and measured first (weight-space conversions never make them
    real, so this runs here without a memory limit; the calibrated path is below)."""
    src = _copy(request.getfixturevalue(fixture), tmp_path)
    _edit_config(src, **changes)
    error = _refused(src, CorruptCheckpoint, "corrupt_checkpoint")
    assert all(needle in str(error) for needle in needles), str(error)
    assert f"at most {MAX_BUFFER_BYTES / 2**30:.1f} GiB" in str(error)


def _limited_address_space() -> None:
    """Run in the child before exec: 6 GiB of address space, far below what the attack asks."""
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def test_a_calibrated_conversion_refuses_huge_buffers_before_making_them(
    calib_bert: Path, calibration_text: Path, tmp_path: Path
) -> None:
    """The calibrated path makes buffers real: max_position_embeddings 2**31 allocated 32 GiB.
    In a child with limited address space, so that a regression fails instead of swapping."""
    src = _copy(calib_bert, tmp_path)
    _edit_config(src, max_position_embeddings=2**31)
    result = subprocess.run(
        [sys.executable, "-m", "loftq.cli", "convert", str(src), str(tmp_path / "out"), "--device", "cpu", "--rank", "4",
         "--calibration-data", str(calibration_text), "--objective", "activation"],
        capture_output=True, text=True, timeout=600, preexec_fn=_limited_address_space,
        env={"COLUMNS": "300", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"},
    )
    assert result.returncode == 2 and "[corrupt_checkpoint]" in result.stderr, result.stderr[-2000:]
    assert "max_position_embeddings=2147483648" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["Trainer", "pipeline", "AutoModel", "PreTrainedModel", "__class__", 42, "not a name"])
def test_architectures_naming_anything_but_a_model_class_is_refused(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: object
) -> None:
    """config.json chooses which transformers class is built: "Trainer" was instantiated with
    the config. Only PreTrainedModel subclasses are built now; nothing else is called."""
    import transformers

    called: list[object] = []
    monkeypatch.setattr(transformers.Trainer, "__init__", lambda self, *args, **kwargs: called.append(args))
    src = _copy(tiny_bert, tmp_path)
    _edit_config(src, architectures=[name])
    error = _refused(src, UnsupportedArchitecture, "unsupported_architecture")
    assert called == []
    assert "config.json" in str(error) and repr(name) in str(error)


def test_architectures_a_transformers_version_lacks_fall_back_to_the_model_type(tiny_bert: Path, tmp_path: Path) -> None:
    src = _copy(tiny_bert, tmp_path)
    _edit_config(src, architectures=["BertForSomethingNewer"])
    _, _, layout = plan(LocalSource(src), _options())
    assert layout.architecture == "BertModel"


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
    with pytest.raises(ValidationError, match="not a valid (RE2 )?regular expression"):  # before any model is read
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


@pytest.mark.parametrize(("options", "loc"), [
    ({"device": "meta"}, ("device",)),
    ({"device": "mps"}, ("device",)),
    ({"device": "cuda:x"}, ("device",)),
    ({"device": "cpu "}, ("device",)),
    ({"seed": 2**70}, ("seed",)),
    ({"seed": 2**63}, ("seed",)),
    ({"seed": -1}, ("seed",)),
    ({"calibration": {"seed": 2**70}}, ("calibration", "seed")),
])
def test_devices_and_seeds_the_engine_cannot_use_are_refused_with_the_options(options: dict, loc: tuple) -> None:
    """They failed inside the job as internal_error; now the options refuse them (422 at POST)."""
    with pytest.raises(ValidationError) as info:
        ConvertOptions(**options)
    assert [e["loc"] for e in info.value.errors()] == [loc]


def test_devices_and_seeds_the_engine_can_use_pass() -> None:
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert ConvertOptions(device=device).device == device
    assert ConvertOptions(seed=2**63 - 1, calibration={"seed": 2**63 - 1}).seed == 2**63 - 1


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
    for src, code, flags in ((pickles, "pickle_checkpoint", []), (empty, "no_safetensors", []), (empty, "invalid_options", ["--device", "meta"])):
        result = subprocess.run(
            [sys.executable, "-m", "loftq.cli", "convert", str(src), str(tmp_path / "out"), *flags],
            capture_output=True, text=True, timeout=300, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        )
        assert result.returncode == 2 and f"[{code}]" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
