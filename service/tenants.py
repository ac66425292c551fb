"""Tenants and their API keys: bearer tokens the operator configures, stored only as sha256
hashes, one tenant each.

``LOFTQ_API_KEYS`` holds ``tenant:sha256hex`` entries (a JSON list or a comma-separated
list); ``loftq-service hash-key`` makes a key and its entry. With no entries the API is open
and every caller is the tenant ``default``. Keys are random tokens, not passwords, so one
unsalted sha256 is enough: the hash of a guess says nothing about any key.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets

from service.text import escape_unsafe, unsafe_message

DEFAULT_TENANT = "default"
TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")  # \Z: "$" would let a trailing newline through
_HASH = re.compile(r"^[0-9a-f]{64}\Z")


def hash_key(key: str) -> str:
    """The sha256 hex of an API key: what ``LOFTQ_API_KEYS`` stores instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key (256 bits)."""
    return "lq_" + secrets.token_urlsafe(32)


def parse_api_keys(value: object) -> dict[str, str]:
    """``tenant:sha256hex`` entries (JSON list, comma list, or a list) → {hash: tenant}.

    Anything that is not a 64-hex hash is refused, so a plain key pasted by mistake stops the
    service at start instead of sitting in its settings."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):  # already parsed (a Settings copied from another)
        entries = [f"{tenant}:{digest}" for digest, tenant in value.items()]
    elif isinstance(value, str):
        text = value.strip()
        entries = json.loads(text) if text.startswith("[") else [part for part in text.split(",") if part.strip()]
    else:
        entries = list(value)  # type: ignore[call-overload]
    keys: dict[str, str] = {}
    for entry in entries:
        tenant, sep, digest = str(entry).strip().rpartition(":")
        digest = digest.lower()
        problem = unsafe_message(tenant)
        if problem:  # named, so that a tenant spoofing another in the logs is plain to see
            raise ValueError(f"API key entry for tenant '{escape_unsafe(tenant)}': the tenant name {problem}")
        if not sep or not TENANT_PATTERN.match(tenant) or not _HASH.match(digest):
            raise ValueError(
                "each API key entry is tenant:sha256hex (tenant: lower-case letters, digits, - and _; "
                "make one with `loftq-service hash-key TENANT`)"
            )
        if keys.get(digest, tenant) != tenant:
            raise ValueError(f"one API key hash is given to two tenants ({keys[digest]} and {tenant})")
        keys[digest] = tenant
    return keys


def tenant_prefix(tenant: str) -> str:
    """Where a tenant's artifacts live: ``tenants/<tenant>/``, and the bucket root for ``default``
    (the layout of an API without keys, unchanged)."""
    return "" if tenant == DEFAULT_TENANT else f"tenants/{tenant}/"
