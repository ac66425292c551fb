"""What bench/load.py and bench/sse_load.py share: the stack they start on loopback, the
minimal HTTP/1.1 client they measure with, the latency figures and the run around a bench.

Imported as ``common`` by the scripts (python puts bench/ first on sys.path); importing it
puts the repository on sys.path too, for ``api``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.tenants import hash_key, new_key  # noqa: E402
from service.redis_server import free_port, start_redis_server  # noqa: E402

NO_ANSWER = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError)
"""What ``Connection.get`` under ``asyncio.wait_for`` raises when a request got no usable answer."""


class ServiceStack:
    """valkey, what a subclass starts in ``_start_all`` and the API, on loopback, each in its own
    process group, all stopped by ``stop`` (also when one of them does not come up)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[subprocess.Popen] = []
        try:
            self._start_all()
        except BaseException:  # a process that did not come up, or Ctrl-C: stop what did
            self.stop()
            raise

    def _start_all(self) -> None:
        raise NotImplementedError

    def _start_redis(self, tenant: str, queue: str, sources: list[str], **settings: str) -> None:
        """valkey, an API key for ``tenant`` and ``self.env``: local storage, the submission
        limits raised so that every job is admitted, and ``settings``."""
        self.key = new_key()
        redis_process, self.redis_url = start_redis_server(self.workdir / "redis", appendonly=False)
        self.processes.append(redis_process)
        self.env = {
            **os.environ,
            "LOFTQ_REDIS_URL": self.redis_url,
            "LOFTQ_QUEUE": f"{queue}-{uuid.uuid4().hex[:8]}",
            "LOFTQ_STORAGE": "local",
            "LOFTQ_LOCAL_STORAGE_ROOT": str(self.workdir / "artifacts"),
            "LOFTQ_API_KEYS": f"{tenant}:{hash_key(self.key)}",
            "LOFTQ_TENANT_SOURCES": json.dumps({tenant: sources}),
            "LOFTQ_SUBMISSIONS_PER_MINUTE": "1000000",
            "LOFTQ_MAX_QUEUED_JOBS_PER_TENANT": "1000000",
            **settings,
        }

    def _start_api(self) -> None:
        """The API the way production runs it (``python -m api.server``), without access log."""
        self.host, self.port = "127.0.0.1", free_port()
        self.base = f"http://{self.host}:{self.port}"
        self.api_log = self.workdir / "api.log"
        self.api = self._start(
            [sys.executable, "-m", "api.server", "--host", self.host, "--port", str(self.port),
             "--no-access-log", "--log-level", "warning"],
            self.api_log,
        )

    def _start(self, command: list[str], log: Path, **env: str) -> subprocess.Popen:
        process = subprocess.Popen(
            command, env={**self.env, **env}, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
            start_new_session=True,  # stopped by us, in order, not by the terminal's Ctrl-C
        )
        self.processes.append(process)
        return process

    def _wait_ready(self, timeout: float, others_ready: Callable[[], bool] = lambda: True) -> None:
        """Until /readyz answers 200 and ``others_ready()``; SystemExit if a process exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.processes):
                raise SystemExit(f"a process of the stack exited; its log is in {self.workdir} (kept with --workdir)")
            try:
                api_ready = httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                api_ready = False
            if api_ready and others_ready():
                return
            time.sleep(0.2)
        raise SystemExit(f"the stack did not start in {timeout:.0f} s; the logs are in {self.workdir} (kept with --workdir)")

    def stop(self) -> None:
        for process in reversed(self.processes):  # the API and workers first, the job store last
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


class Connection:
    """One keep-alive HTTP/1.1 connection that sends GETs: the pollers' client. httpx spends
    about 3 ms of CPU per request, more than the API does to answer it, so on a 2-core box
    an httpx poller measures itself; this one parses only the status line, Content-Length
    (or chunks) and the body. uvicorn answers every route polled here with a JSON body."""

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.host, self.port = host, port
        self.head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{host}:{port}", **headers}.items()).encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            self.writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\n" + self.head + b"\r\n")
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            fields = dict(line.split(b":", 1) for line in head[:-4].split(b"\r\n")[1:])
            fields = {k.strip().lower(): v.strip().lower() for k, v in fields.items()}
            if b"chunked" in fields.get(b"transfer-encoding", b""):
                body = b""
                while size := int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16):
                    body += (await self.reader.readexactly(size + 2))[:-2]
                await self.reader.readuntil(b"\r\n")
            else:
                body = await self.reader.readexactly(int(fields.get(b"content-length", b"0")))
            if fields.get(b"connection") == b"close":
                self.close()
            return status, body
        except BaseException:
            self.close()  # a half-read answer leaves the connection unusable
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latency_ms(seconds: list[float]) -> dict[str, float]:
    """n, p50, p99 and max in milliseconds: one row of a report's latency table."""
    return {"n": len(seconds), "p50": percentile(seconds, 0.5) * 1e3, "p99": percentile(seconds, 0.99) * 1e3,
            "max": max(seconds, default=float("nan")) * 1e3}


def run_bench(
    args: argparse.Namespace, temp_prefix: str, starting: str, make_stack: Callable[[Path], ServiceStack],
    run: Callable[[argparse.Namespace, ServiceStack], Awaitable[dict]], report: Callable[[dict], None],
) -> int:
    """Start the stack in ``args.workdir`` (or a temp dir, removed), ``run`` against it, stop it
    whatever happens (Ctrl-C, SIGTERM), then ``report`` and write ``args.json``. The exit
    code: 0 when every one of the result's targets passed, 1 otherwise, 130 on Ctrl-C."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally below stops the stack
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=temp_prefix))
    workdir.mkdir(parents=True, exist_ok=True)
    stack = None
    try:
        print(f"starting {starting} in {workdir} ...", file=sys.stderr, flush=True)
        stack = make_stack(workdir)
        result = asyncio.run(run(args, stack))
    except KeyboardInterrupt:
        print("interrupted; the stack is stopped", file=sys.stderr)
        return 130
    finally:
        if stack is not None:
            stack.stop()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(result["targets"].values()) else 1
