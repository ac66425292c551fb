"""Run one job: lease, stream the source through the engine, publish artifacts, record the end.

Kept apart from the Celery task so the whole life of a job can be read in one place and
tested without a broker.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

from api.errors import InvalidTransition, ServiceError
from api.jobstore import JobStore
from api.schemas import ErrorInfo, Job, JobState, JobSummary, Progress
from api.settings import Settings
from api.storage import store_from_settings

log = logging.getLogger(__name__)


class _LeaseKeeper(threading.Thread):
    """Renews the job's lease while it runs; a dead worker's lease expires and frees the job."""

    def __init__(self, store: JobStore, job_id: str, owner: str, ttl: int) -> None:
        super().__init__(daemon=True, name=f"lease-{job_id}")
        self.store, self.job_id, self.owner, self.ttl = store, job_id, owner, ttl
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.ttl / 3):
            if not self.store.renew_lease(self.job_id, self.owner, self.ttl):
                log.warning("lost the lease of job %s", self.job_id)
                return


class JobRunner:
    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def run(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job.state.finished:
            return  # a redelivered message for a job that already ended
        if job.state is JobState.cancelling or self.store.cancel_requested(job_id):
            self._end(job_id, JobState.cancelled)
            return
        ttl = self.settings.lease_seconds
        if not self.store.acquire_lease(job_id, self.owner, ttl):
            log.info("job %s is leased by another worker; not running it twice", job_id)
            return
        keeper = _LeaseKeeper(self.store, job_id, self.owner, ttl)
        keeper.start()
        try:
            self._run_leased(job)
        finally:
            keeper.stopped.set()
            self.store.release_lease(job_id, self.owner)

    def _run_leased(self, job: Job) -> None:
        attempts = self.store.increment_attempts(job.id)
        if attempts > self.settings.max_attempts:
            self._end(job.id, JobState.failed, ErrorInfo(code="worker_lost", message=f"gave up after {attempts - 1} attempts"))
            return
        if job.state is JobState.queued:
            self.store.transition(job.id, JobState.running)
        scratch = Path(tempfile.mkdtemp(prefix=f"{job.id}-", dir=self._work_dir()))
        try:
            report = self._convert(job, scratch)
        except BaseException as exc:  # noqa: BLE001 - every failure must end the job with a reason
            self._fail(job, exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        summary = JobSummary(
            layers=report.summary.layers,
            mean_error_quant=report.summary.mean_error_quant,
            mean_error=report.summary.mean_error,
            seconds=report.summary.seconds,
        )
        self.store.update_progress(job.id, self._progress(job.id, stage="done"))
        self.store.observe_duration("job", report.summary.seconds)
        self._end(job.id, JobState.succeeded, summary=summary)

    def _work_dir(self) -> Path:
        self.settings.work_dir.mkdir(parents=True, exist_ok=True)
        return self.settings.work_dir

    def _convert(self, job: Job, scratch: Path):  # -> loftq.report.Report
        # The engine (and torch) are imported here, in the worker's child process only.
        from loftq.converter import convert
        from loftq.errors import Cancelled

        from worker.sources import ObjectStoreDestination, open_source

        options = job.request.options
        if options.device == "auto" and self.settings.device != "auto":
            options = options.model_copy(update={"device": self.settings.device})
        source = open_source(job.request.source, self.settings, scratch / "source")
        artifacts = store_from_settings(self.settings)
        destination = ObjectStoreDestination(artifacts, job.output, scratch / "output")
        started = time.monotonic()
        cancelled = False
        read = written = 0

        def should_stop() -> bool:
            nonlocal cancelled
            cancelled = cancelled or self.store.cancel_requested(job.id)
            return cancelled

        def on_progress(event) -> None:  # loftq.report.ProgressEvent
            nonlocal read, written
            read += event.bytes_read
            written += event.bytes_written
            if event.stage == "layer" and event.layer is not None:
                layer = event.layer
                self.store.observe_duration("layer", layer.seconds)
                self.store.add_event(
                    job.id,
                    "layer",
                    {
                        "module": layer.module,
                        "index": event.layers_done,
                        "total": event.layers_total,
                        "error_quant": layer.error_quant,
                        "error": layer.error,
                        "seconds": layer.seconds,
                    },
                )
            elapsed = time.monotonic() - started
            done, total = event.layers_done, event.layers_total
            eta = elapsed / done * (total - done) if done else None
            stage = {"start": "converting", "layer": "converting", "shard": "converting"}.get(event.stage, event.stage)
            self.store.update_progress(
                job.id,
                Progress(
                    stage=stage,
                    layers_done=done,
                    layers_total=total,
                    shards_done=event.shards_done,
                    shards_total=event.shards_total,
                    bytes_read=read,
                    bytes_written=written,
                    eta_seconds=eta,
                ),
            )

        try:
            return convert(source, destination, options, on_progress=on_progress, should_stop=should_stop)
        except Cancelled:
            # Partial artifacts are removed: a cancelled job leaves nothing that looks usable.
            artifacts.delete_prefix(job.output)
            raise

    def _progress(self, job_id: str, *, stage: str) -> Progress:
        return self.store.get(job_id).progress.model_copy(update={"stage": stage, "eta_seconds": None})

    def _fail(self, job: Job, exc: BaseException) -> None:
        from loftq.errors import Cancelled, LoftQError

        if isinstance(exc, Cancelled):
            self._end(job.id, JobState.cancelled)
        elif isinstance(exc, LoftQError):
            self._end(job.id, JobState.failed, ErrorInfo(code=exc.code, message=str(exc)))
        elif isinstance(exc, ServiceError):
            self._end(job.id, JobState.failed, ErrorInfo(code=exc.code, message=exc.message))
        elif isinstance(exc, MemoryError):
            self._end(job.id, JobState.failed, ErrorInfo(code="out_of_memory", message="the worker ran out of memory"))
        elif isinstance(exc, OSError) and exc.errno == 28:
            self._end(job.id, JobState.failed, ErrorInfo(code="disk_full", message=str(exc)))
        else:
            log.exception("job %s failed", job.id)
            self._end(job.id, JobState.failed, ErrorInfo(code="internal_error", message=f"{type(exc).__name__}: {exc}"))

    def _end(self, job_id: str, state: JobState, error: ErrorInfo | None = None, summary: JobSummary | None = None) -> None:
        try:
            self.store.transition(job_id, state, error=error, summary=summary)
        except InvalidTransition:
            log.info("job %s already ended; %s not recorded", job_id, state.value)
