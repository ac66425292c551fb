"""The lease watchdog: a small process beside each leased task, so that a job never runs twice
at once and a job that must stop is really stopped.

A lease renewed only from the job's own interpreter lapses whenever that interpreter cannot
run Python (a regex or another C call holding the GIL, a stopped or swapped-out process),
and the sweeper then hands the job out again while the first attempt still lives. So every
lease a worker takes (a job's, a part's, a merge's) gets this process, started by the job
process (``python -m worker.watchdog``, so nothing of the job's state is inherited) and
therefore its child. Every second (a third of the lease TTL if shorter) it:

* renews the lease with the owner's token while its parent, the job process, lives;
* checks whether the job must stop: cancelled, ended (a part whose job another part failed),
  its lease lost (another worker owns the work now), or past ``job_timeout_seconds``. The job
  stops by itself between layers; one that has not within ``cancel_grace_seconds`` is
  SIGKILLed. Once it is gone the watchdog records what that calls for: a timeout fails the
  job ``timeout`` (fenced with the lease); the lease is released (unless lost) so a cancelled
  job is finished, its artifacts deleted, by the killed task's redelivery (Celery sends it
  again at once when a pool child dies) or by the sweeper (service/sweeper.py);
* is killed by the job process when the task is over (which then releases the lease itself),
  and exits when the job process dies (then nobody renews, and the lease lapses as for any
  dead worker): its stdin, a pipe from the job process, reaches end-of-file.

The job process watches back (``worker.runner.LeaseKeeper``): a watchdog that exits while the
task still runs makes the job process kill itself, so no job outlives what vouches for it.
The decisions are in docs/adr/0003-service.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time

import redis

from service.errors import JobNotFound
from service.lifecycle import service_lifecycle
from service.models import ErrorInfo, JobState
from service.queue import JobQueue
from service.settings import get_settings
from service.storage import store_from_settings
from service.store import JobStore

log = logging.getLogger("worker.watchdog")


@dataclasses.dataclass(frozen=True)
class WatchConfig:
    """What the job process tells its watchdog (one JSON line on its stdin)."""

    url: str  # the job store's Redis URL
    prefix: str
    retention_seconds: int
    job_id: str
    lease: str  # the lease id: the job's, or JobStore.part_lease_id(...)
    owner: str  # the lease's owner token
    ttl: int
    grace: float  # LOFTQ_CANCEL_GRACE_SECONDS
    deadline: float  # unix time of the task's time limit
    timeout_seconds: int  # LOFTQ_JOB_TIMEOUT_SECONDS, for the failed job's message
    pid: int  # the job process: the watchdog's parent


class Watchdog:
    """The job process's handle on its watchdog process."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process

    @classmethod
    def start(cls, store: JobStore, **config: object) -> Watchdog:
        """A watchdog for this process; ``config``: the ``WatchConfig`` fields but the store's and the pid."""
        if store.url is None:
            raise ValueError("a lease watchdog needs a job store made by JobStore.from_url")
        watch = WatchConfig(url=store.url, prefix=store.prefix, retention_seconds=store.retention_seconds, pid=os.getpid(), **config)
        process = subprocess.Popen([sys.executable, "-m", "worker.watchdog"], stdin=subprocess.PIPE)
        try:
            process.stdin.write(json.dumps(dataclasses.asdict(watch)).encode() + b"\n")
            process.stdin.flush()
        except OSError:
            process.kill()
            process.wait()
            raise
        return cls(process)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """The task is over: end the watchdog, at once (it may still be importing), and reap it,
        so that it renews nothing once the lease is released."""
        self.process.kill()
        self.process.wait()
        with contextlib.suppress(OSError):
            self.process.stdin.close()


# --------------------------------------------------------------------------- the process


def watch(store: JobStore, config: WatchConfig, pipe_fd: int) -> str | None:
    """Keep the lease while the job process lives; stop the job when it must stop. Returns why
    it killed the job process, or None when the job process died. ``pipe_fd``: the read end
    of a pipe only the job process writes to (end-of-file: it is gone)."""
    tick = min(1.0, config.ttl / 3)
    reason, since = None, 0.0
    while os.getppid() == config.pid:
        seen = _stop_reason(store, config, _renew(store, config))
        if seen is not None:
            if reason is None:
                since = time.monotonic()
            reason = seen
            if time.monotonic() - since >= config.grace:
                _kill(store, config, reason, tick)
                return reason
        readable, _, _ = select.select([pipe_fd], [], [], tick)
        if readable and not os.read(pipe_fd, 4096):
            break  # end-of-file: the job process is gone
    return None  # the job process died: its lease lapses


def _renew(store: JobStore, config: WatchConfig) -> bool | None:
    """Whether the lease is still this owner's; None when the job store cannot be reached."""
    try:
        return store.renew_lease(config.lease, config.owner, config.ttl)
    except redis.RedisError as exc:
        log.warning("could not renew the lease %s (will retry): %s", config.lease, exc)
        return None


def _stop_reason(store: JobStore, config: WatchConfig, held: bool | None) -> str | None:
    """Why the job must stop now ("lost", "ended", "cancelled", "timeout"), or None."""
    if held is False:
        return "lost"
    try:
        if store.get(config.job_id).state.finished:
            return "ended"
        if store.cancel_requested(config.job_id):
            return "cancelled"
    except JobNotFound:
        return "ended"
    except redis.RedisError:
        pass  # unknown for now; the deadline still counts
    return "timeout" if time.time() >= config.deadline else None


def _kill(store: JobStore, config: WatchConfig, reason: str, tick: float) -> None:
    """SIGKILL the job process, keep the lease until it is gone, then record what ``reason`` calls for."""
    log.warning(
        "job %s (lease %s): %s and still running %.0f s later; killing its process %d",
        config.job_id, config.lease, reason, config.grace, config.pid,
    )
    with contextlib.suppress(ProcessLookupError):
        os.kill(config.pid, signal.SIGKILL)
    renewed = time.monotonic()
    while os.getppid() == config.pid:  # a process in uninterruptible sleep dies when it wakes
        if reason != "lost" and time.monotonic() - renewed >= tick:
            _renew(store, config)
            renewed = time.monotonic()
        time.sleep(0.02)
    if reason == "timeout":
        message = f"the job ran longer than {config.timeout_seconds} s and was stopped"
        _fail_timeout(store, config, ErrorInfo(code="timeout", message=message))
    if reason != "lost":
        with contextlib.suppress(redis.RedisError):  # else it lapses after its TTL
            store.release_lease(config.lease, config.owner)


def _fail_timeout(store: JobStore, config: WatchConfig, error: ErrorInfo) -> None:
    """Fenced with the lease: if another worker owns the job, the end is not ours to record."""
    settings = get_settings()
    queue = JobQueue(config.url, settings.queue, webhook_queue=settings.webhook_queue)
    lifecycle = service_lifecycle(store, settings, queue=queue, artifacts=store_from_settings(settings))
    try:
        lifecycle.finish(config.job_id, JobState.failed, error=error, holder=(config.lease, config.owner))
    except redis.RedisError:
        log.exception("job %s: could not record its timeout", config.job_id)


def main() -> None:
    # Ctrl-C in a terminal or SIGTERM to the worker's process group is a warm shutdown: the
    # job may finish, and needs its lease meanwhile. The watchdog ends with its job process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/watchdog %(process)d] %(message)s")
    config = WatchConfig(**json.loads(sys.stdin.buffer.readline()))
    if os.getppid() != config.pid:
        return  # the job process is gone already
    store = JobStore.from_url(config.url, prefix=config.prefix, retention_seconds=config.retention_seconds)
    watch(store, config, sys.stdin.fileno())


if __name__ == "__main__":
    main()
