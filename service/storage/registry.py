"""Which store ``settings.storage`` names.

Each backend lives in its own module and offers a ``<name>_store(settings)`` factory; this
table is the one place that maps the setting's values to them. Adding a backend is a new
module, a line here, and its name in the ``storage`` Literal of service/settings.py (a test
checks that the two agree).
"""

from __future__ import annotations

from collections.abc import Callable

from service.settings import Settings
from service.storage.base import ObjectStore
from service.storage.local import local_store
from service.storage.s3 import s3_store

BACKENDS: dict[str, Callable[[Settings], ObjectStore]] = {
    "local": local_store,
    "s3": s3_store,
}


def store_from_settings(settings: Settings) -> ObjectStore:
    """The artifact store the settings configure."""
    try:
        make = BACKENDS[settings.storage]
    except KeyError:
        known = ", ".join(sorted(BACKENDS))
        raise ValueError(f"unknown storage backend {settings.storage!r} (known: {known})") from None
    return make(settings)
