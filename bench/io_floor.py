"""The I/O floor of a conversion: the time just to read its input and write its output.

Shared by the end-to-end benchmarks (bench/end_to_end.py, bench/gpu.py). The floor copies
every file of the source to a scratch directory on the output's disk, in 64 MB pieces, plus
as many bytes again as the conversion writes beyond the source's size (adapters, journal),
and fsyncs each file: no converter can read its input and write its output faster than that.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path


def evict(*directories: Path) -> bool:
    """Make the next reads of these files come from disk: their pages are written back and
    dropped from the page cache (``posix_fadvise(DONTNEED)``). Only the checkpoint's files,
    not the interpreter's libraries, which a long-running worker would have warm anyway.
    False where the platform cannot (then every figure is measured warm)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    os.sync()
    for directory in directories:
        for path in (p for p in Path(directory).rglob("*") if p.is_file()):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


def io_floor(source: Path, scratch: Path, extra_bytes: int, chunk: int = 64 << 20) -> dict:
    """Copy every file under ``source`` to ``scratch`` (plus ``extra_bytes`` more), fsynced;
    ``scratch`` is removed afterwards."""
    scratch.mkdir(parents=True, exist_ok=True)
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    read = written = 0
    started = time.perf_counter()
    for index, path in enumerate(sorted(p for p in source.rglob("*") if p.is_file())):
        with open(path, "rb", buffering=0) as src, open(scratch / f"{index}.bin", "wb", buffering=0) as dst:
            while n := src.readinto(buffer):
                read += n
                written += dst.write(view[:n])
            os.fsync(dst.fileno())
    with open(scratch / "extra.bin", "wb", buffering=0) as dst:
        left = max(extra_bytes, 0)
        while left > 0:
            step = min(chunk, left)
            written += dst.write(view[:step])
            left -= step
        os.fsync(dst.fileno())
    seconds = time.perf_counter() - started
    shutil.rmtree(scratch)
    return {"seconds": seconds, "bytes_read": read, "bytes_written": written, "mb_per_s": (read + written) / seconds / 1e6}
