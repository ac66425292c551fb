"""Webhooks: a job's events POSTed to its own ``webhook_url`` and to its tenant's webhook.

* **When**: the lifecycle (service/lifecycle.py) calls ``WebhookHook`` once per event (an end
  state is written by exactly one caller, which runs the hooks); ``job.progress`` at most once
  per ``webhook_progress_interval_seconds`` per job.
* **What**: ``{"type", "timestamp", "data": <the job>}``, the same bytes on every attempt, signed
  as the Standard Webhooks specification says: ``webhook-id`` (the delivery id, the same on every
  attempt: receivers drop repeats), ``webhook-timestamp`` and ``webhook-signature``
  (``v1,`` + base64 HMAC-SHA256 over ``id.timestamp.body`` with the secret's key bytes).
* **How**: the hook records a pending delivery and sends one Celery message per delivery to the
  webhook queue, never the jobs' queue: a slow or dead receiver never holds up a conversion.
  ``deliver_once`` makes one attempt; the task (worker/webhook_app.py) retries with the
  operator's backoff (``webhook_retry_seconds``) until a 2xx answer or the last attempt, and
  is acknowledged late, so a lost worker's delivery is redelivered: at least once.
* **Where not**: loopback, private, link-local and other non-public addresses, unless in
  ``webhook_allowed_networks``. Literal addresses and ``localhost`` are refused at submission;
  every name is resolved before each attempt, every address it resolves to is checked, and the
  connection goes to the checked address (a name that changes between check and connect,
  DNS rebinding, cannot point the request elsewhere). Redirects are not followed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from service.errors import ServiceError
from service.models import DEFAULT_WEBHOOK_EVENTS, Job, WebhookDelivery

if TYPE_CHECKING:
    from service.settings import Settings
    from service.store import JobStore

log = logging.getLogger(__name__)

WEBHOOK_TASK = "loftq.deliver_webhook"  # args: job id, delivery id
_SECRET_PREFIX = "whsec_"
LATE_SECONDS = 120.0
"""A pending delivery with no attempt this long after it was due is sent again by the sweeper
(its message was lost: the broker refused it, or a webhook worker died before acknowledging)."""
_MAX_ERROR = 300


class WebhookNotAllowed(ServiceError):
    """A webhook URL whose address the service may not call (or not a plain http(s) URL)."""

    code = "webhook_not_allowed"


def retry_window(settings: Settings) -> int:
    """Seconds a delivery may still be retried after its first attempt (with a margin): how long
    a deleted job's deliveries are kept."""
    return int(sum(settings.webhook_retry_seconds)) + 3600


def new_secret() -> str:
    """A signing secret in the Standard Webhooks form: ``whsec_`` + base64 of 24 random bytes."""
    return _SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def check_secret(secret: str) -> str:
    """A signing secret ``sign`` can use (``whsec_`` + base64 key bytes); ValueError otherwise."""
    try:
        key = base64.b64decode(secret.removeprefix(_SECRET_PREFIX), validate=True)
    except ValueError:
        key = b""
    if not key:
        raise ValueError("a webhook secret is whsec_ followed by base64 key bytes")
    return secret


def sign(secret: str, delivery_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one attempt."""
    key = base64.b64decode(secret.removeprefix(_SECRET_PREFIX))
    digest = hmac.new(key, f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def check_webhook_url(url: str) -> str:
    """The URL's form (http or https, a host, no credentials or fragment); ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("a webhook URL is http:// or https://")
    if not parts.hostname:
        raise ValueError("a webhook URL needs a host")
    if parts.username or parts.password:
        raise ValueError("a webhook URL may not carry credentials; verify deliveries with the signature instead")
    if parts.fragment:
        raise ValueError("a webhook URL may not have a fragment")
    try:
        parts.port  # noqa: B018 - raises for a port out of range
    except ValueError as exc:
        raise ValueError(f"a webhook URL's port is not valid: {exc}") from None
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise ValueError("a webhook URL may not contain spaces or control characters")
    return url


def _allowed(address: ipaddress.IPv4Address | ipaddress.IPv6Address, networks: list[str]) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in ipaddress.ip_network(network, strict=False) for network in networks):
        return True
    return address.is_global and not address.is_multicast


def check_submission(url: str, settings: Settings) -> None:
    """At POST: a literal address or ``localhost`` outside the allowed networks is refused now
    (a name is resolved before each delivery instead: what it resolves to now proves nothing)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        address = ipaddress.ip_address("127.0.0.1")
    else:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return
    if not _allowed(address, settings.webhook_allowed_networks):
        raise WebhookNotAllowed(
            f"webhook_url: {host} is not a public address; the operator allows only public ones "
            "and LOFTQ_WEBHOOK_ALLOWED_NETWORKS"
        )


def resolve_allowed(host: str, port: int, networks: list[str]) -> str:
    """One address of ``host`` to connect to, after checking every address it resolves to."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    refused = [str(a) for a in addresses if not _allowed(a, networks)]
    if not addresses or refused:
        raise WebhookNotAllowed(f"{host} resolves to {', '.join(refused) or 'nothing'}, which webhooks may not reach")
    return str(addresses[0])


def job_payload(job: Job) -> dict:
    return job.model_dump(mode="json", exclude={"webhook_secret"})


class WebhookHook:
    """The lifecycle's hook: records a delivery per interested webhook and hands it to the queue."""

    def __init__(self, store: JobStore, settings: Settings, send: Callable[[str, str], None]) -> None:
        self.store, self.settings, self.send = store, settings, send

    def targets(self, event: str, job: Job) -> list[tuple[str, str, str]]:
        """(target, url, secret) of the webhooks that want ``event`` of ``job``."""
        found = []
        request = job.request
        if request.webhook_url and event in (request.webhook_events_filter or DEFAULT_WEBHOOK_EVENTS):
            secret = self.store.webhook_secret(job.id)
            if secret is not None:
                found.append(("job", request.webhook_url, secret))
        tenant = self.settings.tenant_webhooks.get(job.tenant)
        if tenant is not None and event in tenant.events:
            found.append(("tenant", tenant.url, tenant.secret.get_secret_value()))
        return found

    def __call__(self, event: str, job: Job) -> None:
        targets = self.targets(event, job)
        if not targets:
            return
        if event == "job.progress" and not self._progress_due(job.id):
            return
        created = datetime.now(timezone.utc)
        body = json.dumps({"type": event, "timestamp": created.isoformat(), "data": job_payload(job)}).encode()
        for target, url, secret in targets:
            delivery = WebhookDelivery(id=f"msg_{uuid.uuid4().hex}", event=event, target=target, url=url, created_at=created)
            if self.store.add_delivery(job.id, delivery, body, secret, due=time.time() + LATE_SECONDS):
                self.send(job.id, delivery.id)

    def _progress_due(self, job_id: str) -> bool:
        interval = self.settings.webhook_progress_interval_seconds
        return interval <= 0 or self.store.claim_once(f"webhook-progress:{job_id}", max(1, round(interval)))


def _post(url: str, delivery_id: str, body: bytes, secret: str, settings: Settings) -> tuple[int | None, str | None]:
    """One signed POST to the checked address of ``url``: (HTTP status, error or None)."""
    import httpx

    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        address = resolve_allowed(host, port, settings.webhook_allowed_networks)
        timestamp = int(time.time())
        headers = {
            "Host": parts.netloc,
            "Content-Type": "application/json",
            "User-Agent": "loftq-service-webhooks",
            "webhook-id": delivery_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, delivery_id, timestamp, body),
        }
        extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
        with httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False) as client:
            status = client.post(httpx.URL(url).copy_with(host=address), content=body, headers=headers, extensions=extensions).status_code
    except WebhookNotAllowed as exc:
        return None, exc.message
    except (httpx.HTTPError, OSError) as exc:
        return None, (f"{type(exc).__name__}: {exc}")[:_MAX_ERROR]
    return status, None if 200 <= status < 300 else f"answered HTTP {status}"


def deliver_once(store: JobStore, settings: Settings, job_id: str, delivery_id: str) -> float | None:
    """One attempt at a pending delivery, recorded. Returns the seconds to wait before the next
    attempt, or None when there is nothing more to do (delivered, failed for good, or expired)."""
    found = store.delivery(job_id, delivery_id)
    if found is None:
        return None
    delivery, body, secret = found
    if delivery.state != "pending":
        return None  # a redelivered message of an attempt that was recorded
    status, error = _post(delivery.url, delivery.id, body, secret, settings)
    now = datetime.now(timezone.utc)
    attempts = delivery.attempts + 1
    retries = settings.webhook_retry_seconds
    update: dict = {"attempts": attempts, "last_attempt_at": now, "last_status": status, "last_error": error}
    wait = None
    if error is None:
        update |= {"state": "delivered", "delivered_at": now}
    elif attempts > len(retries):
        update["state"] = "failed"
        log.warning("webhook %s of job %s failed after %d attempts: %s", delivery.id, job_id, attempts, error)
    else:
        wait = retries[attempts - 1]
    due = None if wait is None else time.time() + wait + LATE_SECONDS
    store.save_delivery(job_id, delivery.model_copy(update=update), due=due)
    return wait
