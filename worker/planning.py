"""Splitting a distributed job into parts: the job's own RUN_JOB delivery, under the job's
lease, plans the parts and sends one RUN_PART message per part (worker/distributed.py runs
them; docs/adr/0005-scale-out.md has the why)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from service.models import Job
from service.queue import MERGE_JOB, RUN_PART

if TYPE_CHECKING:
    from worker.runner import JobRunner

log = logging.getLogger(__name__)


def plan_parts(shards: list[str], shards_per_part: int) -> list[list[str]]:
    """Consecutive shards, ``shards_per_part`` to a part (the last one may hold fewer)."""
    return [shards[i : i + shards_per_part] for i in range(0, len(shards), shards_per_part)]


def send_parts(runner: JobRunner, job: Job, scratch: Path) -> None:
    """Plan the job's parts, record them and send a RUN_PART message for each part not done.

    Planning reads the source's index and config only, and fails the job on the spot for the
    same reasons a normal job would fail before converting (no such source, rank too large).
    A redelivery keeps the recorded plan and re-sends what is not finished; a duplicate part
    message is harmless (part lease, journal), and when every part is done already, the merge
    is sent again (the worker that finished the last one may have died before sending it)."""
    from loftq.converter import plan
    from worker.sources import open_source

    store, enqueue = runner.store, enqueuer(runner)
    source = open_source(
        job.request.source, runner.settings, scratch / "source", tenant=job.tenant, location=job.inputs and job.inputs.source
    )
    checkpoint, _, layout = plan(source, runner.options(job))
    parts = store.init_parts(job.id, plan_parts(list(checkpoint.shards), job.request.shards_per_part))
    progress = store.get(job.id).progress
    if progress.layers_total == 0:  # not on a redelivery: the parts may have counted already
        totals = {"stage": "converting", "layers_total": len(layout.targets), "shards_total": len(checkpoint.shards)}
        runner.lifecycle.progress(job, progress.model_copy(update=totals))
    done = store.parts_done(job.id)
    if len(done) == len(parts):
        enqueue(MERGE_JOB, job.id)
        return
    for number in parts:
        if number not in done:
            enqueue(RUN_PART, job.id, number)
    log.info("job %s: sent %d of %d parts", job.id, len(parts) - len(done), len(parts))


def enqueuer(runner: JobRunner):
    """How ``runner`` sends part and merge messages (a distributed job cannot run without one)."""
    if runner.enqueue is None:
        raise RuntimeError("a distributed job needs a runner that can send tasks")
    return runner.enqueue
