"""Artifact storage shared by the API (download links, local downloads) and the worker (uploads).

Several backends behind one small protocol (``base.ObjectStore``): a directory on local disk
(``local``) and an S3-compatible bucket (``s3``); ``registry`` maps ``settings.storage`` to
them. Keys are POSIX relative paths ("jobs/<id>/manifest.json"); every backend refuses keys
that could escape its root ("..", absolute paths, NUL), so a key that is safe for one is safe
for the others.

No torch here, and no boto3 until an S3 store is used. Everything the rest of the code base
uses is importable from ``service.storage`` itself.
"""

from loftq.storage import sha256_file
from service.storage.base import (
    ObjectStore,
    StorageUnavailable,
    StoredObject,
    UnsafeKey,
    safe_key,
    safe_prefix,
)
from service.storage.local import LocalObjectStore, local_store
from service.storage.registry import BACKENDS, store_from_settings
from service.storage.s3 import (
    MULTIPART_THRESHOLD,
    S3ObjectStore,
    s3_error_code,
    s3_store,
    storage_unavailable,
)

__all__ = [
    "BACKENDS",
    "MULTIPART_THRESHOLD",
    "LocalObjectStore",
    "ObjectStore",
    "S3ObjectStore",
    "StorageUnavailable",
    "StoredObject",
    "UnsafeKey",
    "local_store",
    "s3_error_code",
    "s3_store",
    "safe_key",
    "safe_prefix",
    "sha256_file",
    "storage_unavailable",
    "store_from_settings",
]
