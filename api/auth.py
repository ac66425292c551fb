"""Who is calling: the bearer key of a request, looked up among the operator's keys
(service/tenants.py holds the keys' format and hashing)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import Unauthorized
from service.tenants import DEFAULT_TENANT, hash_key

_bearer = HTTPBearer(auto_error=False, description="An API key from the operator (LOFTQ_API_KEYS).")


def caller_tenant(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """The tenant of the request's bearer key; ``default`` when no keys are configured."""
    keys: dict[str, str] = request.app.state.settings.api_keys
    if not keys:
        return DEFAULT_TENANT
    if credentials is None:
        raise Unauthorized("this API needs an API key: send Authorization: Bearer <key>")
    tenant = keys.get(hash_key(credentials.credentials))
    if tenant is None:
        raise Unauthorized("the API key is not valid", invalid_token=True)
    return tenant
