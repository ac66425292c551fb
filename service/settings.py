"""Service configuration from environment variables (prefix ``LOFTQ_``), shared by API and worker."""

from __future__ import annotations

import ipaddress
import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.models import DEFAULT_WEBHOOK_EVENTS, WebhookEvent
from service.tenants import parse_api_keys
from service.webhooks import check_secret, check_webhook_url


class TenantWebhook(BaseModel):
    """A webhook the operator configures for every job of one tenant."""

    model_config = ConfigDict(extra="forbid")

    url: str
    secret: SecretStr = Field(description="Signs the deliveries (Standard Webhooks: whsec_ and base64 key bytes).")
    events: list[WebhookEvent] = Field(default_factory=lambda: list(DEFAULT_WEBHOOK_EVENTS), min_length=1)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_webhook_url(value)

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: SecretStr) -> SecretStr:
        check_secret(value.get_secret_value())  # a bad one would fail every delivery, not the start
        return value


class Settings(BaseSettings):
    # hide_input_in_errors: a plain API key pasted into LOFTQ_API_KEYS must not reach the log.
    model_config = SettingsConfigDict(env_prefix="LOFTQ_", env_file=None, extra="ignore", hide_input_in_errors=True)

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Job store and Celery broker.")
    queue: str = Field("loftq", description="Celery queue the GPU workers consume.")
    webhook_queue: str = Field("", description="Celery queue the webhook workers consume (default: <queue>-webhooks).")

    storage: Literal["local", "s3"] = Field("local", description="Where artifacts go.")
    local_storage_root: Path = Field(Path("./loftq-data/artifacts"), description="Artifact root for storage=local.")
    s3_bucket: str = Field("loftq-artifacts", description="Artifact bucket for storage=s3.")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto); AWS when unset.")
    s3_region: str = Field("us-east-1")
    presign_expiry_seconds: int = Field(900, ge=1, le=7 * 24 * 3600, description="Lifetime of presigned download URLs.")
    s3_max_attempts: int = Field(
        5,
        ge=1,
        le=20,
        description=(
            "Attempts per S3 request, the first included: 5xx errors, throttling (SlowDown) and connection errors or "
            "resets are retried with jittered exponential backoff; once they are spent a job fails with "
            "storage_unavailable (the API answers 503)."
        ),
    )
    s3_retry_mode: Literal["standard", "adaptive"] = Field(
        "standard", description="botocore retry mode; adaptive also slows this client's request rate while throttled."
    )

    allowed_file_roots: list[Path] = Field(
        default_factory=list,
        description="Directories file:// sources may read at all; LOFTQ_TENANT_SOURCES says which of them each tenant may.",
    )
    tenant_sources: Annotated[dict[str, list[str]] | None, NoDecode] = Field(
        None,
        description=(
            "What each tenant may read as a source or calibration data, as a JSON object tenant -> list of URI prefixes: "
            "s3:// (any bucket), s3://bucket/ or s3://bucket/prefix/; file:// (any allowed root) or file:///dir/; hf:// "
            "(any Hub repository), hf://org/ or hf://org/name. The key \"*\" holds the list of tenants without an entry. "
            "Every tenant may also read its own uploads (upload://, POST /v1/uploads) and, in the artifact bucket, its own "
            "area; nobody may read another tenant's area or the service's own files, whatever this says. Unset: the tenant "
            "'default' (the open API's, without LOFTQ_API_KEYS) may read s3://, file:// and hf://, every other tenant only its "
            "own data. Set the same value for the API and the workers (docs/adr/0007-access.md)."
        ),
    )
    hf_tokens: Annotated[dict[str, SecretStr], NoDecode] = Field(
        default_factory=dict,
        description=(
            "Hugging Face Hub tokens per tenant, a JSON object tenant -> token. A tenant without one reads the Hub "
            "anonymously: the worker's own token (HF_TOKEN, a cached login) is never used for a job."
        ),
    )
    data_dir: Path | None = Field(
        None,
        description=(
            "The service's own state directory (job store files, artifacts, scratch; `loftq-service serve` sets it). "
            "Like local_storage_root and work_dir it is never readable as a file:// source, even under an allowed root."
        ),
    )
    upload_url_expiry_seconds: int = Field(
        6 * 3600, ge=60, le=7 * 24 * 3600, description="Lifetime of the upload URLs POST /v1/uploads hands out."
    )
    upload_part_bytes: int = Field(
        64 * 2**20,
        ge=5 * 2**20,
        le=5 * 2**30,
        description="S3 uploads: files above this size are uploaded in parts of this size (a presigned URL each).",
    )
    work_dir: Path = Field(Path("./loftq-data/work"), description="Worker scratch space (one source shard at a time).")
    max_model_bytes: int = Field(200 * 2**30, ge=1, description="Largest source checkpoint accepted.")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="Largest request body the API reads (413 above).")
    # Slow clients (api/server.py): reading a request is bounded in time, writing a response
    # (an event stream, a download) is not.
    request_header_timeout_seconds: float = Field(
        10,
        gt=0,
        le=300,
        description=(
            "Seconds a connection may take to send a request line and headers, counted from the connection (or the "
            "end of the previous response on it); then it is closed (408 request_timeout if it had sent part of them)."
        ),
    )
    request_body_timeout_seconds: float = Field(
        30,
        gt=0,
        le=3600,
        description=(
            "Seconds the whole request body may take to arrive once the headers are in; then 408 request_timeout "
            "and the connection is closed. A file streamed to PUT /v1/uploads/{id}/files/... may take longer, as long "
            "as no piece of it takes more than this."
        ),
    )
    keep_alive_timeout_seconds: float = Field(
        5,
        gt=0,
        le=300,
        description=(
            "Seconds an idle keep-alive connection stays open waiting for the next request (at most "
            "request_header_timeout_seconds in effect: that deadline also runs from the end of each response)."
        ),
    )
    max_connections: int = Field(
        1200,
        ge=1,
        description=(
            "Connections (or requests in progress) one API process serves at once, open event streams included (keep "
            "it above max_event_streams); a request beyond it is answered 503 overloaded with Retry-After at once "
            "(uvicorn's limit_concurrency)."
        ),
    )
    max_header_bytes: int = Field(
        16384,
        ge=1024,
        le=1 << 20,
        description="Largest request line plus headers (uvicorn's h11_max_incomplete_event_size); a larger one is 400.",
    )
    submissions_per_minute: int = Field(120, ge=1, description="New jobs one tenant may submit per minute (429 above).")
    max_queued_jobs_per_tenant: int = Field(1000, ge=1, description="Jobs one tenant may have queued at once (429 above).")
    max_event_streams_per_tenant: int = Field(
        100,
        ge=1,
        description=(
            "Event streams (GET /v1/jobs/{id}/events/stream) one tenant may hold open at once, counted per API process "
            "(429 too_many_streams above)."
        ),
    )
    max_event_streams: int = Field(
        1000,
        ge=1,
        description=(
            "Event streams one API process holds open at once, all tenants together (429 too_many_streams above); each "
            "holds a socket, so the API raises its open-file limit to fit."
        ),
    )
    event_heartbeat_seconds: float = Field(
        15,
        gt=0,
        le=300,
        description="An event stream sends a `: heartbeat` comment after this long without events (below proxies' idle timeouts).",
    )
    calibration_max_bytes: int = Field(
        2**30, ge=1, description="Most calibration text one job may read (all its .txt/.jsonl files together)."
    )

    job_retention_seconds: int = Field(
        30 * 24 * 3600,
        ge=1,
        description=(
            "How long a finished job is kept: its record, events and webhook deliveries expire then, and the sweeper "
            "removes its artifacts at its next pass (DELETE /v1/jobs/{id} removes them at once)."
        ),
    )
    job_timeout_seconds: int = Field(6 * 3600, ge=60, description="Longest job; the broker's visibility timeout is above it.")
    lease_seconds: int = Field(60, ge=5, description="A worker renews its job lease this often × 3.")
    cancel_grace_seconds: float = Field(
        60,
        gt=0,
        le=300,
        description=(
            "Seconds a job may take to stop by itself once it is cancelled, its job ended elsewhere, or it passed "
            "job_timeout_seconds; then the worker's lease watchdog kills its process (worker/watchdog.py)."
        ),
    )
    max_attempts: int = Field(3, ge=1, description="Deliveries of one job before it fails with worker_lost.")
    sweep_interval_seconds: float = Field(
        30,
        ge=0,
        description=(
            "How often the API looks for running jobs whose worker died (lease expired) and hands them out again; "
            "0 turns the sweeper off."
        ),
    )
    visibility_timeout_seconds: int | None = Field(
        None,
        ge=1,
        description=(
            "Seconds before the broker redelivers an unacknowledged message; unset: job_timeout_seconds + 600. "
            "A shorter one is safe (the lease stops a second run), only wasteful."
        ),
    )
    device: str = Field("auto", description="Worker compute device: auto, cpu, cuda, cuda:N.")
    torch_threads: int | None = Field(
        None,
        ge=1,
        description=(
            "CPU threads torch may use in one worker process (torch.set_num_threads); unset keeps torch's default "
            "(the machine's cores). Set it when several CPU workers share a machine, e.g. 1 per worker per core."
        ),
    )
    worker_memory_limit_bytes: int | None = Field(
        None,
        ge=0,
        description=(
            "Address space one job may add to its worker process once the engine is loaded (RLIMIT_AS in the pool "
            "child, worker/limits.py): above it allocations fail and the job ends out_of_memory, so one job cannot "
            "exhaust a shared host. Unset: three quarters of the worker's memory (the host's, or its cgroup's limit "
            "when lower); set it per worker when several share a host. 0 or 'off': no limit. CPU workers only; run "
            "them with MALLOC_ARENA_MAX=2."
        ),
    )
    public_url: str | None = Field(None, description="Base URL clients reach the API at (for download links).")

    webhook_allowed_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Networks (CIDR, JSON list or comma-separated) webhooks may reach although they are loopback, private, "
            "link-local or otherwise not public; every other such address is refused at submission and before each "
            "delivery. The embedded default allows loopback (127.0.0.0/8, ::1)."
        ),
    )
    tenant_webhooks: Annotated[dict[str, TenantWebhook], NoDecode] = Field(
        default_factory=dict,
        description=(
            'Webhooks per tenant, as a JSON object tenant -> {"url": ..., "secret": "whsec_...", "events": [...]}: '
            "every job of the tenant reports there as well as to its own webhook_url. events defaults to every change "
            "of state."
        ),
    )
    webhook_timeout_seconds: float = Field(10, gt=0, le=60, description="Seconds one delivery attempt may take.")
    webhook_retry_seconds: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [5, 30, 120, 600, 1800, 3600],
        description=(
            "Waits before each retry of a delivery that failed (no answer, or not 2xx); when they are spent the "
            "delivery is failed. JSON list or comma-separated seconds."
        ),
    )
    webhook_progress_interval_seconds: float = Field(
        30, ge=0, description="At most one job.progress webhook per job in this many seconds."
    )

    api_keys: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description=(
            "API keys as tenant:sha256hex entries (JSON list or comma-separated; `loftq-service hash-key TENANT` "
            "makes one). Held as {sha256: tenant}, never the key itself. Empty: the API is open, one tenant 'default'."
        ),
    )

    @field_validator("tenant_sources", "hf_tokens", "tenant_webhooks", mode="before")
    @classmethod
    def _json_object(cls, value: object) -> object:
        """A JSON object in the environment; already-parsed values (a copied Settings) pass."""
        if isinstance(value, str):
            value = json.loads(value) if value.strip() else None
        return value

    @model_validator(mode="after")
    def _webhook_queue(self) -> Settings:
        if not self.webhook_queue:
            self.webhook_queue = f"{self.queue}-webhooks"
        return self

    @field_validator("webhook_allowed_networks", "webhook_retry_seconds", mode="before")
    @classmethod
    def _list(cls, value: object) -> object:
        """A JSON list or comma-separated values in the environment."""
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            ipaddress.ip_network(network, strict=False)  # ValueError names the bad entry
        return value

    @field_validator("webhook_retry_seconds")
    @classmethod
    def _retries(cls, value: list[float]) -> list[float]:
        if len(value) > 20 or any(not 0 <= wait <= 24 * 3600 for wait in value):
            raise ValueError("webhook_retry_seconds: at most 20 waits, each 0 to 86400 seconds")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, value: object) -> dict[str, str]:
        return parse_api_keys(value)

    @field_validator("worker_memory_limit_bytes", mode="before")
    @classmethod
    def _memory_limit_off(cls, value: object) -> object:
        """'off' turns the default limit off, like 0."""
        return 0 if isinstance(value, str) and value.strip().lower() == "off" else value

    @field_validator("worker_memory_limit_bytes")
    @classmethod
    def _memory_limit_size(cls, value: int | None) -> int | None:
        """A limit under 1 MiB is a typo: every job would fail."""
        if value and value < 1 << 20:
            raise ValueError("worker_memory_limit_bytes must be at least 1 MiB (1048576), or 0/off for no limit")
        return value


@lru_cache
def get_settings() -> Settings:
    return Settings()
