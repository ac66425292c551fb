"""``loftq-service serve``: the whole service on one machine with nothing else installed.

It starts a Redis-compatible server from a pip package, one Celery worker process and the
API, with artifacts on local disk: the same code path as production, just smaller.
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


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)  # stopping when asked is a clean exit; the finally block below still runs


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind; loopback only unless you put auth in front.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port of the API.")] = 8000,
    data_dir: Annotated[Path, typer.Option(help="Job store, artifacts and scratch space.")] = Path("loftq-data"),
    allow_files: Annotated[
        Optional[list[Path]], typer.Option(help="Directory file:// sources may read (repeatable; default: the current directory).")
    ] = None,
    device: Annotated[str, typer.Option(help="Worker device: auto, cpu, cuda, cuda:N.")] = "auto",
) -> None:
    """Start the embedded Redis-compatible server, one worker and the API; Ctrl-C stops all three."""
    import uvicorn

    from api.main import create_app
    from api.redis_server import start_redis_server
    from api.settings import Settings

    if not _is_loopback(host):
        typer.echo(f"refusing to bind {host}: the embedded service has no authentication, so it serves loopback only (127.0.0.1)", err=True)
        raise typer.Exit(2)
    data_dir = data_dir.resolve()
    roots = [p.resolve() for p in (allow_files or [Path.cwd()])]
    redis_process, redis_url = start_redis_server(data_dir / "redis")
    env = {
        "LOFTQ_REDIS_URL": redis_url,
        "LOFTQ_STORAGE": "local",
        "LOFTQ_LOCAL_STORAGE_ROOT": str(data_dir / "artifacts"),
        "LOFTQ_WORK_DIR": str(data_dir / "work"),
        "LOFTQ_ALLOWED_FILE_ROOTS": json.dumps([str(r) for r in roots]),
        "LOFTQ_DEVICE": device,
        "LOFTQ_PUBLIC_URL": f"http://{host}:{port}",
    }
    os.environ.update(env)
    settings = Settings()
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker",
         "--concurrency", "1", "--loglevel", "INFO", "-Q", settings.queue, "--hostname", "embedded@%h"],
        env={**os.environ, **env},
        start_new_session=True,  # Ctrl-C reaches the API only; the worker is stopped in order below
    )
    typer.echo(f"loftq-service on http://{host}:{port} (no authentication: loopback only); data in {data_dir}", err=True)
    typer.echo(f"file:// sources allowed under: {', '.join(map(str, roots))}", err=True)
    # uvicorn shuts down on SIGTERM and then raises it again with the handler it found; the default
    # one would end this process on the spot and leave the worker and the job store running.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
    finally:
        # The worker first (its running job records how it ended), the job store last.
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        redis_process.terminate()
        redis_process.wait(10)


@app.callback()
def _main() -> None:
    """loftq-service: LoftQ conversions as jobs."""
