"""The FastAPI application: routers, one error shape, shared clients on ``app.state``."""

from __future__ import annotations

import logging
from functools import cache

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.errors import ServiceError
from api.jobstore import JobStore
from api.queue import JobQueue
from api.routes import artifacts, health, jobs
from api.settings import Settings, get_settings
from api.storage import store_from_settings

log = logging.getLogger(__name__)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="loftq-service",
        version="0.1.0",
        description="Turn Hugging Face checkpoints into LoftQ checkpoints as jobs.",
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
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return _error(422, "invalid_request", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(redis.RedisError)
    async def store_unavailable(_: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("job store unreachable: %s", exc)
        return _error(503, "unavailable", "the job store is unreachable; try again")

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, "internal_error", "internal error; see the server log")

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
