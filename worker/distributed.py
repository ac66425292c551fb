"""A distributed job: its weight shards converted by part tasks on several workers, then merged.

Output shard i depends on input shard i alone (docs/adr/0005-scale-out.md), so one job's shards can run on
different workers: ``send_parts`` (worker/planning.py: the job's own RUN_JOB delivery, under
the job lease) plans the parts and sends one RUN_PART message per part; ``PartRunner`` converts one part
(``loftq.converter.convert_part``) under a lease of its own and records it finished; the
worker that finishes the last part (one atomic step in the job store decides which) merges
right there with ``JobRunner.run(job_id, merge=True)`` (a MERGE_JOB message when that cannot
take the job's lease, and on redeliveries): the shards are reused from the destination's
journal and the adapters, index, report and manifest written. No Celery chord:
the bookkeeping lives in the job store, so it survives redelivery and needs no result backend.
The decisions are in docs/adr/0005-scale-out.md.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from service.models import Job
from service.queue import MERGE_JOB
from service.storage import ObjectStore
from service.store import JobStore
from worker.planning import enqueuer
from worker.runner import JobRunner, LeaseKeeper, apply_torch_threads, layer_event, store_outage_tolerated

log = logging.getLogger(__name__)


class PartRunner:
    """Runs one part of a distributed job; the job's start, failure and cancellation are
    handled by the same ``JobRunner`` methods as a normal job's."""

    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner
        self.store: JobStore = runner.store
        self.settings = runner.settings

    def run(self, job_id: str, part: int) -> bool:
        """False: another worker holds this part's lease (like ``JobRunner.run``)."""
        if self.store.get(job_id).state.finished:
            return True
        # The part's own lease, kept and enforced like a job's (JobRunner.lease, worker/watchdog.py).
        with self.runner.lease(JobStore.part_lease_id(job_id, part), job_id) as held:
            if not held:
                log.info("part %d of job %s is leased by another worker; this delivery is dropped", part, job_id)
                return False
            self._run_leased(self.store.get(job_id), part, self.runner.keeper)
        return True

    def _run_leased(self, job: Job, part: int, keeper: LeaseKeeper) -> None:
        def work() -> None:
            parts, done = self.store.parts(job.id), self.store.parts_done(job.id)
            if part in done:  # a redelivery: its worker died after finishing, maybe before sending the merge
                if len(done) == len(parts):
                    enqueuer(self.runner)(MERGE_JOB, job.id)
                return
            started = time.monotonic()
            scratch = Path(tempfile.mkdtemp(prefix=f"{job.id}.part{part}-", dir=self.runner._work_dir()))
            try:
                self._convert(job, parts[part], scratch, self.runner.artifacts, keeper)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            if self.store.cancel_requested(job.id):  # asked while the last shard was published
                self.runner.cancel(job, self.runner.artifacts)
                return
            record = {"worker": self.runner.worker, "owner": self.runner.owner, "shards": len(parts[part]),
                      "seconds": round(time.monotonic() - started, 3)}
            if self.store.finish_part(job.id, part, record):
                self._merge(job.id)

        def ended_elsewhere(exc: Exception) -> bool:  # e.g. another part failed the job
            if not self.store.get(job.id).state.finished:
                return False
            log.info("part %d of job %s stopped: the job has ended (%s)", part, job.id, type(exc).__name__)
            return True

        self.runner.attempt(
            job,
            JobStore.part_lease_id(job.id, part),
            count=lambda: self.store.increment_part_attempts(job.id, part),
            work=work,
            ended_elsewhere=ended_elsewhere,
        )

    def _merge(self, job_id: str) -> None:
        """The last part merges in its own process, where the engine is imported already
        (a MERGE_JOB message would start another child and import it again: seconds per job).
        When the job's lease is held elsewhere (a redelivered merge), the message is sent; if
        that holder dies instead of merging, the API's sweeper sends it again (service/sweeper.py)."""
        if not self.runner.run(job_id, merge=True):
            enqueuer(self.runner)(MERGE_JOB, job_id)

    def _convert(self, job: Job, shards: list[str], scratch: Path, artifacts: ObjectStore, keeper: LeaseKeeper) -> None:
        from loftq.converter import convert_part
        from worker.sources import ObjectStoreDestination, open_source

        apply_torch_threads(self.settings)
        source = open_source(
            job.request.source, self.settings, scratch / "source", tenant=job.tenant, location=job.inputs and job.inputs.source
        )
        destination = ObjectStoreDestination(artifacts, job.output, scratch / "output")
        started_at = job.started_at or job.created_at

        def on_progress(event) -> None:  # loftq.report.ProgressEvent
            with store_outage_tolerated(f"progress of job {job.id}"):
                record(event)

        def record(event) -> None:  # loftq.report.ProgressEvent
            elapsed = (datetime.now(timezone.utc) - started_at).total_seconds()
            if event.stage == "layer" and event.layer is not None:
                self.store.observe_duration("layer", event.layer.seconds)
                progress = self.runner.lifecycle.add_progress(job, elapsed=elapsed, layers_done=1)
                data = layer_event(event) | {"index": progress.layers_done, "total": progress.layers_total}
                self.store.add_event(job.id, "layer", data)
            elif event.stage == "shard":
                self.runner.lifecycle.add_progress(
                    job, elapsed=elapsed, shards_done=1, bytes_read=event.bytes_read, bytes_written=event.bytes_written
                )

        convert_part(
            source,
            destination,
            self.runner.options(job),
            shards,
            on_progress=on_progress,
            should_stop=self.runner.should_stop(job.id, keeper, job_ended=True),
        )
