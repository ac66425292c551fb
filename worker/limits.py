"""One job must not exhaust its worker's host: a memory limit per job, and the error codes
of the resources a job can run out of.

``LOFTQ_WORKER_MEMORY_LIMIT_BYTES`` is applied in the Celery pool child at the start of each
task, as RLIMIT_AS, once the engine (torch) is imported: the job may add that much address
space to what the loaded worker already maps. An allocation beyond it fails inside the job
(Python's MemoryError, torch's "DefaultCPUAllocator: can't allocate memory"), which ends the
job ``out_of_memory`` while the worker lives on, instead of the kernel's OOM killer choosing
a process on a shared host. Every child runs one task (``worker_max_tasks_per_child=1``), so
the limit ends with it; the parent never has one.

Unset, the allowance is three quarters of the memory the worker may use
(``default_allowance``): the host's, or its cgroup's limit when lower (a container). It comes
on top of the loaded worker (0.65 GiB here), the Celery parent and whatever else the host
runs, so the last quarter is left to them: on any host, a job that needs more than the machine
has fails ``out_of_memory`` before the OOM killer picks a process. ``0`` or ``off`` turns the
limit off; several workers on one host should each be given their share.

Address space is not resident memory: glibc reserves 64 MiB per malloc arena (up to 8 per
core) and every thread its stack, so workers run with ``MALLOC_ARENA_MAX=2`` (``loftq-service
serve`` and the deploy files set it) and a limit that leaves room for those reservations
(docs/adr/0003-service.md). CPU workers only: the CUDA driver reserves address space far
beyond the memory it uses, so on a CUDA device the limit is not applied.
"""

from __future__ import annotations

import errno
import logging
import resource
import sys
from pathlib import Path

from service.models import ErrorInfo
from service.settings import Settings

log = logging.getLogger(__name__)

_OOM_MESSAGES = ("can't allocate memory", "out of memory")  # torch's CPU allocator, CUDA, MPS
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def address_space_bytes() -> int | None:
    """This process's mapped address space (VmSize), or None where /proc does not say."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


DEFAULT_SHARE = 0.75
"""Of the worker's memory, what one job may add when LOFTQ_WORKER_MEMORY_LIMIT_BYTES is unset."""
_UNLIMITED_CGROUP = 1 << 60  # cgroup v1 writes "no limit" as a number near 2^63


def _read_bytes(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) < _UNLIMITED_CGROUP else None


def cgroup_limits(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> list[int]:
    """The memory limits of this process's cgroups, v2 (every level up to the root) or v1."""
    limits: list[int | None] = []
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        hierarchy, controllers, group = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0":
            directory = root / group.lstrip("/")
            for level in [directory, *directory.parents]:
                if level == root.parent:
                    break
                limits.append(_read_bytes(level / "memory.max"))
        elif "memory" in controllers.split(","):
            for directory in (root / "memory" / group.lstrip("/"), root / "memory"):
                limits.append(_read_bytes(directory / "memory.limit_in_bytes"))
    return [limit for limit in limits if limit]


def _host_memory() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def default_allowance() -> int | None:
    """Three quarters of the memory this worker may use (the module docstring says why), or
    None where the system does not say how much that is."""
    known = [size for size in (_host_memory(), *cgroup_limits()) if size]
    return int(min(known) * DEFAULT_SHARE) if known else None


def apply_memory_limit(settings: Settings) -> int | None:
    """Limit this process's address space to what it maps now, engine loaded, plus
    ``settings.worker_memory_limit_bytes`` (unset: ``default_allowance()``; 0: no limit).
    Returns the limit set, None when none is."""
    allowance = settings.worker_memory_limit_bytes
    if allowance == 0:
        return None
    import torch

    import loftq.converter  # noqa: F401 - the engine's own mappings are not the job's allowance

    if settings.device.startswith("cuda") or (settings.device == "auto" and torch.cuda.is_available()):
        if allowance is not None:  # asked for explicitly: say why it is not there
            log.warning("LOFTQ_WORKER_MEMORY_LIMIT_BYTES is not applied on a CUDA worker (CUDA reserves address space it never uses)")
        return None
    if allowance is None:
        allowance = default_allowance()
        if allowance is None:
            log.warning("no per-job memory limit: this system does not say how much memory it has (set LOFTQ_WORKER_MEMORY_LIMIT_BYTES)")
            return None
    current = address_space_bytes()
    if current is None:
        log.warning("LOFTQ_WORKER_MEMORY_LIMIT_BYTES is not applied: this system does not report the address space")
        return None
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = current + allowance if hard == resource.RLIM_INFINITY else min(current + allowance, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    log.info("address space limited to %d MiB (%d MiB mapped at the start of the job)", limit >> 20, current >> 20)
    return limit


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
        return True
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _OOM_MESSAGES)


def _summary(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def exhausted_resource(exc: BaseException) -> ErrorInfo | None:
    """``out_of_memory`` or ``disk_full`` when ``exc``, or an exception it was raised from or
    while handling, says the worker ran out of memory or disk; None otherwise. The chain is
    walked because the exhaustion often surfaces wrapped (an engine thread, a library)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if _is_out_of_memory(current):
            return ErrorInfo(code="out_of_memory", message=f"the worker ran out of memory ({_summary(current)})")
        if isinstance(current, OSError) and current.errno in _DISK_FULL:
            return ErrorInfo(code="disk_full", message=f"a disk of the worker is full ({_summary(current)})")
        pending += [current.__cause__, current.__context__]
    return None
