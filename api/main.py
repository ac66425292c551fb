"""The FastAPI application: routers, one error shape, shared clients on ``app.state``."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import cache
from urllib.parse import unquote

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import RequestTimeout, http_headers, http_status
from api.event_stream import EventHub, StreamSlots, raise_open_file_limit
from api.routes import artifacts, health, jobs, uploads
from service.errors import (
    InvalidRequest,
    MalformedJson,
    RequestTooLarge,
    ServiceError,
    request_validation_error,
)
from service.policy import SourcePolicy
from service.queue import JobQueue
from service.settings import Settings, get_settings
from service.storage import store_from_settings
from service.store import JobStore
from service.sweeper import Sweeper
from service.text import unsafe_message

log = logging.getLogger(__name__)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _allowed_methods(request: Request) -> str:
    """Every method the request's path answers to: Starlette's 405 names only the first
    route that matched the path (POST for /v1/jobs, which also has GET). The routers' own
    routes are read because the app's list holds the included routers, not their routes."""
    methods: set[str] = set()
    routers = (jobs.router, artifacts.router, uploads.router, health.router)
    for route in (*request.app.router.routes, *(route for router in routers for route in router.routes)):
        regex, allowed = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if regex is not None and allowed and regex.match(request.scope["path"]):
            methods |= allowed
    return ", ".join(sorted(methods))


def error_response(error: ServiceError) -> JSONResponse:
    """A typed error in the one error body, for the answers given before the routes (the
    middleware below, the HTTP server in api/server.py)."""
    return _error(http_status(error), error.code, error.message, http_headers(error))


STREAMED_BODIES = re.compile(r"^/v1/uploads/[^/]+/files/")
"""PUT routes that stream a large body to storage themselves (uploads on local storage)."""


class BodyLimit:
    """Reads each request body before the routes do, bounded in size and in time: 413
    ``request_too_large`` above ``limit`` bytes (at once when Content-Length announces it), 408
    ``request_timeout`` when the whole body has not arrived ``timeout`` seconds after the headers
    (a client that announces a body and never sends it would otherwise hold its connection and
    its request for ever), which also closes the connection. After a 413 the rest of the body
    is left to the HTTP server, which discards it for at most its header deadline
    (api/server.py): closing at once could reset the connection before a client still sending
    has read the answer. The routes' bodies are small JSON; what the routes send back is not timed.

    A PUT to ``STREAMED_BODIES`` is handed on unread (its route checks the declared size), and
    408 there means that no piece of the body came for ``timeout`` seconds."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float) -> None:
        self.app, self.limit, self.timeout = app, limit, timeout

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body (None: the client went away), never more than ``limit`` + one piece."""
        pieces: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            pieces.append(message.get("body", b""))
            size += len(pieces[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                raise RequestTooLarge(f"the request body is above {self.limit} bytes (LOFTQ_MAX_REQUEST_BYTES)")
        return b"".join(pieces)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"]) if scope["type"] == "http" else {}
        length = headers.get(b"content-length")
        if scope["type"] != "http" or (length is None and b"transfer-encoding" not in headers):
            await self.app(scope, receive, send)  # no body (HTTP/1.1 has one only with either header)
            return
        if scope["method"] == "PUT" and STREAMED_BODIES.match(scope["path"]):
            await self.app(scope, _paced(receive, self.timeout), send)
            return
        try:
            if length is not None and length.isdigit() and int(length) > self.limit:
                raise RequestTooLarge(f"the request body is above {self.limit} bytes (LOFTQ_MAX_REQUEST_BYTES)")
            body = await asyncio.wait_for(self._read(receive), self.timeout)
        except asyncio.TimeoutError:
            error: ServiceError = RequestTimeout(
                f"the request body did not arrive within {self.timeout:g} s (LOFTQ_REQUEST_BODY_TIMEOUT_SECONDS)"
            )
        except RequestTooLarge as exc:
            error = exc
        else:
            if body is not None:
                await self.app(scope, _replay(body, receive), send)
            return
        await error_response(error)(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` for the routes: the body read already, then the server's (a disconnect)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _paced(receive: Receive, timeout: float) -> Receive:
    """``receive`` for a streamed body: raises 408 ``request_timeout`` (answered by the route's
    error handling) when the next piece takes more than ``timeout`` seconds; untimed once the
    body is in, so that waiting for a disconnect is not cut."""
    done = False

    async def paced() -> Message:
        nonlocal done
        if done:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"no part of the request body arrived for {timeout:g} s (LOFTQ_REQUEST_BODY_TIMEOUT_SECONDS)"
            ) from None
        done = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return paced


class PlainRequestTarget:
    """404 ``not_found`` for a path, 422 ``invalid_request`` for a query string, with Unicode
    format or control characters (a bidi override, a newline), percent-encoded or not: such a
    path names nothing here, and echoed into a message or a log either would show something
    other than it is."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            query = unquote(scope["query_string"].decode("ascii", "replace"))
            for part, text in (("path", scope["path"]), ("query", query)):
                problem = unsafe_message(text)
                if problem:
                    message = f"{part}: {problem}"
                    error = _error(404, "not_found", message) if part == "path" else error_response(InvalidRequest(message))
                    await error(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        """The sweeper runs beside the routes for the life of the server (service/sweeper.py), and
        the event hub's reader on the server's event loop (api/event_stream.py). The hub is
        made here, not with the app, so that it uses the store the app has when it starts."""
        stopped = threading.Event()
        if settings.sweep_interval_seconds > 0:
            sweeper = Sweeper(app.state.store, app.state.queue, app.state.artifacts, settings)
            threading.Thread(target=sweeper.run_forever, args=(stopped,), daemon=True, name="sweeper").start()
        raise_open_file_limit(settings.max_event_streams + 256)  # + the store's, broker's, storage's sockets
        slots = StreamSlots(settings.max_event_streams_per_tenant, settings.max_event_streams)
        app.state.events = EventHub.from_url(
            settings.redis_url, app.state.store, slots, heartbeat_seconds=settings.event_heartbeat_seconds
        )
        app.state.events.start()
        try:
            yield
        finally:
            stopped.set()
            await app.state.events.close()

    app = FastAPI(
        title="loftq-service",
        version="0.1.0",
        description="Turn Hugging Face checkpoints into LoftQ checkpoints as jobs.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    if not settings.api_keys:
        log.warning(
            "no API keys configured (LOFTQ_API_KEYS): the API is open and every caller is tenant 'default'; "
            "serve it only where nobody else can reach it"
        )
    app.state.store = JobStore.from_url(settings.redis_url, retention_seconds=settings.job_retention_seconds)
    app.state.queue = JobQueue.from_settings(settings)
    app.state.artifacts = store_from_settings(settings)
    app.state.policy = SourcePolicy(settings)  # parses LOFTQ_TENANT_SOURCES: a bad entry stops the start

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return _error(http_status(exc), exc.code, exc.message, http_headers(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = request_validation_error(exc.errors())
        return _error(http_status(error), error.code, error.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # Starlette could not parse the body before validation
            error = MalformedJson("the body could not be parsed as JSON (not UTF-8, nested too deeply, or a number too large)")
            return _error(http_status(error), error.code, error.message, exc.headers)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = exc.headers
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return _error(exc.status_code, code, str(exc.detail), headers)

    @app.exception_handler(redis.RedisError)
    async def store_unavailable(_: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("job store unreachable: %s", exc)
        return _error(503, "unavailable", "the job store is unreachable; try again")

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, "internal_error", "internal error; see the server log")

    app.add_middleware(PlainRequestTarget)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes, timeout=settings.request_body_timeout_seconds)
    app.include_router(jobs.router)
    app.include_router(artifacts.router)
    app.include_router(uploads.router)
    app.include_router(health.router)
    return app


@cache
def _default_app() -> FastAPI:
    return create_app()


def __getattr__(name: str) -> FastAPI:
    """``uvicorn api.main:app`` builds the app from the environment on first use, not at import."""
    if name == "app":
        return _default_app()
    raise AttributeError(name)
