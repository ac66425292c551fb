"""Run one job: lease, stream the source through the engine, publish artifacts, record the end.

Kept apart from the Celery task so the whole life of a job can be read in one place and
tested without a broker. A distributed job passes through here twice: first to plan and send
its parts (worker/distributed.py), then, once every part is done, as the merge
(``run(job_id, merge=True)``), which converts like a normal job but reuses the parts' shards.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import redis
from pydantic import ValidationError

from service.errors import ServiceError, request_validation_error
from service.lifecycle import service_lifecycle
from service.models import (
    CalibrationSummary,
    ErrorInfo,
    EvaluationSummary,
    Job,
    JobCreate,
    JobState,
    JobSummary,
    ModelRefinementSummary,
    Progress,
    RefinementSummary,
)
from service.queue import JobQueue
from service.settings import Settings
from service.storage import ObjectStore, store_from_settings
from service.store import MERGE, JobStore
from worker.planning import send_parts
from worker.watchdog import Watchdog

log = logging.getLogger(__name__)

# Engine progress stages (loftq.report.ProgressEvent.stage) as the job's progress shows them.
STAGES = {"start": "converting", "calibration": "calibrating", "layer": "converting", "shard": "converting"}


class LeaseLost(Exception):
    """Another worker owns the job now; this one must stop without recording an end."""


class LeaseKeeper(threading.Thread):
    """Renews the job's lease while it runs; a dead worker's lease expires and frees the job.

    A Redis hiccup does not stop the renewals; a lease that is really gone (expired and taken,
    or deleted) sets ``lost``, which the running conversion checks between layers. The
    ``watchdog`` process (worker/watchdog.py) renews it too, from outside this interpreter,
    which may be unable to run (GIL held, process stopped); if it exits while the job runs,
    nothing would keep a stuck job from being handed out again, so this process kills itself."""

    def __init__(self, store: JobStore, job_id: str, owner: str, ttl: float, watchdog: Watchdog | None = None) -> None:
        super().__init__(daemon=True, name=f"lease-{job_id}")
        self.store, self.job_id, self.owner, self.ttl = store, job_id, owner, ttl
        self.watchdog = watchdog
        self.stopped = threading.Event()
        self.lost = threading.Event()

    def stop(self) -> None:
        """Stop renewing, and the watchdog with it (waiting until it has exited)."""
        self.stopped.set()  # first: the watchdog's exit is expected from here on
        if self.watchdog is not None:
            self.watchdog.stop()

    def run(self) -> None:
        while not self.stopped.wait(self.ttl / 3):
            if self.watchdog is not None and not self.watchdog.alive() and not self.stopped.is_set():
                log.error("the lease watchdog of %s exited while its job runs; killing this process", self.job_id)
                os.kill(os.getpid(), signal.SIGKILL)
            try:
                renewed = self.store.renew_lease(self.job_id, self.owner, self.ttl)
            except redis.RedisError as exc:
                log.warning("could not renew the lease of job %s (will retry): %s", self.job_id, exc)
                continue
            if not renewed:
                log.warning("lost the lease of job %s", self.job_id)
                self.lost.set()
                return


@contextmanager
def store_outage_tolerated(what: str) -> Iterator[None]:
    """Progress, events and metrics are for watchers: a job store that is away for a moment
    (a restart) must not fail a conversion that is going fine. The lease keeper and the
    end-state write ride out an outage on their own."""
    try:
        yield
    except redis.RedisError as exc:
        log.warning("job store unreachable; %s not recorded: %s", what, exc)


Enqueue = Callable[..., None]  # enqueue(task name, *args): send a Celery message on the job queue


def apply_torch_threads(settings: Settings) -> None:
    """``LOFTQ_TORCH_THREADS``: CPU workers sharing a machine each get their share of its cores."""
    if settings.torch_threads is not None:
        import torch

        torch.set_num_threads(settings.torch_threads)


class JobRunner:
    def __init__(
        self, store: JobStore, settings: Settings, *, worker: str | None = None, enqueue: Enqueue | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        self.artifacts = store_from_settings(settings)
        self.lifecycle = service_lifecycle(store, settings, queue=JobQueue.from_settings(settings), artifacts=self.artifacts)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.worker = worker or socket.gethostname()  # the Celery node name, recorded per part
        self.enqueue = enqueue
        self.keeper: LeaseKeeper | None = None
        self.held: str | None = None  # the lease the work runs under now; ends are fenced with it
        # The task's soft time limit (worker/tasks.py) as a time the watchdog can act on.
        self.deadline = time.time() + settings.job_timeout_seconds

    def run(self, job_id: str, *, merge: bool = False) -> bool:
        """Run the job unless it has ended. False: another worker holds its lease (this is a
        duplicate delivery, or the holder died and the sweeper will send the job again once
        its lease has expired).

        ``merge``: the last step of a distributed job, after all its parts are done."""
        if self.store.get(job_id).state.finished:
            return True  # a redelivered message for a job that already ended
        with self.lease(job_id, job_id) as held:
            if not held:
                log.info("job %s is leased by another worker; this delivery is dropped", job_id)
                return False
            self._run_leased(self.store.get(job_id), merge=merge)
        return True

    @contextmanager
    def lease(self, lease_id: str, job_id: str) -> Iterator[bool]:
        """Hold ``lease_id`` (the job's, or a part's) for the block; False: another worker holds it.

        Renewed by a ``LeaseKeeper`` thread and by a watchdog process (worker/watchdog.py),
        which keeps it while this process is alive but cannot run, and kills this process
        when the job is cancelled or past its time limit and has not stopped within
        ``cancel_grace_seconds``. Ends recorded meanwhile are fenced with the lease."""
        ttl = self.settings.lease_seconds
        if not self.store.acquire_lease(lease_id, self.owner, ttl):
            yield False
            return
        outer = self.keeper, self.held  # a part's, while its process merges under the job's lease
        try:
            watchdog = Watchdog.start(
                self.store, job_id=job_id, lease=lease_id, owner=self.owner, ttl=ttl,
                grace=self.settings.cancel_grace_seconds, deadline=self.deadline,
                timeout_seconds=self.settings.job_timeout_seconds,
            )
        except BaseException:
            self.store.release_lease(lease_id, self.owner)
            raise
        self.keeper, self.held = LeaseKeeper(self.store, lease_id, self.owner, ttl, watchdog), lease_id
        self.keeper.start()
        try:
            yield True
        finally:
            self.keeper.stop()
            self.keeper, self.held = outer
            self.store.release_lease(lease_id, self.owner)

    def attempt(
        self,
        job: Job,
        lease_id: str,
        *,
        count: Callable[[], int],
        work: Callable[[], None],
        ended_elsewhere: Callable[[Exception], bool],
    ) -> None:
        """What every leased run does around its work (a job, a part, a merge), under the lease
        ``lease_id``: clear dead attempts' scratch; stop at once for a job that ended or is being
        cancelled; count the delivery (``count``) and fail the job worker_lost past
        LOFTQ_MAX_ATTEMPTS; run ``work``; end the job with the reason of any error, unless it is
        no longer this attempt's to end (``ended_elsewhere``)."""
        self.remove_abandoned_scratch(lease_id)
        if job.state.finished:
            return
        if job.state is JobState.cancelling or self.store.cancel_requested(job.id):
            self.cancel(job, self.artifacts)
            return
        try:
            attempts = count()
            if attempts > self.settings.max_attempts:
                self.worker_lost(job.id, attempts)
                return
            work()
        except LeaseLost as exc:
            log.warning("%s; stopping without recording an end", exc)
        except Exception as exc:  # every failure must end the job with a reason
            if not ended_elsewhere(exc):
                self.fail(job, exc, self.artifacts)

    def _run_leased(self, job: Job, *, merge: bool = False) -> None:
        def work() -> None:
            current = self.lifecycle.start(job.id) if job.state is JobState.queued else job
            scratch = Path(tempfile.mkdtemp(prefix=f"{job.id}-", dir=self._work_dir()))
            try:
                if current.request.distributed and not merge:
                    send_parts(self, current, scratch)
                    return
                report = self._convert(current, scratch, self.artifacts, trust_parts=merge)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            summary = job_summary(report)
            if merge:  # the report times the merge alone; the job ran from its start
                summary.seconds = (datetime.now(timezone.utc) - (current.started_at or current.created_at)).total_seconds()
            with store_outage_tolerated("the final progress"):
                self.lifecycle.progress(current, self._progress(current.id, stage="done"))
                self.store.observe_duration("job", summary.seconds)
            self._end(current.id, JobState.succeeded, summary=summary)

        def ended_elsewhere(exc: Exception) -> bool:
            if self.keeper is None or not self.keeper.lost.is_set():
                return False
            log.warning("job %s failed after its lease was lost (%s); stopping without recording an end", job.id, exc)
            return True

        # The merge counts its own deliveries: the planning step's are the job's.
        count = (lambda: self.store.increment_part_attempts(job.id, MERGE)) if merge else (lambda: self.store.increment_attempts(job.id))
        self.attempt(job, job.id, count=count, work=work, ended_elsewhere=ended_elsewhere)

    def worker_lost(self, job_id: str, attempts: int) -> None:
        message = f"the job was delivered {attempts} times; its workers kept dying"
        self._end(job_id, JobState.failed, ErrorInfo(code="worker_lost", message=message))

    def _work_dir(self) -> Path:
        self.settings.work_dir.mkdir(parents=True, exist_ok=True)
        return self.settings.work_dir

    def remove_abandoned_scratch(self, mine: str) -> None:
        """Scratch of attempts that died (``{job}-*``, ``{job}.part{n}-*``) is removed by the next
        task on this worker, whichever job it runs: a scratch directory is made only under its
        lease and removed before the lease is released, so one without a held lease belongs to
        nobody, and one under ``mine`` (the lease this task holds) is an earlier attempt's. A
        job that ends worker_lost is never delivered again to clean up after itself."""
        for entry in self._work_dir().glob("job_*"):
            job_id, dot, rest = entry.name.split("-", 1)[0].partition(".part")
            lease = JobStore.part_lease_id(job_id, int(rest)) if dot and rest.isdigit() else job_id
            try:
                abandoned = lease == mine or not self.store.leased(lease)
            except redis.RedisError:
                return  # unknown: keep everything until the next task
            if abandoned:
                log.info("removing scratch of an attempt that died: %s", entry)
                shutil.rmtree(entry, ignore_errors=True)

    def options(self, job: Job):  # -> loftq.options.ConvertOptions
        """The job's engine options on this worker's device. The request is validated afresh:
        the job store reads records leniently (a check added since the job was submitted must
        not make it unreadable), so one the current checks refuse fails here, invalid_request."""
        try:
            JobCreate.model_validate(job.request.model_dump(mode="json"))
        except ValidationError as exc:
            raise request_validation_error(exc.errors()) from None
        options = job.request.options
        if options.device == "auto" and self.settings.device != "auto":
            options = options.model_copy(update={"device": self.settings.device})
        return options

    def should_stop(self, job_id: str, keeper: LeaseKeeper | None, *, job_ended: bool = False) -> Callable[[], bool]:
        """The engine's check between layers: raises LeaseLost once another worker owns the
        work; True once cancellation was asked, or (``job_ended``, for parts) once the job
        ended elsewhere, e.g. another part failed it."""
        stop = False

        def check() -> bool:
            nonlocal stop
            if keeper is not None and keeper.lost.is_set():
                raise LeaseLost(f"job {job_id} is leased by another worker now")
            with store_outage_tolerated("a cancellation check"):
                stop = stop or self.store.cancel_requested(job_id) or (job_ended and self.store.get(job_id).state.finished)
            return stop

        return check

    def _convert(self, job: Job, scratch: Path, artifacts: ObjectStore, *, trust_parts: bool = False):  # -> loftq.report.Report
        from worker.sources import ObjectStoreDestination, fetch_calibration_data, open_source

        options = self.options(job)
        calibration_data = None
        if job.request.calibration_data is not None:
            self.lifecycle.progress(job, self._progress(job.id, stage="downloading"))
            calibration_data = fetch_calibration_data(
                job.request.calibration_data,
                self.settings,
                scratch / "calibration",
                tenant=job.tenant,
                location=job.inputs and job.inputs.calibration,
            )
        source = open_source(
            job.request.source, self.settings, scratch / "source", tenant=job.tenant, location=job.inputs and job.inputs.source
        )
        destination = ObjectStoreDestination(artifacts, job.output, scratch / "output")
        # The engine (and torch) are imported here, in the worker's child process only, and
        # after the source is found: a job whose source is missing fails without the import.
        from loftq.converter import convert

        apply_torch_threads(self.settings)
        started = time.monotonic()
        # A merge starts from what the parts counted: its engine run re-counts the reused
        # shards' layers from 0 and reads and writes little itself.
        floor = self.store.get(job.id).progress if trust_parts else Progress()
        read, written = floor.bytes_read, floor.bytes_written
        blocks_done = blocks_total = 0

        def on_progress(event) -> None:  # loftq.report.ProgressEvent
            nonlocal read, written, blocks_done, blocks_total
            read += event.bytes_read
            written += event.bytes_written
            if event.blocks_total:  # later (shard) events of a calibrated run do not repeat them
                blocks_done, blocks_total = event.blocks_done, event.blocks_total
            elapsed = time.monotonic() - started
            done, total = max(event.layers_done, floor.layers_done), event.layers_total
            eta = elapsed / done * (total - done) if done else None
            progress = Progress(
                stage=STAGES.get(event.stage, event.stage),
                layers_done=done,
                layers_total=total,
                blocks_done=blocks_done,
                blocks_total=blocks_total,
                shards_done=max(event.shards_done, floor.shards_done),
                shards_total=event.shards_total,
                bytes_read=read,
                bytes_written=written,
                eta_seconds=eta,
            )
            with store_outage_tolerated(f"progress of job {job.id}"):
                if event.stage in ("layer", "calibration") and event.layer is not None:
                    self.store.observe_duration("layer", event.layer.seconds)
                    self.store.add_event(job.id, "layer", layer_event(event))
                self.lifecycle.progress(job, progress)

        return convert(
            source,
            destination,
            options,
            calibration_data=calibration_data,
            on_progress=on_progress,
            should_stop=self.should_stop(job.id, self.keeper),
            trust_parts=trust_parts,
        )

    def _progress(self, job_id: str, *, stage: str) -> Progress:
        return self.store.get(job_id).progress.model_copy(update={"stage": stage, "eta_seconds": None})

    def cancel(self, job: Job, artifacts: ObjectStore) -> None:
        """Partial artifacts are removed: a cancelled job leaves nothing that looks usable."""
        try:
            artifacts.delete_prefix(job.output)
        except Exception:
            log.exception("could not remove the partial artifacts of cancelled job %s", job.id)
        self._end(job.id, JobState.cancelled)

    def fail(self, job: Job, exc: Exception, artifacts: ObjectStore) -> None:
        """End the job with the error code of ``exc`` (a cancellation ends it cancelled);
        running out of memory or disk is recognised through wrappers (worker/limits.py)."""
        from celery.exceptions import SoftTimeLimitExceeded

        from loftq.errors import Cancelled, LoftQError
        from worker.limits import exhausted_resource

        if isinstance(exc, Cancelled):
            self.cancel(job, artifacts)
        elif isinstance(exc, SoftTimeLimitExceeded):
            limit = self.settings.job_timeout_seconds
            self._end(job.id, JobState.failed, ErrorInfo(code="timeout", message=f"the job ran longer than {limit} s"))
        elif isinstance(exc, LoftQError):
            self._end(job.id, JobState.failed, ErrorInfo(code=exc.code, message=str(exc)))
        elif isinstance(exc, ServiceError):
            self._end(job.id, JobState.failed, ErrorInfo(code=exc.code, message=exc.message))
        elif (exhausted := exhausted_resource(exc)) is not None:
            log.warning("job %s failed: %s", job.id, exhausted.message)
            self._end(job.id, JobState.failed, exhausted)
        else:
            log.exception("job %s failed", job.id)
            self._end(job.id, JobState.failed, ErrorInfo(code="internal_error", message=f"{type(exc).__name__}: {exc}"))

    def _end(self, job_id: str, state: JobState, error: ErrorInfo | None = None, summary: JobSummary | None = None) -> None:
        """Record the end, fenced with the lease this runner holds now: an attempt that lost it
        is not the one the job's end belongs to (service/lifecycle.py writes every end)."""
        holder = (self.held, self.owner) if self.held is not None else None
        self.lifecycle.finish(job_id, state, error=error, summary=summary, holder=holder)


# --------------------------------------------------------------------------- report → job


def _finite(value: float | None) -> float | None:
    """NaN and inf do not survive JSON; a measurement that produced one is stored as null."""
    return value if value is not None and math.isfinite(value) else None


def layer_event(event) -> dict:  # loftq.report.ProgressEvent with a layer
    """The data of a job's "layer" event; calibrated runs add the block and the objective's errors."""
    layer = event.layer
    data = {
        "module": layer.module,
        "index": event.layers_done,
        "total": event.layers_total,
        "error_quant": layer.error_quant,
        "error": layer.error,
        "seconds": layer.seconds,
    }
    if layer.block is not None:
        data["block"] = layer.block
    if layer.objective != "weight":
        data["objective"] = layer.objective
        data["objective_error_quant"] = _finite(layer.objective_error_quant)
        data["objective_error"] = _finite(layer.objective_error)
    return data


def refinement_summary(refinement) -> RefinementSummary:  # refinement: loftq.report.Refinement
    """The counts and means of a refinement; the per-block figures stay in the report artifact."""
    model = refinement.model
    return RefinementSummary(
        mode=refinement.mode,
        blocks_total=len(refinement.blocks),
        blocks_accepted=refinement.blocks_accepted,
        blocks_rejected=len(refinement.blocks) - refinement.blocks_accepted,
        mean_block_gain=_finite(refinement.mean_block_gain),
        heldout_sequences=refinement.heldout_sequences,
        seconds=_finite(refinement.seconds),
        model=None
        if model is None
        else ModelRefinementSummary(
            loss=model.loss,
            heldout_before=_finite(model.heldout_before),
            heldout_after=_finite(model.heldout_after),
            accepted=model.accepted,
            steps=model.steps,
            seconds=_finite(model.seconds),
        ),
    )


def job_summary(report) -> JobSummary:  # report: loftq.report.Report
    """What the job record keeps of the report: the error means, and for calibrated runs the
    held-out evaluation, what the calibration read and what refinement did (the full report is
    an artifact)."""
    summary = report.summary
    evaluation = summary.evaluation
    calibration = report.calibration
    return JobSummary(
        layers=summary.layers,
        mean_error_quant=summary.mean_error_quant,
        mean_error=summary.mean_error,
        seconds=summary.seconds,
        objective=summary.objective,
        mean_objective_error_quant=_finite(summary.mean_objective_error_quant),
        mean_objective_error=_finite(summary.mean_objective_error),
        mean_output_error_quant=_finite(summary.mean_output_error_quant),
        mean_output_error=_finite(summary.mean_output_error),
        evaluation=None
        if evaluation is None
        else EvaluationSummary(
            **{k: _finite(v) if isinstance(v, float) else v for k, v in dataclasses.asdict(evaluation).items()}
        ),
        calibration=None if calibration is None else CalibrationSummary(**dataclasses.asdict(calibration)),
        refinement=None if report.refinement is None else refinement_summary(report.refinement),
    )
