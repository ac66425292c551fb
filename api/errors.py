"""The one mapping of the service's typed errors to HTTP: status codes and response headers.

The errors themselves (service/errors.py and the core modules that raise them) carry only a
code and a message; a worker records the same pair in a failed job. The two errors defined
here are the HTTP server's own (api/server.py answers them before the app sees a request)."""

from __future__ import annotations

from service.errors import (
    ArtifactNotFound,
    CalibrationDataNotFound,
    CalibrationDataTooLarge,
    IdempotencyKeyReused,
    InvalidCalibrationSource,
    InvalidRequest,
    InvalidSource,
    InvalidTransition,
    JobNotFinished,
    JobNotFound,
    MalformedJson,
    ModelTooLarge,
    RequestTooLarge,
    ServiceError,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)
from service.policy import SourceNotAllowed
from service.storage import StorageUnavailable
from service.uploads import UploadConflict, UploadIncomplete, UploadNotFound
from service.webhooks import WebhookNotAllowed


class RequestTimeout(ServiceError):
    """A request (its headers, or its body) that did not arrive in time: the client is too slow
    or stalled (LOFTQ_REQUEST_HEADER_TIMEOUT_SECONDS, LOFTQ_REQUEST_BODY_TIMEOUT_SECONDS)."""

    code = "request_timeout"


class Overloaded(ServiceError):
    """The API process serves LOFTQ_MAX_CONNECTIONS connections or requests already (answered
    by the HTTP server in api/server.py before the app sees the request)."""

    code = "overloaded"


STATUS: dict[type[ServiceError], int] = {
    ServiceError: 400,
    MalformedJson: 400,
    Unauthorized: 401,
    JobNotFound: 404,
    ArtifactNotFound: 404,
    UploadNotFound: 404,
    CalibrationDataNotFound: 404,
    RequestTimeout: 408,
    JobNotFinished: 409,
    IdempotencyKeyReused: 409,
    InvalidTransition: 409,
    UploadIncomplete: 409,
    UploadConflict: 409,
    RequestTooLarge: 413,
    CalibrationDataTooLarge: 413,
    ModelTooLarge: 413,
    InvalidSource: 422,
    InvalidRequest: 422,
    InvalidCalibrationSource: 422,
    SourceNotAllowed: 422,
    WebhookNotAllowed: 422,
    TooManyRequests: 429,
    Unavailable: 503,
    StorageUnavailable: 503,
    Overloaded: 503,
}
"""Status per error class; a subclass not listed answers with its nearest listed base's."""


def http_status(error: ServiceError | type[ServiceError]) -> int:
    cls = error if isinstance(error, type) else type(error)
    return next(STATUS[base] for base in cls.__mro__ if base in STATUS)


def http_headers(error: ServiceError) -> dict[str, str] | None:
    """Response headers an error calls for: RFC 6750's challenge on 401, Retry-After on 429."""
    if isinstance(error, Unauthorized):
        return {"WWW-Authenticate": 'Bearer realm="loftq"' + (', error="invalid_token"' if error.invalid_token else "")}
    if isinstance(error, TooManyRequests):
        return {"Retry-After": str(error.retry_after)}
    if isinstance(error, RequestTimeout):
        return {"Connection": "close"}  # the rest of the request is never read
    if isinstance(error, Overloaded):
        return {"Retry-After": "1", "Connection": "close"}
    return None
