"""``target_modules`` regexes on RE2 (loftq/target_regex.py): patterns that backtrack for
minutes in Python's engine match in microseconds, the same modules are selected as with
PEFT's ``re.fullmatch``, and what RE2 cannot take is refused with the options (Python API,
CLI) with a message that says why."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from loftq.errors import NoTargetModules
from loftq.options import ConvertOptions
from loftq.target_regex import MAX_PATTERN_LENGTH, compile_target_regex, fullmatch

# Module names of the real architectures in the fixtures and of a 31-character one.
NAMES = [
    "encoder.layer.0.attention.self.query",
    "encoder.layer.11.attention.output.dense",
    "model.layers.3.self_attn.q_proj",
    "model.layers.10.mlp.down_proj",
    "transformer.h.0.attn.c_attn",
    "lm_head",
    "a" * 31,
]


@pytest.mark.parametrize("pattern", ["(.*.*)*x", "(a*)*b", "(a|aa)*c", "(.*){20}z"])
def test_patterns_that_backtrack_in_python_match_at_once(pattern: str) -> None:
    started = time.perf_counter()
    for name in NAMES + ["a" * 10_000]:
        assert not fullmatch(pattern, name)
    assert time.perf_counter() - started < 1  # Python's engine: minutes for one 31-character name


@pytest.mark.parametrize(
    "pattern",
    [r".*\.attention\..*", r".*(q_proj|v_proj)", r"model\.layers\.\d+\.mlp\..*", r"lm_head", r".*\.c_attn", r"[a-z_.0-9]+", r"encoder\.layer\.1[01]?\..*"],
)
def test_the_same_modules_are_selected_as_with_pythons_fullmatch(pattern: str) -> None:
    assert [n for n in NAMES if fullmatch(pattern, n)] == [n for n in NAMES if re.fullmatch(pattern, n)]


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"(?=.*q).*", "(?="),
        (r"(?!.*k).*", "(?!"),
        (r"(?<=self\.)query", "(?<"),
        (r"(query)\.\1", r"\1"),
        ("(unclosed", "missing )"),
    ],
)
def test_patterns_re2_cannot_take_are_refused_with_the_reason(pattern: str, why: str) -> None:
    with pytest.raises(ValidationError) as refused:
        ConvertOptions(target_modules=pattern)
    message = refused.value.errors()[0]["msg"]
    assert "RE2" in message and why in message and "lookaround" in message, message


def test_long_patterns_are_refused() -> None:
    ConvertOptions(target_modules="a" * MAX_PATTERN_LENGTH)
    with pytest.raises(ValidationError, match=f"at most {MAX_PATTERN_LENGTH}"):
        ConvertOptions(target_modules="a" * (MAX_PATTERN_LENGTH + 1))
    with pytest.raises(ValidationError, match="RE2"):
        ConvertOptions(target_modules="(a{100}){100}")  # short, but a program RE2 will not build


def test_invalid_patterns_log_nothing_to_stderr() -> None:
    """RE2 logs parse errors through absl unless told not to; the message carries the reason."""
    code = "from loftq.target_regex import compile_target_regex as c\ntry: c('(?=x)')\nexcept ValueError: pass"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == ""


def test_a_backtracking_pattern_selects_nothing_in_a_real_model_at_once(tiny_llama: Path) -> None:
    from loftq.converter import plan
    from loftq.storage import LocalSource

    started = time.perf_counter()
    with pytest.raises(NoTargetModules):
        plan(LocalSource(tiny_llama), ConvertOptions(rank=4, target_modules="(.*.*)*x"))
    assert time.perf_counter() - started < 30  # reading the index and building the meta model; matching takes microseconds
    _, _, layout = plan(LocalSource(tiny_llama), ConvertOptions(rank=4, target_modules=r".*\.(q|v)_proj"))
    assert layout.targets and all(t.module.endswith(("q_proj", "v_proj")) for t in layout.targets.values())
    assert compile_target_regex(r".*\.(q|v)_proj") is compile_target_regex(r".*\.(q|v)_proj")  # compiled once


def test_the_cli_refuses_a_lookahead_with_invalid_options(tiny_bert: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loftq.cli", "convert", str(tiny_bert), str(tmp_path / "out"), "--target-regex", "(?=.*query).*"],
        capture_output=True, text=True, timeout=300, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    assert "[invalid_options]" in result.stderr and "RE2" in result.stderr
    assert "Traceback" not in result.stderr
