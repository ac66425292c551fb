"""The package boundaries of docs/adr/0009-service-core.md, checked on the source and at import:

    loftq/  (engine)   ← service/ (core) ← api/ (HTTP)
                                        ← worker/ (Celery)

The core imports neither FastAPI nor torch; the worker never imports FastAPI or api; the API
never imports torch or worker; the engine knows nothing of the service."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "service": {"fastapi", "starlette", "uvicorn", "torch", "api", "worker"},
    "worker": {"fastapi", "starlette", "uvicorn", "api"},
    "api": {"torch", "worker"},
    "loftq": {"service", "api", "worker", "loftq_client", "fastapi", "starlette", "celery", "redis", "boto3"},
    "loftq_client": {"service", "api", "worker", "loftq", "torch"},
}


def _imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package: str) -> None:
    crossings = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert not {path: names for path, names in crossings.items() if names}


def _loaded_after_import(modules: list[str]) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


def _modules(package: str) -> list[str]:
    return [
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in sorted((ROOT / package).rglob("*.py"))
    ]


def test_the_core_loads_neither_fastapi_nor_torch() -> None:
    loaded = _loaded_after_import(_modules("service"))
    assert not loaded & {"fastapi", "starlette", "torch", "api", "worker"}


def test_a_worker_process_loads_neither_fastapi_nor_the_api() -> None:
    loaded = _loaded_after_import(["worker.tasks", "worker.webhook_app"])
    assert not loaded & {"fastapi", "starlette", "api"}
    assert "torch" not in loaded, "the Celery parent never imports torch (its pool children do, per job)"


def test_the_api_loads_no_torch() -> None:
    assert not _loaded_after_import(["api.main", "api.server", "api.embedded"]) & {"torch", "worker"}
