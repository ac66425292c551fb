"""What importing the engine does to the process: OpenMP threads wait passively (they sleep
instead of spinning, which beside busy neighbours cost a conversion 8.7×; bench/contention.py),
unless the environment already says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = "import os, {module}; print(os.environ.get('OMP_WAIT_POLICY'))"


def _wait_policy(module: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
    result = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], cwd=ROOT, env=clean,
                            capture_output=True, text=True, timeout=120, check=True)
    return result.stdout.strip()


@pytest.mark.parametrize("module", ["loftq", "loftq.options", "worker.tasks"])
def test_importing_the_engine_makes_openmp_threads_wait_passively(module: str) -> None:
    """The CLI, the Python API and a worker's pool children (which inherit the parent's
    environment) all load torch's OpenMP runtime after this import."""
    assert _wait_policy(module) == "PASSIVE"


def test_a_wait_policy_set_by_the_user_is_kept() -> None:
    assert _wait_policy("loftq", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
