"""The job runner's lease keeper against a real Redis-compatible server; the job summary it keeps of a report."""

from __future__ import annotations

import json
import math
import time
import uuid

import pytest

from loftq.report import BlockRefinement, LayerReport, ModelRefinement, Refinement, Report, summarize
from service.models import JobCreate
from service.store import JobStore
from worker.runner import LeaseKeeper, job_summary


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore.from_url(redis_url, prefix=f"runner-{uuid.uuid4().hex[:8]}:")


def test_keeper_renews_the_lease_beyond_its_ttl(store: JobStore) -> None:
    job = store.create(JobCreate(source="s3://bucket/model/"))
    assert store.acquire_lease(job.id, "me", 1)
    keeper = LeaseKeeper(store, job.id, "me", 1)
    keeper.start()
    try:
        time.sleep(2.5)  # more than twice the TTL: only renewals keep it
        assert not store.acquire_lease(job.id, "someone-else", 1)
        assert not keeper.lost.is_set()
    finally:
        keeper.stopped.set()
        keeper.join(5)


def test_keeper_reports_a_lease_taken_by_another_worker(store: JobStore) -> None:
    job = store.create(JobCreate(source="s3://bucket/model/"))
    assert store.acquire_lease(job.id, "me", 1)
    keeper = LeaseKeeper(store, job.id, "me", 1)
    store.release_lease(job.id, "me")
    assert store.acquire_lease(job.id, "other", 30)
    keeper.start()
    assert keeper.lost.wait(5)
    keeper.join(5)
    assert not keeper.is_alive()


def test_scratch_without_a_held_lease_is_removed_by_any_later_task(store: JobStore, tmp_path) -> None:
    from service.settings import Settings
    from worker.runner import JobRunner

    runner = JobRunner(store, Settings(redis_url="redis://unused", work_dir=tmp_path))
    ids = [store.create(JobCreate(source="s3://bucket/model/")).id for _ in range(3)]
    mine, alive, dead = ids
    scratch = {
        "mine, an earlier attempt": tmp_path / f"{mine}-a1",
        "alive": tmp_path / f"{alive}-b2",
        "alive part": tmp_path / f"{alive}.part3-c3",
        "dead": tmp_path / f"{dead}-d4",
        "dead part": tmp_path / f"{alive}.part1-e5",
        "not scratch": tmp_path / "notes",
    }
    for path in scratch.values():
        (path / "output").mkdir(parents=True)
    assert store.acquire_lease(mine, "me", 30)
    assert store.acquire_lease(alive, "other", 30)
    assert store.acquire_lease(JobStore.part_lease_id(alive, 3), "other", 30)
    runner.remove_abandoned_scratch(mine)
    assert {name for name, path in scratch.items() if path.exists()} == {"alive", "alive part", "not scratch"}


@pytest.mark.parametrize("lease_lost", [False, True])
def test_a_failure_after_the_lease_was_lost_records_no_end(store: JobStore, tmp_path, lease_lost: bool) -> None:
    """The worker that owns the job now records its end; a failure of the one that lost it
    (its scratch removed underneath it, say) must not end the job as failed."""
    from service.models import JobState
    from service.settings import Settings
    from worker.runner import JobRunner

    settings = Settings(redis_url="redis://unused", work_dir=tmp_path / "work", allowed_file_roots=[tmp_path])
    runner = JobRunner(store, settings)
    job = store.create(JobCreate(source=f"file://{tmp_path}/missing"))
    runner.keeper = LeaseKeeper(store, job.id, runner.owner, 30)
    if lease_lost:
        runner.keeper.lost.set()
    runner._run_leased(store.get(job.id))
    job = store.get(job.id)
    if lease_lost:
        assert job.state is JobState.running and job.error is None
    else:
        assert job.state is JobState.failed and job.error.code == "source_not_found"


def _report(refinement: Refinement | None) -> Report:
    layers = [LayerReport(module="model.layers.0.mlp.up_proj", key="model.layers.0.mlp.up_proj.weight", shard="model.safetensors",
                          shape=(8, 8), fan_in_fan_out=False, error_quant=0.2, error=0.1, iter_errors=[0.1], best_iter=1, seconds=0.1)]
    summary = summarize(layers, seconds=1.0, peak_rss_mb=1.0, peak_device_mb=None, shards=1, shards_resumed=0)
    return Report(format_version=2, source="s", architecture="LlamaForCausalLM", options={}, scaling=1.0, device="cpu",
                  versions={}, summary=summary, layers=layers, refinement=refinement)


def test_job_summary_keeps_the_refinement_counts_with_non_finite_numbers_as_null() -> None:
    blocks = [
        BlockRefinement(block=0, accepted=True, heldout_closed_form=0.2, heldout_refined=0.1, train_first=0.3, train_last=0.1, steps=10, seconds=1.0),
        BlockRefinement(block=1, accepted=False, heldout_closed_form=0.2, heldout_refined=0.3, train_first=0.3, train_last=0.2, steps=10, seconds=1.0),
        BlockRefinement(block=2, accepted=True, heldout_closed_form=0.2, heldout_refined=0.15, train_first=0.3, train_last=0.1, steps=10, seconds=1.0),
    ]
    model = ModelRefinement(loss="kl", heldout_before=0.05, heldout_after=math.nan, accepted=False, steps=5, seconds=2.0, peak_memory_mb=10.0)
    summary = job_summary(_report(Refinement(mode="block+model", blocks=blocks, model=model, heldout_sequences=3, seconds=5.5)))
    refinement = summary.refinement
    assert (refinement.mode, refinement.blocks_total, refinement.blocks_accepted, refinement.blocks_rejected) == ("block+model", 3, 2, 1)
    assert refinement.mean_block_gain == pytest.approx((0.5 + 0 + 0.25) / 3) and refinement.seconds == 5.5
    assert refinement.heldout_sequences == 3
    assert refinement.model.model_dump() == {"loss": "kl", "heldout_before": 0.05, "heldout_after": None, "accepted": False, "steps": 5, "seconds": 2.0}
    assert json.loads(summary.model_dump_json())["refinement"]["model"]["heldout_after"] is None  # NaN does not survive JSON
    model_only = job_summary(_report(Refinement(mode="model", model=model, seconds=2.0))).refinement
    assert model_only.blocks_total == 0 and model_only.mean_block_gain is None
    assert job_summary(_report(None)).refinement is None
