"""Typed service errors and their one mapping to HTTP."""

from __future__ import annotations


class ServiceError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class JobNotFound(ServiceError):
    status = 404
    code = "job_not_found"


class ArtifactNotFound(ServiceError):
    status = 404
    code = "artifact_not_found"


class InvalidSource(ServiceError):
    status = 422
    code = "invalid_source"


class JobNotFinished(ServiceError):
    status = 409
    code = "job_not_finished"


class InvalidTransition(ServiceError):
    status = 409
    code = "invalid_transition"


class Unavailable(ServiceError):
    status = 503
    code = "unavailable"
