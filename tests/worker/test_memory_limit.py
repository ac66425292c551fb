"""The per-job memory limit is on by default (worker/limits.py): three quarters of the memory
the worker may use, the host's or its cgroup's when lower, unless LOFTQ_WORKER_MEMORY_LIMIT_BYTES
says otherwise (``0``/``off``: none). Applied in a real child process, as the Celery pool child
applies it before each task; tests/integration/test_worker_faults.py runs jobs against it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import Settings
from worker.limits import DEFAULT_SHARE, cgroup_limits

GIB = 1 << 30

# In the child: the engine imported first (the limit is measured from the loaded process), then
# the limit applied from the environment, then an allocation beyond it attempted. RLIMIT_AS
# refuses the mapping itself, so nothing of the allocation is ever touched.
_CHILD = """
import json, resource, torch
import loftq.converter
from service.settings import Settings
from worker.limits import address_space_bytes, apply_memory_limit, default_allowance, exhausted_resource
before = address_space_bytes()
limit = apply_memory_limit(Settings())
soft, _ = resource.getrlimit(resource.RLIMIT_AS)
error = None
if limit is not None:
    try:
        torch.empty(limit - before + (1 << 30), dtype=torch.uint8)
    except BaseException as exc:
        error = exhausted_resource(exc).code if exhausted_resource(exc) else repr(exc)
print(json.dumps({"before": before, "limit": limit, "soft": soft, "default": default_allowance(), "error": error}))
"""


def _child(setting: str | None) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "LOFTQ_WORKER_MEMORY_LIMIT_BYTES"}
    env |= {"LOFTQ_DEVICE": "cpu", "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    if setting is not None:
        env["LOFTQ_WORKER_MEMORY_LIMIT_BYTES"] = setting
    result = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _mem_total() -> int:
    with open("/proc/meminfo") as meminfo:
        return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemTotal:"))


def test_unset_the_limit_is_three_quarters_of_the_workers_memory() -> None:
    child = _child(None)
    memory = min([_mem_total(), *cgroup_limits()])
    assert child["default"] == int(memory * DEFAULT_SHARE)
    assert child["limit"] == child["soft"]  # applied to the process
    assert 0 <= child["limit"] - child["before"] - child["default"] < 256 << 20  # loaded process + allowance
    assert child["error"] == "out_of_memory"  # beyond it, an allocation fails inside the job


@pytest.mark.parametrize("setting", ["0", "off", "OFF"])
def test_zero_or_off_turns_it_off(setting: str) -> None:
    child = _child(setting)
    assert child["limit"] is None and child["soft"] == -1  # RLIM_INFINITY


def test_an_explicit_allowance_is_used_as_given() -> None:
    child = _child(str(2 * GIB))
    assert 0 <= child["limit"] - child["before"] - 2 * GIB < 256 << 20
    assert child["error"] == "out_of_memory"


@pytest.mark.parametrize("setting", ["5", "-1", "lots"])
def test_settings_refuse_allowances_that_are_typos(setting: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOFTQ_WORKER_MEMORY_LIMIT_BYTES", setting)
    with pytest.raises(ValueError, match="worker_memory_limit_bytes"):
        Settings()


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limits_are_read_up_to_the_root(tmp_path: Path) -> None:
    root = tmp_path / "sys/fs/cgroup"
    _write(root / "memory.max", "max\n")
    _write(root / "jobs/memory.max", f"{4 * GIB}\n")
    _write(root / "jobs/worker/memory.max", "max\n")  # no limit of its own: the parent's holds
    _write(tmp_path / "cgroup", "0::/jobs/worker\n")
    assert cgroup_limits(root, tmp_path / "cgroup") == [4 * GIB]


def test_cgroup_v1_limits_are_read_and_its_no_limit_number_ignored(tmp_path: Path) -> None:
    root = tmp_path / "sys/fs/cgroup"
    _write(root / "memory/memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    _write(root / "memory/docker/abc/memory.limit_in_bytes", f"{2 * GIB}\n")
    _write(tmp_path / "cgroup", "5:cpu:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    assert cgroup_limits(root, tmp_path / "cgroup") == [2 * GIB]


def test_no_cgroup_information_means_the_host_memory_decides(tmp_path: Path) -> None:
    assert cgroup_limits(tmp_path / "none", tmp_path / "missing") == []
