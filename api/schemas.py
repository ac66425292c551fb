"""The HTTP-only models of the API: the error body, readiness, and the OpenAPI ``responses``
of typed errors. The job models themselves are the service core's (service/models.py)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from api.errors import http_status
from service.errors import ServiceError
from service.models import ErrorInfo


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Readiness(BaseModel):
    """Body of ``GET /readyz`` (200 when every check is true, 503 otherwise)."""

    status: str
    checks: dict[str, bool]


_ERROR_HEADERS: dict[int, dict[str, dict[str, Any]]] = {
    401: {
        "WWW-Authenticate": {
            "description": 'Bearer realm="loftq", with error="invalid_token" when the key is unknown.',
            "schema": {"type": "string"},
        }
    },
    429: {"Retry-After": {"description": "Seconds until a retry may succeed.", "schema": {"type": "integer", "minimum": 1}}},
}

ErrorSpec = type[ServiceError] | tuple[type[ServiceError], str]


def error_responses(*errors: ErrorSpec) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of the typed errors a route can answer with, all in the one
    error body ``{"error": {"code", "message"}}`` that api/main.py sends, grouped by status
    with their codes listed (a class, or a class with the code it is raised with). Declaring
    422 here also replaces FastAPI's default validation body, which this API never sends."""
    codes: dict[int, list[str]] = {}
    for spec in errors:
        error, code = spec if isinstance(spec, tuple) else (spec, spec.code)
        codes.setdefault(http_status(error), []).append(code)
    return {
        status: {
            "model": ErrorResponse,
            "description": "Error codes: " + ", ".join(names),
            **({"headers": _ERROR_HEADERS[status]} if status in _ERROR_HEADERS else {}),
        }
        for status, names in sorted(codes.items())
    }
