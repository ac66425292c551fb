"""Give freed heap memory back to the operating system between layers.

glibc keeps the pages of large freed temporaries (the fit of one layer allocates several
times the weight) in its arenas; across many layers RSS then creeps up by hundreds of MB
although nothing is in use. ``malloc_trim`` returns them. Measured on a 2 GB checkpoint:
peak RSS above baseline 679 MB without, 510 MB with, at the same speed (bench/memory.py).
Elsewhere (macOS, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


@cache
def _malloc_trim():  # type: ignore[no-untyped-def]
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
