"""``loftq-service serve``: the whole service on one machine with nothing else installed.

It starts a Redis-compatible server from a pip package, one Celery worker process, the webhook
worker and the API, with artifacts on local disk: the same code path as production, just
smaller. Webhooks may reach loopback here (a receiver on this machine), nothing private.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Run the loftq job service.")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_refusal(host: str, auth: bool) -> str | None:
    """Why ``serve`` must not bind ``host`` (None: it may). Without API keys the service is open,
    so it serves loopback only; with keys any interface is allowed."""
    if auth or _is_loopback(host):
        return None
    return (
        f"refusing to bind {host}: no API keys are configured (LOFTQ_API_KEYS), so the service is open and "
        "serves loopback only (127.0.0.1); make keys with `loftq-service hash-key TENANT`"
    )


def auth_line(api_keys: dict[str, str]) -> str:
    """The line ``serve`` prints at start saying whether callers need a key."""
    if not api_keys:
        return "authentication: off (no LOFTQ_API_KEYS): open to whoever reaches it, loopback only, one tenant 'default'"
    tenants = sorted(set(api_keys.values()))
    return f"authentication: on ({len(api_keys)} API keys, tenants: {', '.join(tenants)}); send Authorization: Bearer <key>"


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)  # stopping when asked is a clean exit; the finally block below still runs


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind; loopback only unless LOFTQ_API_KEYS is set.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port of the API.")] = 8000,
    data_dir: Annotated[Path, typer.Option(help="Job store, artifacts and scratch space.")] = Path("loftq-data"),
    allow_files: Annotated[
        Optional[list[Path]], typer.Option(help="Directory file:// sources may read (repeatable; default: the current directory).")
    ] = None,
    device: Annotated[str, typer.Option(help="Worker device: auto, cpu, cuda, cuda:N.")] = "auto",
) -> None:
    """Start the embedded Redis-compatible server, one worker, the webhook worker and the API; Ctrl-C stops them all."""
    from pydantic import ValidationError

    from api.main import create_app
    from api.server import run as run_api
    from service.redis_server import start_redis_server
    from service.settings import Settings

    try:
        api_keys = Settings().api_keys
    except ValidationError as exc:
        typer.echo(f"invalid settings: {exc}", err=True)
        raise typer.Exit(2) from None
    refusal = bind_refusal(host, auth=bool(api_keys))
    if refusal:
        typer.echo(refusal, err=True)
        raise typer.Exit(2)
    data_dir = data_dir.resolve()
    roots = [p.resolve() for p in (allow_files or [Path.cwd()])]
    redis_process, redis_url = start_redis_server(data_dir / "redis")
    env = {
        "LOFTQ_REDIS_URL": redis_url,
        "LOFTQ_STORAGE": "local",
        "LOFTQ_LOCAL_STORAGE_ROOT": str(data_dir / "artifacts"),
        "LOFTQ_WORK_DIR": str(data_dir / "work"),
        "LOFTQ_DATA_DIR": str(data_dir),  # never a file:// source, though it lies under the default root
        "LOFTQ_ALLOWED_FILE_ROOTS": json.dumps([str(r) for r in roots]),
        "LOFTQ_DEVICE": device,
        # Bound beyond loopback (keys configured), the address clients use may differ from --host.
        "LOFTQ_PUBLIC_URL": os.environ.get("LOFTQ_PUBLIC_URL") or f"http://{host}:{port}",
        "LOFTQ_WEBHOOK_ALLOWED_NETWORKS": os.environ.get("LOFTQ_WEBHOOK_ALLOWED_NETWORKS") or "127.0.0.0/8,::1/128",
    }
    os.environ.update(env)
    settings = Settings()
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker",
         "--concurrency", "1", "--loglevel", "INFO", "-Q", settings.queue, "--hostname", "embedded@%h"],
        # Two malloc arenas: the per-job memory limit counts address space, and glibc reserves
        # 64 MiB per arena, up to 8 per core (worker/limits.py).
        env={**os.environ, **env, "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")},
        start_new_session=True,  # Ctrl-C reaches the API only; the worker is stopped in order below
    )
    webhooks = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.webhook_app:celery_app", "worker", "--pool", "threads",
         "--concurrency", "4", "--loglevel", "WARNING", "-Q", settings.webhook_queue, "--hostname", "webhooks@%h"],
        env={**os.environ, **env},
        start_new_session=True,
    )
    typer.echo(f"loftq-service on http://{host}:{port}; data in {data_dir}", err=True)
    typer.echo(auth_line(settings.api_keys), err=True)
    typer.echo(f"file:// sources allowed under: {', '.join(map(str, roots))}", err=True)
    # uvicorn shuts down on SIGTERM and then raises it again with the handler it found; the default
    # one would end this process on the spot and leave the worker and the job store running.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        run_api(create_app(settings), settings, host=host, port=port, log_level="info")
    finally:
        # The workers first (a running job records how it ended), the job store last.
        for process in (worker, webhooks):
            os.killpg(process.pid, signal.SIGTERM)
        for process in (worker, webhooks):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        redis_process.terminate()
        redis_process.wait(10)


@app.command("hash-key")
def hash_key_command(
    tenant: Annotated[str, typer.Argument(help="Tenant the key belongs to (lower-case letters, digits, - and _).")],
    stdin: Annotated[bool, typer.Option("--stdin", help="Hash a key read from standard input instead of making one.")] = False,
) -> None:
    """Make an API key for TENANT: prints the key (give it to the tenant; it is not stored) and the
    tenant:sha256 entry for LOFTQ_API_KEYS (comma-separate several)."""
    from service.tenants import TENANT_PATTERN, hash_key, new_key

    if not TENANT_PATTERN.match(tenant):
        typer.echo(f"invalid tenant {tenant!r}: lower-case letters, digits, - and _, at most 63", err=True)
        raise typer.Exit(2)
    if stdin:
        key = sys.stdin.readline().strip()
        if not key:
            typer.echo("no key on standard input", err=True)
            raise typer.Exit(2)
    else:
        key = new_key()
        typer.echo(f"key: {key}")
    typer.echo(f"LOFTQ_API_KEYS entry: {tenant}:{hash_key(key)}")


@app.callback()
def _main() -> None:
    """loftq-service: LoftQ conversions as jobs."""
