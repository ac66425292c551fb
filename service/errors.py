"""Typed errors of the job service: a machine-readable ``code`` and a message.

They say what went wrong, not how to answer it: HTTP statuses and headers are api/errors.py's
(one table), and a worker records the same code and message in the failed job."""

from __future__ import annotations


class ServiceError(Exception):
    code = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Unauthorized(ServiceError):
    """No API key, or one the operator did not configure (``invalid_token``: a key was sent)."""

    code = "unauthorized"

    def __init__(self, message: str, *, invalid_token: bool = False) -> None:
        super().__init__(message)
        self.invalid_token = invalid_token


class RequestTooLarge(ServiceError):
    code = "request_too_large"


class TooManyRequests(ServiceError):
    """A per-tenant limit (submission rate, queued jobs); ``retry_after``: seconds until a retry may succeed."""

    def __init__(self, message: str, *, code: str, retry_after: int) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after = max(1, retry_after)


class JobNotFound(ServiceError):
    code = "job_not_found"


class ArtifactNotFound(ServiceError):
    code = "artifact_not_found"


class MalformedJson(ServiceError):
    """A body that is not JSON at all (a syntax error, bytes that are not UTF-8, nesting or a
    number too large to parse): 400, apart from 422 ``invalid_request``, which is JSON that
    does not fit the request's schema."""

    code = "malformed_json"


class InvalidSource(ServiceError):
    code = "invalid_source"


class InvalidRequest(ServiceError):
    """A request that pydantic accepts field by field but whose fields do not fit together."""

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

    code = "invalid_calibration_data"


class CalibrationDataNotFound(ServiceError):
    """The calibration URI names nothing the worker can read (raised in the worker)."""

    code = "calibration_data_not_found"


class CalibrationDataTooLarge(ServiceError):
    """More calibration text than ``calibration_max_bytes`` (raised in the worker, before any download)."""

    code = "calibration_data_too_large"


class ModelTooLarge(ServiceError):
    """A source checkpoint above ``max_model_bytes`` (raised in the worker, before any download)."""

    code = "model_too_large"


class JobNotFinished(ServiceError):
    code = "job_not_finished"


class IdempotencyKeyReused(ServiceError):
    """An ``Idempotency-Key`` already used for a different request body."""

    code = "idempotency_key_reused"


class InvalidTransition(ServiceError):
    code = "invalid_transition"


class Unavailable(ServiceError):
    code = "unavailable"
