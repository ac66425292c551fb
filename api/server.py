"""The API's HTTP server: uvicorn, with bounds on how slowly a client may send a request.

Every way the API starts goes through ``run``: ``python -m api.server`` (the container image,
Compose, Kubernetes, the tests, the benchmarks) and ``loftq-service serve``. uvicorn's h11
server times a connection only between a finished response and the first byte of the next
request, so a client that sends half a request line, or half its headers, holds its socket for
ever; ``GuardedH11Protocol`` adds that deadline. The body has its own (``api.main.BodyLimit``),
and nothing times a response: an event stream or a download takes as long as it needs.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import sys
from typing import Any

import h11
import uvicorn
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from api.errors import Overloaded, RequestTimeout
from api.main import create_app, error_response
from service.settings import Settings
from service.text import escape_unsafe

log = logging.getLogger(__name__)


def _raw_408(message: str) -> bytes:
    """A whole 408 in the API's error body, written by hand: h11 has no request to answer yet."""
    body = json.dumps({"error": {"code": RequestTimeout.code, "message": message}}).encode()
    head = f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on reading each request line and its headers.

    The deadline runs from the connection, or from the end of the previous response on it,
    until the next request's headers are in; it is not moved by bytes that trickle in. It also
    runs while a response is finished but the client still sends (or does not send) a body
    nobody reads. While the app handles a request nothing here times it. Past the deadline the
    connection is closed, after a 408 if the client had sent part of a request.

    ``limit_concurrency`` is checked here instead of by uvicorn so that the 503 has the API's
    error body and a Retry-After header.
    """

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.read_deadline: asyncio.TimerHandle | None = None
        self.connection_limit, self.limit_concurrency = self.limit_concurrency, None
        self.routes: ASGIApp = self.app
        self.app = self._app_unless_overloaded

    async def _app_unless_overloaded(self, scope: Scope, receive: Receive, send: Send) -> None:
        """uvicorn's test, made while this request's task is already counted (hence ``>``)."""
        limit = self.connection_limit
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) > limit):
            log.warning("refused a request: %d connections, %d requests in progress (LOFTQ_MAX_CONNECTIONS=%d)",
                        len(self.connections), len(self.tasks), limit)
            error = Overloaded(f"the server is at its limit of {limit} connections (LOFTQ_MAX_CONNECTIONS); retry")
            await error_response(error)(scope, receive, send)
            return
        await self.routes(scope, receive, send)

    def _watch(self) -> None:
        """Start the deadline when the server waits for a request, stop it once one is handled."""
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and self.read_deadline is None and not self.transport.is_closing():
            self.read_deadline = self.loop.call_later(self.header_timeout, self._too_slow)
        elif not waiting and self.read_deadline is not None:
            self.read_deadline.cancel()
            self.read_deadline = None

    def _too_slow(self) -> None:
        self.read_deadline = None
        if self.transport.is_closing():
            return
        partial = self.conn.our_state is h11.IDLE and bool(self.conn.trailing_data[0])
        if partial:
            self.transport.write(_raw_408(
                f"the request line and headers did not arrive within {self.header_timeout:g} s "
                "(LOFTQ_REQUEST_HEADER_TIMEOUT_SECONDS)"
            ))
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.read_deadline is not None:
            self.read_deadline.cancel()
            self.read_deadline = None
        super().connection_lost(exc)


class EscapeUnsafe(logging.Filter):
    """Writes format and control characters of a log record's arguments as ``\\uXXXX``: the
    access log's client address comes from X-Forwarded-For when a trusted proxy (loopback by
    default) sends it, and a header may carry any Latin-1 character, NEL (U+0085) included."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(escape_unsafe(arg) if isinstance(arg, str) else arg for arg in record.args)
        return True


def server_config(app: ASGIApp, settings: Settings, *, host: str, port: int, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration with the settings' limits; ``options`` are more uvicorn options."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=functools.partial(GuardedH11Protocol, header_timeout=settings.request_header_timeout_seconds),
        ws="none",  # no WebSocket routes: an upgrade request is served as plain HTTP
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_timeout_seconds,  # type: ignore[arg-type]  # a float works
        h11_max_incomplete_event_size=settings.max_header_bytes,
        # On SIGTERM uvicorn waits for open connections; event streams never close by themselves,
        # so after this long they are cut (clients resume with ``after``) and the process exits.
        timeout_graceful_shutdown=10,
        **options,
    )
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, EscapeUnsafe) for f in access.filters):
        access.addFilter(EscapeUnsafe())
    return config


def run(app: ASGIApp, settings: Settings, *, host: str, port: int, **options: Any) -> None:
    """Serve ``app`` until SIGINT or SIGTERM (uvicorn's handling); exit 3 if it could not start."""
    server = uvicorn.Server(server_config(app, settings, host=host, port=port, **options))
    server.run()
    if not server.started:
        sys.exit(3)


def main(argv: list[str] | None = None) -> None:
    """Serve the loftq-service API with the LOFTQ_* settings of the environment."""
    parser = argparse.ArgumentParser(prog="python -m api.server", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--no-access-log", action="store_true", help="do not log each request")
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"invalid settings: {exc}", file=sys.stderr)
        sys.exit(2)
    run(create_app(settings), settings, host=args.host, port=args.port, log_level=args.log_level,
        access_log=not args.no_access_log)


if __name__ == "__main__":
    main()
