"""End-to-end tests of the streaming converter (loftq.converter): artifact layout, byte-exact
copies of non-target tensors, target selection, progress, cancellation, resume, corrupt input
and the "a directory with a manifest is always complete" promise.

The fixtures in tests/conftest.py are session-scoped: every test that damages a checkpoint
copies it into its own tmp_path first.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loftq.converter import convert, convert_directory, convert_part, plan
from loftq.errors import (
    Cancelled,
    CorruptCheckpoint,
    InvalidOptions,
    LoftQError,
    NoTargetModules,
    SourceNotFound,
    UnsupportedCheckpoint,
)
from loftq.options import ConvertOptions
from loftq.safetensors_io import read_header
from loftq.storage import LocalDestination, LocalSource

INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "loftq_init/adapter_config.json"
ADAPTER_WEIGHTS = "loftq_init/adapter_model.safetensors"

LLAMA_MODULES = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
EXPECTED_TARGETS = {
    "llama": {f"model.layers.{i}.{m}" for i in range(2) for m in LLAMA_MODULES},
    "bert": {
        f"encoder.layer.{i}.{m}"
        for i in range(2)
        for m in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        )
    }
    | {"pooler.dense"},
    "gpt2": {f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")},
}
FIXTURES = {"llama": "tiny_llama", "bert": "tiny_bert", "gpt2": "tiny_gpt2"}


def _options(**kwargs: object) -> ConvertOptions:
    return ConvertOptions(**{"rank": 4, "lora_alpha": 16.0, "device": "cpu", **kwargs})


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _weight_files(src: Path) -> list[str]:
    if (src / INDEX).exists():
        return sorted(set(json.loads((src / INDEX).read_text())["weight_map"].values()))
    return ["model.safetensors"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _copy(src: Path, tmp_path: Path, name: str = "src") -> Path:
    return Path(shutil.copytree(src, tmp_path / name))


def _assert_incomplete(out: Path) -> None:
    """A failed or cancelled run leaves nothing that looks finished or half-written."""
    assert not (out / "manifest.json").exists()
    assert not [f for f in _files(out) if f.endswith(".partial")]


def _stop_after(layers: int):
    """(on_progress, should_stop) pair that cancels once ``layers`` layers are done."""
    done = {"layers": 0}

    def on_progress(event) -> None:
        done["layers"] = event.layers_done

    return on_progress, lambda: done["layers"] >= layers


def _targets_per_shard(src: Path, layout_keys: set[str]) -> dict[str, int]:
    weight_map = json.loads((src / INDEX).read_text())["weight_map"]
    counts = {shard: 0 for shard in sorted(set(weight_map.values()))}
    for key, shard in weight_map.items():
        if key in layout_keys:
            counts[shard] += 1
    return counts


# --------------------------------------------------------------------------- shared conversions


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The matrices here are tiny: with several intra-op threads on a busy machine, thread
    hand-offs cost 100× the arithmetic (17 s instead of 0.2 s per conversion, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted rank-4 conversion of each tiny model, with its progress events."""
    cache: dict[str, tuple[Path, Path, object, list]] = {}

    def get(model: str):
        if model not in cache:
            src = request.getfixturevalue(FIXTURES[model])
            out = tmp_path_factory.mktemp(f"out-{model}")
            events: list = []
            report = convert_directory(src, out, _options(), on_progress=events.append)
            cache[model] = (src, out, report, events)
        return cache[model]

    return get


# --------------------------------------------------------------------------- 1. layout


@pytest.mark.parametrize("model", ["llama", "bert", "gpt2"])
def test_output_layout(converted, model: str) -> None:
    src, out, report, _ = converted(model)
    files = _files(out)
    shards = _weight_files(src)

    assert "config.json" in files
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    if model == "llama":
        assert "generation_config.json" in files
        assert (out / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()
        assert len(shards) > 1
    for shard in shards:
        assert shard in files
    assert {f for f in files if f.endswith(".safetensors") and "/" not in f} == set(shards)
    if (src / INDEX).exists():
        src_index = json.loads((src / INDEX).read_text())
        out_index = json.loads((out / INDEX).read_text())
        assert out_index["weight_map"] == src_index["weight_map"]
    else:
        assert INDEX not in files

    # adapter config
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["r"] == 4
    assert config["lora_alpha"] == 16.0
    assert set(config["target_modules"]) == EXPECTED_TARGETS[model]
    assert config["init_lora_weights"] is True
    assert config["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}
    assert config["fan_in_fan_out"] is (model == "gpt2")

    # adapter weights: one lora_A (r×in) and lora_B (out×r) per target
    source_tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        source_tensors.update(_tensors(src / shard))
    adapters = _tensors(out / ADAPTER_WEIGHTS)
    expected_keys = set()
    for module in EXPECTED_TARGETS[model]:
        key_a = f"base_model.model.{module}.lora_A.weight"
        key_b = f"base_model.model.{module}.lora_B.weight"
        expected_keys |= {key_a, key_b}
        weight = source_tensors[f"{module}.weight"]
        in_features, out_features = weight.shape if model == "gpt2" else weight.shape[::-1]
        assert tuple(adapters[key_a].shape) == (4, in_features), key_a
        assert tuple(adapters[key_b].shape) == (out_features, 4), key_b
        assert torch.isfinite(adapters[key_a]).all() and adapters[key_a].abs().sum() > 0
    assert set(adapters) == expected_keys

    # report
    data = json.loads((out / "loftq_report.json").read_text())
    assert {layer["module"] for layer in data["layers"]} == EXPECTED_TARGETS[model]
    assert data["summary"]["layers"] == len(EXPECTED_TARGETS[model]) == report.summary.layers
    assert data["summary"]["shards"] == len(shards)
    assert data["summary"]["shards_resumed"] == 0

    # manifest: every file but itself, with true sizes and hashes
    manifest = json.loads((out / "manifest.json").read_text())
    entries = {e["path"]: e for e in manifest["files"]}
    assert set(entries) == files - {"manifest.json"}
    for name, entry in entries.items():
        assert entry["size"] == (out / name).stat().st_size, name
        assert entry["sha256"] == _sha256(out / name), name

    assert not (out / ".loftq-partial").exists()
    assert not [f for f in files if f.endswith(".partial")]


# --------------------------------------------------------------------------- 2. tensors


@pytest.mark.parametrize("model", ["llama", "bert", "gpt2"])
def test_tensors_copied_or_replaced(converted, model: str) -> None:
    src, out, _, _ = converted(model)
    target_keys = {f"{m}.weight" for m in EXPECTED_TARGETS[model]}
    seen_targets = set()
    non_targets = 0
    for shard in _weight_files(src):
        assert read_header(out / shard).metadata == read_header(src / shard).metadata
        assert read_header(out / shard).metadata is not None
        before, after = _tensors(src / shard), _tensors(out / shard)
        assert list(after) == list(before)
        for name, t in before.items():
            assert after[name].dtype == t.dtype, name
            assert after[name].shape == t.shape, name
            if name in target_keys:
                seen_targets.add(name)
                assert not torch.equal(after[name], t), f"{name} was not quantized"
                assert torch.isfinite(after[name].float()).all()
            else:
                non_targets += 1
                assert _raw(after[name]) == _raw(t), f"{name} changed"
    assert seen_targets == target_keys
    assert non_targets > 0
    if model == "llama":  # the untied output head is not a target and stays as it was
        assert "lm_head.weight" not in target_keys
        head = [s for s in _weight_files(src) if "lm_head.weight" in _tensors(src / s)][0]
        assert torch.equal(_tensors(out / head)["lm_head.weight"], _tensors(src / head)["lm_head.weight"])


def test_targets_are_block_quantized(converted) -> None:
    """A stored target weight is NF4-dequantized: at most 16 distinct values (codebook × absmax)
    in each 64-element block (a row here, since the input size is 64)."""
    src, out, _, _ = converted("llama")
    weights = {}
    for shard in _weight_files(src):
        weights.update(_tensors(out / shard))
    q = weights["model.layers.0.self_attn.q_proj.weight"].float().reshape(-1, 64)
    assert max(len(torch.unique(row)) for row in q) <= 16


# --------------------------------------------------------------------------- 3. target selection


def _targets(src: Path, **kwargs: object) -> set[str]:
    _, _, layout = plan(LocalSource(src), _options(**kwargs))
    return {t.module for t in layout.targets.values()}


def test_all_linear_llama_excludes_lm_head(tiny_llama: Path) -> None:
    modules = _targets(tiny_llama)
    assert modules == EXPECTED_TARGETS["llama"]
    assert "lm_head" not in modules


def test_target_names_list(tiny_llama: Path, tmp_path: Path) -> None:
    expected = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    assert _targets(tiny_llama, target_modules=["q_proj", "v_proj"]) == expected
    convert_directory(tiny_llama, tmp_path, _options(target_modules=["q_proj", "v_proj"]))
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert set(config["target_modules"]) == expected
    adapters = _tensors(tmp_path / ADAPTER_WEIGHTS)
    assert {k.removeprefix("base_model.model.").rsplit(".", 2)[0] for k in adapters} == expected
    # the untargeted k_proj is copied unchanged
    shard = json.loads((tiny_llama / INDEX).read_text())["weight_map"]["model.layers.0.self_attn.k_proj.weight"]
    key = "model.layers.0.self_attn.k_proj.weight"
    assert _raw(_tensors(tmp_path / shard)[key]) == _raw(_tensors(tiny_llama / shard)[key])


def test_target_regex(tiny_llama: Path) -> None:
    modules = _targets(tiny_llama, target_modules=r".*\.mlp\..*")
    assert modules == {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}


@pytest.mark.parametrize("spec", [["nope"], ["q_proj", "nope"], r"nothing\.matches.*"])
def test_no_target_modules(tiny_llama: Path, tmp_path: Path, spec) -> None:
    with pytest.raises(NoTargetModules):
        convert_directory(tiny_llama, tmp_path, _options(target_modules=spec))
    assert not (tmp_path / "manifest.json").exists()


def test_rank_larger_than_layer(tiny_llama: Path, tmp_path: Path) -> None:
    # k_proj is 32×64 (2 kv heads of 16): rank 32 is the largest allowed
    assert _targets(tiny_llama, rank=32) == EXPECTED_TARGETS["llama"]
    with pytest.raises(InvalidOptions, match="k_proj"):
        convert_directory(tiny_llama, tmp_path, _options(rank=33))
    assert not (tmp_path / "manifest.json").exists()


# --------------------------------------------------------------------------- 4. progress


def test_progress_events(converted) -> None:
    src, _, _, events = converted("llama")
    total = len(EXPECTED_TARGETS["llama"])
    layer_events = [e for e in events if e.stage == "layer"]
    assert len(layer_events) == total
    assert [e.layers_done for e in layer_events] == list(range(1, total + 1))
    assert all(e.layers_total == total for e in events)
    assert {e.layer.module for e in layer_events} == EXPECTED_TARGETS["llama"]
    for e in layer_events:
        assert e.layer.key == f"{e.layer.module}.weight"
        assert 0 < e.layer.error < 1 and 0 < e.layer.error_quant < 1
        assert e.shard in _weight_files(src)
    shard_events = [e for e in events if e.stage == "shard"]
    assert [e.shards_done for e in shard_events] == list(range(1, len(_weight_files(src)) + 1))
    assert events[0].stage == "start"
    assert events[-1].stage == "done"
    assert events[-1].layers_done == total and events[-1].shards_done == events[-1].shards_total


# --------------------------------------------------------------------------- 5. cancellation


@pytest.mark.parametrize("k", [0, 3])
def test_cancel(tiny_llama: Path, tmp_path: Path, k: int) -> None:
    on_progress, should_stop = _stop_after(k)
    events: list = []

    def record(event) -> None:
        events.append(event)
        on_progress(event)

    with pytest.raises(Cancelled):
        convert_directory(tiny_llama, tmp_path, _options(), on_progress=record, should_stop=should_stop)
    _assert_incomplete(tmp_path)
    assert len([e for e in events if e.stage == "layer"]) == k
    assert not (tmp_path / "loftq_report.json").exists()


# --------------------------------------------------------------------------- 6. resume


def _comparable_report(path: Path) -> dict:
    """The report without wall-clock times and memory peaks, which differ between runs."""
    data = json.loads(path.read_text())
    for layer in data["layers"]:
        layer.pop("seconds")
    for key in ("seconds", "peak_rss_mb", "peak_device_mb", "shards_resumed"):
        data["summary"].pop(key)
    return data


def _interrupt_in_last_shard(src: Path, out: Path, **options: object) -> None:
    _, _, layout = plan(LocalSource(src), _options(**options))
    counts = _targets_per_shard(src, set(layout.targets))
    shards = list(counts)
    assert len(shards) > 1 and counts[shards[-1]] > 0
    before_last = sum(counts[s] for s in shards[:-1])
    on_progress, should_stop = _stop_after(before_last)
    events: list = []

    def record(event) -> None:
        events.append(event)
        on_progress(event)

    with pytest.raises(Cancelled):
        convert_directory(src, out, _options(**options), on_progress=record, should_stop=should_stop)
    _assert_incomplete(out)
    assert [e.shard for e in events if e.stage == "shard"] == shards[:-1]
    assert (out / ".loftq-partial").is_dir()


def test_resume_matches_uninterrupted_run(converted, tmp_path: Path) -> None:
    src, reference, _, _ = converted("llama")
    shards = _weight_files(src)
    out = tmp_path / "out"
    _interrupt_in_last_shard(src, out)

    events: list = []
    report = convert_directory(src, out, _options(), on_progress=events.append)
    assert report.summary.shards_resumed == len(shards) - 1 >= 1
    assert [e.shard for e in events if e.stage == "shard" and e.skipped] == shards[:-1]
    assert [e.layer.module for e in events if e.stage == "layer"] == ["model.layers.1.mlp.down_proj"]
    assert report.summary.layers == len(EXPECTED_TARGETS["llama"])
    assert json.loads((out / "loftq_report.json").read_text())["summary"]["shards_resumed"] == len(shards) - 1

    manifest = json.loads((out / "manifest.json").read_text())
    reference_manifest = json.loads((reference / "manifest.json").read_text())
    assert {e["path"] for e in manifest["files"]} == {e["path"] for e in reference_manifest["files"]}
    assert _files(out) == _files(reference)
    for entry in manifest["files"]:
        name = entry["path"]
        assert entry["sha256"] == _sha256(out / name), name
        if name == "loftq_report.json":  # holds timings; everything else in it must agree
            assert _comparable_report(out / name) == _comparable_report(reference / name)
        else:
            assert _sha256(out / name) == _sha256(reference / name), name
    assert not (out / ".loftq-partial").exists()


def test_rerun_with_other_options_recomputes(tiny_llama: Path, tmp_path: Path) -> None:
    _interrupt_in_last_shard(tiny_llama, tmp_path, rank=4)
    report = convert_directory(tiny_llama, tmp_path, _options(rank=8))
    assert report.summary.shards_resumed == 0
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text())["r"] == 8
    adapters = _tensors(tmp_path / ADAPTER_WEIGHTS)
    assert len(adapters) == 2 * len(EXPECTED_TARGETS["llama"])
    for key, tensor in adapters.items():
        assert (tensor.shape[0] if "lora_A" in key else tensor.shape[1]) == 8, key


def test_resume_after_source_changed_recomputes(tiny_llama: Path, tmp_path: Path) -> None:
    """Same options and shard names, different weights (a re-saved model): nothing is reused."""
    src = _copy(tiny_llama, tmp_path)
    out = tmp_path / "out"
    _interrupt_in_last_shard(src, out)
    key = "model.layers.0.self_attn.q_proj.weight"
    shard = _llama_shard_of(src, key)
    tensors = _tensors(src / shard)
    tensors[key] = (tensors[key].float() * 2).to(tensors[key].dtype)
    save_file(tensors, str(src / shard), metadata={"format": "pt"})

    report = convert_directory(src, out, _options())
    fresh = tmp_path / "fresh"
    convert_directory(src, fresh, _options())
    assert report.summary.shards_resumed == len(_weight_files(src)) - 2  # all finished shards but the changed one
    for name in [*_weight_files(src), ADAPTER_WEIGHTS]:
        assert _sha256(out / name) == _sha256(fresh / name), name


def test_resume_ignores_tampered_shard(tiny_llama: Path, tmp_path: Path) -> None:
    """A finished shard whose bytes no longer match its journal record is converted again."""
    _interrupt_in_last_shard(tiny_llama, tmp_path)
    first = _weight_files(tiny_llama)[0]
    good = (tmp_path / first).read_bytes()
    (tmp_path / first).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    report = convert_directory(tiny_llama, tmp_path, _options())
    assert report.summary.shards_resumed == len(_weight_files(tiny_llama)) - 2
    assert (tmp_path / first).read_bytes() == good


# --------------------------------------------------------------------------- 7. corrupt input


def _llama_shard_of(src: Path, key: str) -> str:
    return json.loads((src / INDEX).read_text())["weight_map"][key]


def _truncate_last(src: Path) -> str:
    shard = _weight_files(src)[-1]
    data = (src / shard).read_bytes()
    (src / shard).write_bytes(data[:-100])
    return shard


def _garbage_header(src: Path) -> str:
    shard = _weight_files(src)[0]
    data = bytearray((src / shard).read_bytes())
    size = int.from_bytes(data[:8], "little")
    data[8 : 8 + size] = bytes(range(256)) * (size // 256) + bytes(size % 256)
    (src / shard).write_bytes(bytes(data))
    return shard


def _missing_shard(src: Path) -> str:
    shard = _weight_files(src)[1]
    (src / shard).unlink()
    return shard


def _unknown_dtype(src: Path) -> str:
    shard = _weight_files(src)[0]
    data = (src / shard).read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + size].decode()
    assert '"dtype":"BF16"' in header
    new = header.replace('"dtype":"BF16"', '"dtype":"Q9"', 1)
    new += " " * (size - len(new))
    assert len(new) == size
    (src / shard).write_bytes(data[:8] + new.encode() + data[8 + size :])
    return shard


def _wrong_shape(src: Path) -> str:
    key = "model.layers.0.self_attn.q_proj.weight"
    shard = _llama_shard_of(src, key)
    tensors = _tensors(src / shard)
    assert tensors[key].shape == (64, 64)
    tensors[key] = torch.zeros(64, 32, dtype=tensors[key].dtype)
    save_file(tensors, str(src / shard), metadata={"format": "pt"})
    return shard


CORRUPTIONS = {
    "truncated": (_truncate_last, CorruptCheckpoint),
    "bad-header": (_garbage_header, CorruptCheckpoint),
    "missing-shard": (_missing_shard, CorruptCheckpoint),
    "unknown-dtype": (_unknown_dtype, CorruptCheckpoint),
    "wrong-shape": (_wrong_shape, CorruptCheckpoint),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_sharded_input(tiny_llama: Path, tmp_path: Path, case: str) -> None:
    corrupt, error = CORRUPTIONS[case]
    src = _copy(tiny_llama, tmp_path)
    shard = corrupt(src)
    out = tmp_path / "out"
    with pytest.raises(error) as info:
        convert_directory(src, out, _options())
    assert isinstance(info.value, LoftQError)
    assert shard in str(info.value)
    if case == "unknown-dtype":
        assert "Q9" in str(info.value)
    _assert_incomplete(out)


def test_truncated_single_file(tiny_bert: Path, tmp_path: Path) -> None:
    src = _copy(tiny_bert, tmp_path)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CorruptCheckpoint, match="model.safetensors"):
        convert_directory(src, tmp_path / "out", _options())
    _assert_incomplete(tmp_path / "out")


class _Tripwire:
    """Unpickling this creates a marker file: proof that someone ran pickle.load on the weights."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_only_checkpoint_is_never_unpickled(tiny_llama: Path, tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(tiny_llama / "config.json", src / "config.json")
    marker = tmp_path / "unpickled"
    (src / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(marker)))

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle weights must never be loaded")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    out = tmp_path / "out"
    with pytest.raises(UnsupportedCheckpoint, match="pytorch_model.bin"):
        convert_directory(src, out, _options())
    assert not marker.exists()
    _assert_incomplete(out)


def test_no_weights(tiny_llama: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(tiny_llama / "config.json", src / "config.json")
    with pytest.raises(SourceNotFound, match="safetensors"):
        convert_directory(src, tmp_path / "out", _options())
    _assert_incomplete(tmp_path / "out")


def test_missing_source_directory(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFound, match="does-not-exist"):
        convert_directory(tmp_path / "does-not-exist", tmp_path / "out", _options())


@pytest.mark.parametrize("model", ["llama", "bert"])
def test_missing_config(request: pytest.FixtureRequest, tmp_path: Path, model: str) -> None:
    src = _copy(request.getfixturevalue(FIXTURES[model]), tmp_path)
    (src / "config.json").unlink()
    with pytest.raises(UnsupportedCheckpoint, match="config.json"):
        convert_directory(src, tmp_path / "out", _options())
    _assert_incomplete(tmp_path / "out")


# --------------------------------------------------------------------------- 8. stale output


def _stale_complete_output(converted, tmp_path: Path) -> Path:
    _, reference, _, _ = converted("llama")
    out = Path(shutil.copytree(reference, tmp_path / "out"))
    assert (out / "manifest.json").exists()
    return out


def test_stale_output_loses_manifest_when_cancelled(converted, tmp_path: Path) -> None:
    src, _, _, _ = converted("llama")
    out = _stale_complete_output(converted, tmp_path)
    on_progress, should_stop = _stop_after(3)
    with pytest.raises(Cancelled):
        convert_directory(src, out, _options(rank=8), on_progress=on_progress, should_stop=should_stop)
    _assert_incomplete(out)

    # finishing the run makes it complete again, with the new options throughout
    report = convert_directory(src, out, _options(rank=8))
    assert report.summary.shards_resumed == 0
    assert json.loads((out / ADAPTER_CONFIG).read_text())["r"] == 8
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["files"]:
        assert entry["sha256"] == _sha256(out / entry["path"]), entry["path"]
    assert json.loads((out / "loftq_report.json").read_text())["options"]["rank"] == 8


def test_stale_output_loses_manifest_on_corrupt_input(converted, tiny_llama: Path, tmp_path: Path) -> None:
    out = _stale_complete_output(converted, tmp_path)
    src = _copy(tiny_llama, tmp_path)
    shard = _truncate_last(src)
    with pytest.raises(CorruptCheckpoint, match=shard):
        convert_directory(src, out, _options(rank=8))
    _assert_incomplete(out)


def test_convert_with_storage_objects(tiny_bert: Path, tmp_path: Path) -> None:
    """The protocol-level entry point gives the same artifacts as the directory wrapper."""
    report = convert(LocalSource(tiny_bert), LocalDestination(tmp_path / "a"), _options())
    convert_directory(tiny_bert, tmp_path / "b", _options())
    assert report.source == str(tiny_bert)
    for name in ("model.safetensors", ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        assert _sha256(tmp_path / "a" / name) == _sha256(tmp_path / "b" / name), name


def test_calibrated_objectives_are_refused_until_calibration_data_can_be_given(tiny_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidOptions, match="calibration"):
        convert_directory(tiny_bert, tmp_path, ConvertOptions(rank=4, objective="activation"))
    assert not (tmp_path / "manifest.json").exists()


def test_parts_then_merge_equal_a_single_run(converted, tmp_path: Path) -> None:
    """Shards converted in separate parts (any order) and merged: byte-identical artifacts."""
    src, reference, _, _ = converted("llama")
    shards = _weight_files(src)
    assert len(shards) >= 2
    out = tmp_path / "out"
    layers = []
    for part in (shards[1::2], shards[0::2]):  # out of order, as workers may finish
        layers += convert_part(LocalSource(src), LocalDestination(out), _options(), part)
    assert len(layers) == len(EXPECTED_TARGETS["llama"])
    assert not (out / "manifest.json").exists()  # parts alone never look complete

    events: list = []
    report = convert(LocalSource(src), LocalDestination(out), _options(), trust_parts=True, on_progress=events.append)
    assert report.summary.shards_resumed == len(shards)
    assert not [e for e in events if e.stage == "layer"]  # the merge fitted nothing
    assert _files(out) == _files(reference)
    for name in _files(reference):
        if name == "loftq_report.json":
            assert _comparable_report(out / name) == _comparable_report(reference / name)
        elif name not in ("loftq_layers.png", "manifest.json"):  # these hash the report's timings
            assert _sha256(out / name) == _sha256(reference / name), name


def test_merge_converts_a_part_that_is_missing(converted, tmp_path: Path) -> None:
    src, reference, _, _ = converted("llama")
    shards = _weight_files(src)
    out = tmp_path / "out"
    convert_part(LocalSource(src), LocalDestination(out), _options(), shards[:1])
    report = convert(LocalSource(src), LocalDestination(out), _options(), trust_parts=True)
    assert report.summary.shards_resumed == 1
    for name in [*shards, ADAPTER_WEIGHTS]:
        assert _sha256(out / name) == _sha256(reference / name), name


def test_part_refuses_calibrated_options_and_unknown_shards(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidOptions, match="cannot be split"):
        convert_part(LocalSource(tiny_llama), LocalDestination(tmp_path), _options(objective="activation"), ["x"])
    with pytest.raises(InvalidOptions, match="not shards of this checkpoint"):
        convert_part(LocalSource(tiny_llama), LocalDestination(tmp_path), _options(), ["model-99.safetensors"])


def test_concurrent_fits_write_the_same_checkpoint(converted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fits in flight at once (as on a GPU) finish out of order; the output is still in file order and identical."""
    import loftq.converter

    src, reference, _, reference_events = converted("llama")
    monkeypatch.setattr(loftq.converter, "fit_concurrency", lambda device: 3)
    events: list = []
    convert_directory(src, tmp_path, _options(), on_progress=events.append)
    modules = [e.layer.module for e in events if e.stage == "layer"]
    assert modules == [e.layer.module for e in reference_events if e.stage == "layer"]
    assert set(modules) == EXPECTED_TARGETS["llama"]
    for name in [*_weight_files(src), ADAPTER_WEIGHTS]:
        assert _sha256(tmp_path / name) == _sha256(reference / name), name
