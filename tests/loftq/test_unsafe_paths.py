"""File names from a checkpoint's index, an object listing or a request never leave their directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loftq.converter import convert_directory
from loftq.errors import UnsafePath
from loftq.options import ConvertOptions
from loftq.storage import LocalDestination, LocalSource, safe_relative

UNSAFE = ["../secret", "a/../../secret", "/etc/passwd", "model\x00.safetensors", "", "."]


@pytest.mark.parametrize("name", UNSAFE)
def test_unsafe_names_are_refused_with_their_code(name: str, tmp_path: Path) -> None:
    with pytest.raises(UnsafePath) as refused:
        safe_relative(name)
    assert refused.value.code == "unsafe_path"
    with pytest.raises(UnsafePath):
        with LocalSource(tmp_path).open_local(name):
            pass
    with pytest.raises(UnsafePath):
        LocalDestination(tmp_path / "out").staging_path(name)


def test_safe_names_stay_inside(tmp_path: Path) -> None:
    assert safe_relative("tokenizer/vocab.txt") == "tokenizer/vocab.txt"
    assert LocalDestination(tmp_path).staging_path("a/b.json").is_relative_to(tmp_path)


def test_an_index_pointing_outside_the_checkpoint_fails_before_any_output(tiny_llama: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    (tmp_path / "outside.safetensors").write_bytes((src / sorted(src.glob("model-*.safetensors"))[0].name).read_bytes())
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../outside.safetensors"
    index_path.write_text(json.dumps(index))
    out = tmp_path / "out"
    with pytest.raises(UnsafePath):
        convert_directory(src, out, ConvertOptions(rank=4, device="cpu"))
    assert not (out / "manifest.json").exists()
