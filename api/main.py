"""The FastAPI application: routers, one error shape, shared clients on ``app.state``."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import cache

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import MalformedJson, RequestTooLarge, ServiceError, request_validation_error
from api.jobstore import JobStore
from api.queue import JobQueue
from api.routes import artifacts, health, jobs
from api.settings import Settings, get_settings
from api.storage import store_from_settings
from api.sweeper import Sweeper

log = logging.getLogger(__name__)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _allowed_methods(request: Request) -> str:
    """Every method the request's path answers to: Starlette's 405 names only the first
    route that matched the path (POST for /v1/jobs, which also has GET). The routers' own
    routes are read because the app's list holds the included routers, not their routes."""
    methods: set[str] = set()
    for route in (*request.app.router.routes, *jobs.router.routes, *artifacts.router.routes, *health.router.routes):
        regex, allowed = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if regex is not None and allowed and regex.match(request.scope["path"]):
            methods |= allowed
    return ", ".join(sorted(methods))


class BodyLimit:
    """413 ``request_too_large`` for a body above ``limit`` bytes: at once when Content-Length
    announces it; a body without one is read here first, never more than ``limit`` + one
    piece, and handed on only when it fits (the routes' bodies are small JSON)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = RequestTooLarge(f"the request body is above {self.limit} bytes (LOFTQ_MAX_REQUEST_BYTES)")
        await _error(error.status, error.code, error.message)(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.limit:
                await self._refuse(scope, receive, send)
            else:  # the HTTP server holds the client to its Content-Length
                await self.app(scope, receive, send)
            return
        pieces: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            pieces.append(message.get("body", b""))
            size += len(pieces[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
        body, replayed = b"".join(pieces), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        """The sweeper runs beside the routes for the life of the server (api/sweeper.py)."""
        stopped = threading.Event()
        if settings.sweep_interval_seconds > 0:
            sweeper = Sweeper(app.state.store, app.state.queue, app.state.artifacts, settings)
            threading.Thread(target=sweeper.run_forever, args=(stopped,), daemon=True, name="sweeper").start()
        try:
            yield
        finally:
            stopped.set()

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
    app.state.queue = JobQueue(settings.redis_url, settings.queue)
    app.state.artifacts = store_from_settings(settings)

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = request_validation_error(exc.errors())
        return _error(error.status, error.code, error.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # Starlette could not parse the body before validation
            error = MalformedJson("the body could not be parsed as JSON (not UTF-8, nested too deeply, or a number too large)")
            return _error(error.status, error.code, error.message, exc.headers)
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

    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.include_router(jobs.router)
    app.include_router(artifacts.router)
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
