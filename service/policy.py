"""Which data a tenant may read: the policy for sources and calibration data.

Every job reads with the service's own credentials (one S3 endpoint, the worker's disk, the
Hub), so what a tenant may name as ``source`` or ``calibration_data`` must be decided here,
per tenant, and never by what those credentials happen to reach. The rules, in order:

1. **The service's own data is never a source.** In the artifact bucket a tenant reads only
   its own area (``tenants/<tenant>/``: its uploads under ``inputs/`` and its artifacts; the
   open API's tenant ``default`` everything outside ``tenants/``). On disk, the artifact
   root, the scratch directory and the data directory are refused to everyone, even under an
   allowed root (a tenant reaches its own uploads through ``upload://``).
2. **Its own uploads** (``upload://<id>``) are always readable: they resolve inside the
   tenant's area, never through the URI alone.
3. **Everything else must be granted**: ``LOFTQ_TENANT_SOURCES`` maps a tenant to URI
   prefixes (``s3://bucket/prefix/``, ``file:///dir/``, ``hf://org/``; a bare scheme grants
   all of it). Unset, the tenant ``default`` (the open API's one tenant, or the operator's own
   after keys were turned on) may read everything, as the single-tenant service did, and every
   other tenant only its own data.

The same checks run at submission (422 ``source_not_allowed``) and in the worker before it
reads anything, against each file it opens (symlinks resolved), so a policy tightened while a
job waits, or a link planted in a granted directory, still holds. Messages name only the URI
the tenant gave and the tenant's own grants.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from service.errors import InvalidSource, ServiceError
from service.locations import CalibrationLocation, FileLocation, HubLocation, JobInputs, S3Location, SourceLocation
from service.settings import Settings
from service.tenants import DEFAULT_TENANT, tenant_prefix
from service.uris import HF_PART, parse_calibration_uri, parse_s3, parse_source_uri, resolve_again

if TYPE_CHECKING:
    from service.models import JobCreate

EVERYTHING = ("s3://", "file://", "hf://")
"""The grants of the tenant ``default`` when LOFTQ_TENANT_SOURCES is unset."""
INPUTS = "inputs"
"""The folder of a tenant's area that holds its uploads (``<area>inputs/<upload id>/``)."""


class SourceNotAllowed(ServiceError):
    """A source or calibration URI the tenant may not read: 422 at submission, and the code a
    job fails with when the worker's own check refuses it."""

    code = "source_not_allowed"


def upload_prefix(tenant: str, upload_id: str) -> str:
    """Where an upload's files lie in the artifact store (no trailing slash)."""
    return f"{tenant_prefix(tenant)}{INPUTS}/{upload_id}"


@dataclass(frozen=True)
class Grant:
    """One entry of a tenant's policy: a URI prefix it may read under."""

    scheme: Literal["s3", "file", "hf"]
    bucket: str = ""  # s3: "" is any bucket
    prefix: str = ""  # s3: key prefix without slashes at the ends; "" is the whole bucket
    path: str = ""  # file: a real directory; "" is any allowed root
    repo: str = ""  # hf: "" any repository, "org", or "org/name"

    def __str__(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.prefix + '/' if self.prefix else ''}" if self.bucket else "s3://"
        if self.scheme == "file":
            return f"file://{self.path}/" if self.path else "file://"
        return f"hf://{self.repo}" + ("/" if self.repo and "/" not in self.repo else "")


def parse_grant(text: str) -> Grant:
    """A policy entry (``s3://``, ``s3://bucket/prefix/``, ``file://``, ``file:///dir/``,
    ``hf://``, ``hf://org/``, ``hf://org/name``); ValueError naming it otherwise."""
    scheme, sep, rest = text.partition("://")
    try:
        if sep and scheme == "s3":
            if not rest.strip("/"):
                return Grant("s3")
            location = parse_s3(text, rest)
            return Grant("s3", bucket=location.bucket, prefix=location.key)
        if sep and scheme == "file":
            if rest and (not rest.startswith("/") or ".." in rest.split("/")):
                raise ValueError("file grants name an absolute directory, file:///dir/")
            return Grant("file", path=os.path.realpath(rest) if rest.strip("/") else "")
        if sep and scheme == "hf":
            repo = rest.strip("/")
            if repo and (repo.count("/") > 1 or not all(HF_PART.fullmatch(part) for part in repo.split("/"))):
                raise ValueError("hf grants name hf://, hf://org/ or hf://org/name")
            return Grant("hf", repo=repo)
    except InvalidSource as exc:
        raise ValueError(f"LOFTQ_TENANT_SOURCES entry {text!r}: {exc.message}") from None
    except ValueError as exc:
        raise ValueError(f"LOFTQ_TENANT_SOURCES entry {text!r}: {exc}") from None
    raise ValueError(f"LOFTQ_TENANT_SOURCES entry {text!r}: use s3://..., file://... or hf://... prefixes")


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _key_under(key: str, prefix: str) -> bool:
    return not prefix or key == prefix or key.startswith(prefix + "/")


class SourcePolicy:
    """The policy of one configuration; ``check_*`` raise SourceNotAllowed or return None.
    Building it parses every grant, so a bad LOFTQ_TENANT_SOURCES stops the service at start."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # The default does not depend on LOFTQ_API_KEYS, which only the API holds: the worker's
        # check must reach the same answer as the API's.
        configured = settings.tenant_sources if settings.tenant_sources is not None else {DEFAULT_TENANT: list(EVERYTHING)}
        self._grants = {tenant: tuple(parse_grant(entry) for entry in entries) for tenant, entries in configured.items()}
        service_dirs = [settings.local_storage_root, settings.work_dir, settings.data_dir]
        self._service_dirs = [os.path.realpath(d) for d in service_dirs if d is not None]

    def grants(self, tenant: str) -> tuple[Grant, ...]:
        return self._grants.get(tenant, self._grants.get("*", ()))

    def _refuse(self, what: str, uri: str, tenant: str, reason: str = "") -> SourceNotAllowed:
        grants = ", ".join(str(g) for g in self.grants(tenant)) or "nothing beyond its own data"
        return SourceNotAllowed(
            f"{what}: {uri!r} is not readable by tenant {tenant!r}{': ' + reason if reason else ''}. It may read its uploads "
            f"(upload://, POST /v1/uploads) and {grants} (the operator's LOFTQ_TENANT_SOURCES)"
        )

    def check_s3(self, what: str, uri: str, tenant: str, bucket: str, key: str) -> None:
        """``key`` is a key or key prefix in ``bucket`` (no slashes at the ends)."""
        if self.settings.storage == "s3" and bucket == self.settings.s3_bucket:
            area = tenant_prefix(tenant).rstrip("/")
            own = _key_under(key, area) if area else bool(key) and key.split("/")[0] != "tenants"
            if own:
                return
            raise self._refuse(what, uri, tenant, "the artifact bucket holds other tenants' data")
        if not any(g.scheme == "s3" and (not g.bucket or g.bucket == bucket) and _key_under(key, g.prefix) for g in self.grants(tenant)):
            raise self._refuse(what, uri, tenant)

    def check_file(self, what: str, uri: str, tenant: str, real_path: str) -> None:
        """``real_path`` has its symlinks resolved; call again for every file read under it."""
        if any(_under(real_path, d) or _under(d, real_path) for d in self._service_dirs):
            raise self._refuse(what, uri, tenant, "it holds the service's own files")
        if not any(g.scheme == "file" and (not g.path or _under(real_path, g.path)) for g in self.grants(tenant)):
            raise self._refuse(what, uri, tenant)

    def check_hub(self, what: str, uri: str, tenant: str, repo_id: str) -> None:
        org = repo_id.split("/")[0]
        if not any(g.scheme == "hf" and g.repo in ("", org, repo_id) for g in self.grants(tenant)):
            raise self._refuse(what, uri, tenant)

    def hub_token(self, tenant: str) -> str | bool:
        """The tenant's own Hub token, or False: read anonymously, never with the worker's."""
        token = self.settings.hf_tokens.get(tenant)
        return token.get_secret_value() if token is not None else False

    # -- whole URIs -----------------------------------------------------------------------------

    def check_source(self, uri: str, tenant: str, location: SourceLocation | None = None) -> SourceLocation:
        """Where ``uri`` points, once the tenant may read it: ``location`` as parsed at
        submission (a file path resolved again), or ``uri`` parsed now."""
        if location is None:
            location = parse_source_uri(uri, self.settings)
        elif isinstance(location, FileLocation):
            location = resolve_again(location, uri, self.settings)
        if isinstance(location, S3Location):
            self.check_s3("source", uri, tenant, location.bucket, location.key)
        elif isinstance(location, FileLocation):
            self.check_file("source", uri, tenant, location.path)
        elif isinstance(location, HubLocation):
            self.check_hub("source", uri, tenant, location.repo)
        return location  # an upload is looked up in the tenant's own area: nobody else's to name

    def check_calibration(self, uri: str, tenant: str, location: CalibrationLocation | None = None) -> CalibrationLocation:
        """Where ``calibration_data`` points, once the tenant may read it (as ``check_source``)."""
        if location is None:
            location = parse_calibration_uri(uri, self.settings)
        elif location.scheme == "file":
            real = resolve_again(FileLocation(path=location.path), uri, self.settings).path
            location = location.model_copy(update={"path": real})
        if location.scheme == "s3":
            self.check_s3("calibration_data", uri, tenant, location.bucket, location.key)
        elif location.scheme == "file":
            self.check_file("calibration_data", uri, tenant, location.path)
        return location

    def check_inputs(self, request: JobCreate, inputs: JobInputs, tenant: str) -> None:
        """Both inputs of a job request, as ``check_job_inputs`` parsed them."""
        self.check_source(request.source, tenant, inputs.source)
        if request.calibration_data is not None:
            self.check_calibration(request.calibration_data, tenant, inputs.calibration)
