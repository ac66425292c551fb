"""Helpers for tests that start real server and worker processes."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import httpx
import pytest


def _wait_until(predicate: Callable[[], bool], what: str, processes: list[subprocess.Popen], timeout: float = 60) -> None:
    """Poll ``predicate`` until true; fail at once if one of ``processes`` exits meanwhile."""
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


@pytest.fixture(scope="session")
def wait_until() -> Callable[..., None]:
    return _wait_until
