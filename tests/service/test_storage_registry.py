"""service.storage.registry: every value of ``settings.storage`` has a backend and every
backend a value, an unknown one is refused by name, and importing the package loads no boto3
(the API imports it at startup)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from service.settings import Settings
from service.storage import BACKENDS, LocalObjectStore, s3_error_code, store_from_settings

ROOT = Path(__file__).resolve().parents[2]


def test_the_settings_literal_and_the_registry_agree() -> None:
    assert set(get_args(Settings.model_fields["storage"].annotation)) == set(BACKENDS)


def test_the_local_backend(tmp_path: Path) -> None:
    store = store_from_settings(Settings(storage="local", local_storage_root=tmp_path / "a"))
    assert isinstance(store, LocalObjectStore) and store.root == tmp_path / "a"


def test_an_unknown_backend_is_refused_naming_the_known_ones(tmp_path: Path) -> None:
    settings = Settings(storage="local", local_storage_root=tmp_path).model_copy(update={"storage": "ftp"})
    with pytest.raises(ValueError, match=r"unknown storage backend 'ftp' \(known: local, s3\)"):
        store_from_settings(settings)


def test_s3_error_code() -> None:
    from botocore.exceptions import ClientError

    error = ClientError({"Error": {"Code": "NoSuchBucket", "Message": "gone"}}, "ListObjectsV2")
    assert s3_error_code(error) == "NoSuchBucket"
    assert s3_error_code(ClientError({}, "HeadObject")) == ""
    assert s3_error_code(OSError("disk")) == ""


def test_importing_storage_loads_no_boto3() -> None:
    code = "import sys, service.storage; print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
