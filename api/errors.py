"""Typed service errors and their one mapping to HTTP."""

from __future__ import annotations


class ServiceError(Exception):
    status = 400
    code = "bad_request"
    headers: dict[str, str] | None = None  # extra response headers (WWW-Authenticate on 401)

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Unauthorized(ServiceError):
    """No API key, or one the operator did not configure (RFC 6750's challenge in the header)."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str, *, invalid_token: bool = False) -> None:
        super().__init__(message)
        challenge = 'Bearer realm="loftq"' + (', error="invalid_token"' if invalid_token else "")
        self.headers = {"WWW-Authenticate": challenge}


class RequestTooLarge(ServiceError):
    status = 413
    code = "request_too_large"


class RequestTimeout(ServiceError):
    """A request (its headers, or its body) that did not arrive in time: the client is too slow
    or stalled (LOFTQ_REQUEST_HEADER_TIMEOUT_SECONDS, LOFTQ_REQUEST_BODY_TIMEOUT_SECONDS)."""

    status = 408
    code = "request_timeout"
    headers = {"Connection": "close"}  # the rest of the request is never read


class TooManyRequests(ServiceError):
    """A per-tenant limit (submission rate, queued jobs); ``Retry-After`` says when to retry."""

    status = 429

    def __init__(self, message: str, *, code: str, retry_after: int) -> None:
        super().__init__(message)
        self.code = code
        self.headers = {"Retry-After": str(max(1, retry_after))}


class JobNotFound(ServiceError):
    status = 404
    code = "job_not_found"


class ArtifactNotFound(ServiceError):
    status = 404
    code = "artifact_not_found"


class MalformedJson(ServiceError):
    """A body that is not JSON at all (a syntax error, bytes that are not UTF-8, nesting or a
    number too large to parse): 400, apart from 422 ``invalid_request``, which is JSON that
    does not fit the request's schema."""

    status = 400
    code = "malformed_json"


class InvalidSource(ServiceError):
    status = 422
    code = "invalid_source"


class InvalidRequest(ServiceError):
    """A request that pydantic accepts field by field but whose fields do not fit together."""

    status = 422
    code = "invalid_request"


def request_validation_error(problems: list[dict]) -> ServiceError:
    """FastAPI's request validation problems as a service error: a body that could not be
    parsed is ``malformed_json``, anything else ``invalid_request`` naming every field."""
    for problem in problems:
        if problem.get("type") == "json_invalid":
            position = problem.get("loc", ("body", "?"))[-1]
            reason = (problem.get("ctx") or {}).get("error") or problem.get("msg", "")
            return MalformedJson(f"the body is not valid JSON: {reason} (at character {position})")
    return InvalidRequest("; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in problems))


class InvalidCalibrationSource(ServiceError):
    """A ``calibration_data`` URI refused before queueing (same code as calibration text the
    engine cannot use, so a client learns which field to fix either way)."""

    status = 422
    code = "invalid_calibration_data"


class CalibrationDataNotFound(ServiceError):
    """The calibration URI names nothing the worker can read (raised in the worker)."""

    status = 404
    code = "calibration_data_not_found"


class CalibrationDataTooLarge(ServiceError):
    """More calibration text than ``calibration_max_bytes`` (raised in the worker, before any download)."""

    status = 413
    code = "calibration_data_too_large"


class ModelTooLarge(ServiceError):
    """A source checkpoint above ``max_model_bytes`` (raised in the worker, before any download)."""

    status = 413
    code = "model_too_large"


class JobNotFinished(ServiceError):
    status = 409
    code = "job_not_finished"


class IdempotencyKeyReused(ServiceError):
    """An ``Idempotency-Key`` already used for a different request body."""

    status = 409
    code = "idempotency_key_reused"


class InvalidTransition(ServiceError):
    status = 409
    code = "invalid_transition"


class Unavailable(ServiceError):
    status = 503
    code = "unavailable"


class Overloaded(ServiceError):
    """The API process serves LOFTQ_MAX_CONNECTIONS connections or requests already (answered
    by the HTTP server in api/server.py before the app sees the request)."""

    status = 503
    code = "overloaded"
    headers = {"Retry-After": "1", "Connection": "close"}
