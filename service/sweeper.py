"""Hands out again the work of workers that died, or fails it with ``worker_lost``.

A worker holds a lease on the job (or part) it runs, renewed from the job's process and from
a watchdog process beside it (worker/watchdog.py) for as long as the job's process lives, even
stuck: a lease that has expired means no process works on the job any more. A worker killed
outright (SIGKILL, the OOM killer, a lost node) stops renewing, and once the lease expires its
job is ``running`` with nobody working on it. The
broker would redeliver the unacknowledged message only after its visibility timeout, which
must stay above the longest job (hours), so the API sweeps instead, every
``sweep_interval_seconds``: work with an attempt recorded and no lease is sent to the queue
once more (once per attempt, however many replicas sweep), until ``max_attempts`` deliveries
have died; then the job fails with ``worker_lost``. The redelivered job resumes from the
output shards its earlier attempts finished (the engine's journal). A job being cancelled
whose worker died is finished here: its partial artifacts are removed and it ends cancelled.

Each sweep also removes the artifacts of finished jobs whose retention ran out (their records
expire in Redis; LOFTQ_JOB_RETENTION_SECONDS), and sends again webhook deliveries that are late
(their message was lost), through the lifecycle's one writer of end states
(service/lifecycle.py) for every end it records.

Duplicates are harmless by construction: a delivery that finds the lease held, or the job
ended, does nothing (worker/tasks.py).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import redis

from service.deletion import remove_artifacts
from service.lifecycle import service_lifecycle
from service.models import ErrorInfo, Job, JobState
from service.queue import MERGE_JOB, RUN_JOB, RUN_PART, JobQueue
from service.settings import Settings
from service.storage import ObjectStore
from service.store import MERGE, JobStore

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    redelivered: list[str] = field(default_factory=list)  # "job_x", "job_x part 2", "job_x merge"
    failed: list[str] = field(default_factory=list)  # job ids ended worker_lost
    cancelled: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)  # job ids whose artifacts went with their records


class Sweeper:
    def __init__(self, store: JobStore, queue: JobQueue, artifacts: ObjectStore, settings: Settings) -> None:
        self.store, self.queue, self.artifacts, self.settings = store, queue, artifacts, settings
        self.lifecycle = service_lifecycle(store, settings, queue=queue, artifacts=artifacts)

    def sweep(self) -> SweepResult:
        result = SweepResult()
        self._remove_expired(result)
        self._resend_late_deliveries(result)
        for state in (JobState.running, JobState.cancelling):
            for job_id in self.store.ids_in_state(state):
                try:
                    self._sweep_job(self.store.get(job_id), result)
                except Exception:  # one odd record must not stop the others from being swept
                    log.exception("could not sweep job %s", job_id)
        return result

    def _sweep_job(self, job: Job, result: SweepResult) -> None:
        store = self.store
        if job.state not in (JobState.running, JobState.cancelling) or store.leased(job.id):
            return
        parts = store.parts(job.id) if job.request.distributed else {}
        if any(store.leased(JobStore.part_lease_id(job.id, number)) for number in parts):
            return
        if job.state is JobState.cancelling:
            self._finish_cancel(job, result)
            return
        if not parts:  # a plain job, or a distributed one whose worker died while planning
            self._redeliver(job, "job", job.attempts, (RUN_JOB, job.id), result)
            return
        attempts = store.part_attempts(job.id)
        done = store.parts_done(job.id)
        if len(done) == len(parts):
            self._redeliver(job, MERGE, attempts.get(MERGE, 0), (MERGE_JOB, job.id), result)
            return
        for number in parts:
            # A part never delivered yet is waiting in the queue: nothing was lost.
            if number not in done and attempts.get(str(number), 0) > 0:
                self._redeliver(job, f"part {number}", attempts[str(number)], (RUN_PART, job.id, number), result)

    def _redeliver(self, job: Job, what: str, attempts: int, message: tuple, result: SweepResult) -> None:
        if attempts >= self.settings.max_attempts:
            text = f"{what} was delivered {attempts} times and its worker died each time (LOFTQ_MAX_ATTEMPTS)"
            if self.lifecycle.finish(job.id, JobState.failed, error=ErrorInfo(code="worker_lost", message=text)) is None:
                return
            log.warning("job %s: %s; failed with worker_lost", job.id, text)
            result.failed.append(job.id)
            return
        # One redelivery per lost attempt: the next delivery raises the count, and a message
        # still waiting behind other jobs is not sent again on every sweep.
        if not self.store.claim_once(f"redeliver:{job.id}:{what}:{attempts}", self.settings.job_retention_seconds):
            return
        log.warning("job %s: the worker of %s (attempt %d) is gone; sending it again", job.id, what, attempts)
        self.store.add_event(job.id, "redelivered", {"work": what, "attempt": attempts})
        self.queue.send(*message)
        result.redelivered.append(job.id if what == "job" else f"{job.id} {what}")

    def _finish_cancel(self, job: Job, result: SweepResult) -> None:
        try:
            self.artifacts.delete_prefix(job.output)
        except Exception:
            log.exception("could not remove the partial artifacts of cancelled job %s", job.id)
            return  # the next sweep tries again; the job stays cancelling, not cancelled with leftovers
        if self.lifecycle.finish(job.id, JobState.cancelled) is None:
            return
        result.cancelled.append(job.id)

    def _resend_late_deliveries(self, result: SweepResult) -> None:
        """Webhook deliveries whose message never arrived are sent once more per attempt count
        (a duplicate is harmless: the delivery id is the receiver's idempotency key)."""
        for job_id, delivery_id, attempts in self.store.overdue_deliveries():
            if self.store.claim_once(f"webhook-resend:{delivery_id}:{attempts}", self.settings.job_retention_seconds):
                log.warning("webhook %s of job %s is late (attempts: %d); sending it again", delivery_id, job_id, attempts)
                self.queue.send_webhook(job_id, delivery_id)
                result.redelivered.append(f"{job_id} webhook {delivery_id}")

    def _remove_expired(self, result: SweepResult) -> None:
        """Artifacts of finished jobs whose retention ran out (their records are gone already)."""
        while expired := self.store.expired_outputs(limit=100):
            removed = []
            for job_id, tenant, output in expired:
                try:
                    if output is not None:
                        remove_artifacts(self.artifacts, tenant, output)
                except Exception:
                    log.exception("could not remove the artifacts of expired job %s", job_id)
                    continue  # kept in the index: the next sweep tries again
                removed.append(job_id)
            self.store.forget_outputs(removed)
            result.expired += removed
            if len(removed) < len(expired):
                return

    def run_forever(self, stopped: threading.Event) -> None:
        """Sweep every interval; one replica per period does it (a claim in the job store)."""
        interval = self.settings.sweep_interval_seconds
        while not stopped.wait(interval):
            try:
                period = int(self.store.client.time()[0] // interval)
                if self.store.claim_once(f"sweep:{period}", int(interval) + 1):
                    self.sweep()
            except redis.RedisError as exc:
                log.warning("sweep skipped, job store unreachable: %s", exc)
            except Exception:
                log.exception("sweep failed")
