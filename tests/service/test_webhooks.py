"""Webhooks (service/webhooks.py): the Standard Webhooks signature, the address policy, the hook
that records deliveries and one delivery attempt, on a real Redis-compatible server and a real
HTTP receiver on loopback (tests/integration/test_webhook_deliveries.py runs the whole service)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from service.lifecycle import Lifecycle
from service.models import JobCreate, JobState, Progress
from service.settings import Settings
from service.store import JobStore
from service.webhooks import WebhookHook, WebhookNotAllowed, check_submission, deliver_once, new_secret, resolve_allowed, sign

LOOPBACK = ["127.0.0.0/8"]


def test_signatures_match_the_standard_webhooks_test_vector() -> None:
    body = b'{"test": 2432232314}'
    assert sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_secrets_are_random_and_in_the_standard_form() -> None:
    first, second = new_secret(), new_secret()
    assert first != second and first.startswith("whsec_") and len(base64.b64decode(first[6:])) == 24


@pytest.mark.parametrize(
    "url", ["ftp://example.com/", "http:///path", "http://user:pw@example.com/", "https://example.com/#frag", "http://example.com:99999/", "javascript:alert(1)"]
)
def test_only_plain_http_urls_are_webhooks(url: str) -> None:
    with pytest.raises(ValidationError):
        JobCreate(source="file:///m", webhook_url=url)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1/", "http://localhost:8080/", "http://api.localhost/", "http://10.1.2.3/", "http://192.168.0.1/",
     "http://169.254.169.254/latest/meta-data", "http://[::1]/", "http://[fe80::1]/", "http://[::ffff:127.0.0.1]/", "http://0.0.0.0/",
     "http://100.64.0.1/"],
)
def test_addresses_that_are_not_public_are_refused_unless_allowed(url: str) -> None:
    with pytest.raises(WebhookNotAllowed):
        check_submission(url, Settings(_env_file=None))
    check_submission(url, Settings(_env_file=None, webhook_allowed_networks=["0.0.0.0/0", "::/0"]))


def test_names_are_checked_for_every_address_they_resolve_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name with one public and one private address (DNS rebinding's trick) is refused."""
    answers = {"public.example": ["93.184.216.34"], "rebind.example": ["93.184.216.34", "10.0.0.7"]}

    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert resolve_allowed("public.example", 443, []) == "93.184.216.34"
    with pytest.raises(WebhookNotAllowed, match="10.0.0.7"):
        resolve_allowed("rebind.example", 443, [])
    assert resolve_allowed("rebind.example", 443, ["10.0.0.0/8"]) == "93.184.216.34"
    check_submission("http://rebind.example/", Settings(_env_file=None))  # names are resolved at delivery, not at POST


class _Receiver(BaseHTTPRequestHandler):
    status = 204
    seen: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body, "path": self.path})
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    _Receiver.seen, _Receiver.status = [], 204
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore.from_url(redis_url, prefix=f"w{uuid.uuid4().hex[:12]}:", retention_seconds=3600)


def _settings(**values: object) -> Settings:
    return Settings(_env_file=None, webhook_allowed_networks=LOOPBACK, webhook_retry_seconds=[1, 2], **values)


def test_deliveries_are_recorded_sent_signed_and_retried(store: JobStore, receiver: str) -> None:
    tenant_secret = new_secret()
    settings = _settings(
        tenant_webhooks={"default": {"url": f"{receiver}/tenant", "secret": tenant_secret, "events": ["job.succeeded"]}},
        webhook_progress_interval_seconds=3600,
    )
    sent: list[tuple[str, str]] = []
    lifecycle = Lifecycle(store, [WebhookHook(store, settings, lambda job_id, delivery_id: sent.append((job_id, delivery_id)))])
    request = JobCreate(source="file:///m", webhook_url=f"{receiver}/job", webhook_events_filter=["job.progress", "job.succeeded"])
    job, _ = lifecycle.submit(request, tenant="default", prefix="")
    assert job.webhook_secret and store.get(job.id).webhook_secret is None  # kept beside the record only
    lifecycle.start(job.id)  # not in the filter
    for done in (1, 2, 3):  # throttled: one progress webhook per interval
        lifecycle.progress(job, Progress(stage="converting", layers_done=done, layers_total=3))
    lifecycle.finish(job.id, JobState.succeeded)
    deliveries = store.deliveries(job.id)
    assert [(d.event, d.target, d.state) for d in deliveries] == [
        ("job.progress", "job", "pending"), ("job.succeeded", "job", "pending"), ("job.succeeded", "tenant", "pending")
    ]
    assert [delivery_id for _, delivery_id in sent] == [d.id for d in deliveries]

    _Receiver.status = 500
    assert deliver_once(store, settings, job.id, deliveries[1].id) == 1  # the first wait of webhook_retry_seconds
    assert deliver_once(store, settings, job.id, deliveries[1].id) == 2
    assert deliver_once(store, settings, job.id, deliveries[1].id) is None  # retries spent
    failed = store.deliveries(job.id)[1]
    assert (failed.state, failed.attempts, failed.last_status, failed.last_error) == ("failed", 3, 500, "answered HTTP 500")
    assert deliver_once(store, settings, job.id, deliveries[1].id) is None and len(_Receiver.seen) == 3  # no attempt once failed

    _Receiver.status = 204
    for delivery in (deliveries[0], deliveries[2]):
        assert deliver_once(store, settings, job.id, delivery.id) is None
    assert [d.state for d in store.deliveries(job.id)] == ["delivered", "failed", "delivered"]
    first, second = _Receiver.seen[0], _Receiver.seen[1]
    assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"] == deliveries[1].id
    assert first["body"] == second["body"]  # the same bytes on every attempt
    for seen in _Receiver.seen:
        secret = tenant_secret if seen["path"] == "/tenant" else job.webhook_secret
        key = base64.b64decode(secret.removeprefix("whsec_"))
        signed = f"{seen['headers']['webhook-id']}.{seen['headers']['webhook-timestamp']}.".encode() + seen["body"]
        assert seen["headers"]["webhook-signature"] == "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    payload = json.loads(_Receiver.seen[-1]["body"])
    assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job.id and "webhook_secret" not in payload["data"]


def test_a_delivery_to_a_refused_address_fails_without_a_request(store: JobStore, receiver: str) -> None:
    allowed, refused = _settings(), Settings(_env_file=None, webhook_retry_seconds=[])
    lifecycle = Lifecycle(store, [WebhookHook(store, allowed, lambda *_: None)])
    job, _ = lifecycle.submit(JobCreate(source="file:///m", webhook_url=f"{receiver}/x"), tenant="default", prefix="")
    lifecycle.cancel(job.id)
    delivery = store.deliveries(job.id)[0]
    assert deliver_once(store, refused, job.id, delivery.id) is None  # the operator took loopback away meanwhile
    failed = store.deliveries(job.id)[0]
    assert failed.state == "failed" and "may not reach" in failed.last_error and _Receiver.seen == []


def test_a_deleted_job_s_pending_deliveries_are_kept_to_be_sent(store: JobStore, receiver: str) -> None:
    lifecycle = Lifecycle(store, [WebhookHook(store, _settings(), lambda *_: None)])
    job, _ = lifecycle.submit(JobCreate(source="file:///m", webhook_url=f"{receiver}/gone"), tenant="default", prefix="")
    ended = lifecycle.cancel(job.id)
    delivery = store.deliveries(job.id)[0]
    store.delete(ended, keep_deliveries_seconds=60)
    assert deliver_once(store, _settings(), job.id, delivery.id) is None
    assert [json.loads(s["body"])["type"] for s in _Receiver.seen] == ["job.cancelled"]
    assert 0 < store.client.ttl(store._deliveries_key(job.id)) <= 60


@pytest.mark.parametrize(
    ("hook", "problem"),
    [
        ({"url": "ftp://hooks.example/x", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}, "http:// or https://"),
        ({"url": "https://hooks.example/x", "secret": "whsec_not base64!"}, "base64 key bytes"),
        ({"url": "https://hooks.example/x", "secret": "whsec_"}, "base64 key bytes"),
    ],
)
def test_a_tenant_webhook_the_service_could_not_use_stops_the_start(hook: dict, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem) as refused:
        Settings(_env_file=None, tenant_webhooks={"team-a": hook})
    assert "not base64!" not in str(refused.value), "the secret stays out of the message"
