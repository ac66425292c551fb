"""Service configuration from environment variables (prefix ``LOFTQ_``), shared by API and worker."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from api.auth import parse_api_keys


class Settings(BaseSettings):
    # hide_input_in_errors: a plain API key pasted into LOFTQ_API_KEYS must not reach the log.
    model_config = SettingsConfigDict(env_prefix="LOFTQ_", env_file=None, extra="ignore", hide_input_in_errors=True)

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Job store and Celery broker.")
    queue: str = Field("loftq", description="Celery queue the GPU workers consume.")

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

    allowed_file_roots: list[Path] = Field(default_factory=list, description="Directories file:// sources may read.")
    work_dir: Path = Field(Path("./loftq-data/work"), description="Worker scratch space (one source shard at a time).")
    max_model_bytes: int = Field(200 * 2**30, ge=1, description="Largest source checkpoint accepted.")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="Largest request body the API reads (413 above).")
    submissions_per_minute: int = Field(120, ge=1, description="New jobs one tenant may submit per minute (429 above).")
    max_queued_jobs_per_tenant: int = Field(1000, ge=1, description="Jobs one tenant may have queued at once (429 above).")
    calibration_max_bytes: int = Field(
        2**30, ge=1, description="Most calibration text one job may read (all its .txt/.jsonl files together)."
    )

    job_retention_seconds: int = Field(30 * 24 * 3600, ge=60, description="How long finished job records are kept.")
    job_timeout_seconds: int = Field(6 * 3600, ge=60, description="Longest job; the broker's visibility timeout is above it.")
    lease_seconds: int = Field(60, ge=5, description="A worker renews its job lease this often × 3.")
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
        ge=1 << 20,
        description=(
            "Address space one job may add to its worker process once the engine is loaded (RLIMIT_AS in the pool "
            "child, worker/limits.py): above it allocations fail and the job ends out_of_memory, so one job cannot "
            "exhaust a shared host. Unset: no limit. CPU workers only; run them with MALLOC_ARENA_MAX=2."
        ),
    )
    public_url: str | None = Field(None, description="Base URL clients reach the API at (for download links).")

    api_keys: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description=(
            "API keys as tenant:sha256hex entries (JSON list or comma-separated; `loftq-service hash-key TENANT` "
            "makes one). Held as {sha256: tenant}, never the key itself. Empty: the API is open, one tenant 'default'."
        ),
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, value: object) -> dict[str, str]:
        return parse_api_keys(value)


@lru_cache
def get_settings() -> Settings:
    return Settings()
