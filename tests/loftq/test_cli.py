"""The ``loftq`` command line, run as users run it: a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def loftq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loftq.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )


def test_help_explains_every_option() -> None:
    result = loftq("convert", "--help")
    assert result.returncode == 0
    for option in ("--quant", "--bits", "--rank", "--alpha", "--iters", "--svd", "--target", "--target-regex", "--backbone-format", "--device"):
        assert option in result.stdout


def test_convert_then_inspect(tiny_bert: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = loftq("convert", str(tiny_bert), str(out), "--rank", "8", "--alpha", "32", "--iters", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "mean error, with adapters" in result.stdout
    report = json.loads((out / "loftq_report.json").read_text())
    assert report["options"]["rank"] == 8 and report["options"]["lora_alpha"] == 32.0
    assert f"{report['summary']['mean_error']:.5f}" in result.stdout

    inspected = loftq("inspect", str(out), "--layers", "--verify")
    assert inspected.returncode == 0, inspected.stderr
    assert "all files match manifest.json" in inspected.stdout
    assert "encoder.layer.0.attention.self.query" in inspected.stdout

    (out / "model.safetensors").write_bytes(b"tampered")
    tampered = loftq("inspect", str(out), "--verify")
    assert tampered.returncode == 2
    assert "checksum_mismatch" in tampered.stderr and "model.safetensors" in tampered.stderr


def test_targets_by_name(tiny_llama: Path, tmp_path: Path) -> None:
    result = loftq("convert", str(tiny_llama), str(tmp_path), "-r", "4", "--target", "q_proj", "--target", "v_proj")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "loftq_init" / "adapter_config.json").read_text())
    assert config["target_modules"] and all(m.endswith(("q_proj", "v_proj")) for m in config["target_modules"])


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--rank", "0"], "invalid_options"),
        (["--quant", "nf4", "--bits", "3"], "invalid_options"),
        (["--quant", "int", "--bits", "9"], "invalid_options"),
        (["--target", "nope"], "no_target_modules"),
        (["--target-regex", "(unclosed"], "no_target_modules"),
        (["--rank", "4096"], "invalid_options"),
    ],
)
def test_bad_options_exit_2_with_a_code(tiny_bert: Path, tmp_path: Path, args: list[str], code: str) -> None:
    result = loftq("convert", str(tiny_bert), str(tmp_path / "out"), *args)
    assert result.returncode == 2
    assert f"[{code}]" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_source_and_incomplete_output(tmp_path: Path) -> None:
    missing = loftq("convert", str(tmp_path / "nothing"), str(tmp_path / "out"))
    assert missing.returncode == 2 and "[source_not_found]" in missing.stderr
    incomplete = loftq("inspect", str(tmp_path))
    assert incomplete.returncode == 2 and "[incomplete_checkpoint]" in incomplete.stderr
