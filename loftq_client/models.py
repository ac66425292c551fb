"""Response models of the jobs API, as the client sees them.

These mirror ``service/models.py`` but are deliberately standalone (no server or engine imports) and
lenient: every model accepts unknown fields (``extra="allow"``) and ``state`` / ``type`` are plain
strings, so a newer server that adds fields, states or event types does not break an older client.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: States after which a job never changes again.
FINISHED_STATES = frozenset({"succeeded", "failed", "cancelled"})
#: Every state the API documents (a newer server may add more).
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelling", "cancelled")
#: Events a job's webhook can be sent, in the order a job goes through them (``webhook_events``).
WEBHOOK_EVENTS = ("job.started", "job.progress", "job.succeeded", "job.failed", "job.cancelled")
#: What a webhook without a filter is sent: every change of state, not progress.
DEFAULT_WEBHOOK_EVENTS = ("job.started", "job.succeeded", "job.failed", "job.cancelled")


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorInfo(_Model):
    code: str
    message: str


class Progress(_Model):
    stage: str = "queued"  # queued, downloading, calibrating, converting, uploading, finalizing, done
    layers_done: int = 0
    layers_total: int = 0
    blocks_done: int = 0  # calibrated conversions: transformer blocks fitted so far
    blocks_total: int = 0
    shards_done: int = 0
    shards_total: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    eta_seconds: float | None = None


class Evaluation(_Model):
    """Held-out quality of the full-precision, plainly quantized and initialised models (calibrated
    jobs with ``calibration.evaluate``). Perplexities are set for causal language models;
    ``gap_recovered`` is the share of the quantization's loss the adapters win back."""

    sequences: int = 0
    tokens: int = 0
    cosine_quantized: float | None = None
    cosine_initialised: float | None = None
    perplexity_full_precision: float | None = None
    perplexity_quantized: float | None = None
    perplexity_initialised: float | None = None
    gap_recovered: float | None = None


class Calibration(_Model):
    """What a calibrated job's activation statistics were computed from."""

    sha256: str = ""
    documents: int = 0
    sequences: int = 0
    tokens: int = 0
    seq_len: int = 0
    packed: bool = False
    propagation: str = ""
    blocks: int = 0


class ModelRefinement(_Model):
    """The model stage of a refinement: the held-out ``loss`` ("kl" for decoders, "hidden-mse" for
    encoders) before and after its steps, and whether the result was kept."""

    loss: str = ""
    heldout_before: float | None = None
    heldout_after: float | None = None
    accepted: bool = False
    steps: int = 0
    seconds: float | None = None


class Refinement(_Model):
    """What refinement (``options.refine``) did: blocks that kept their refined adapters, their
    mean held-out gain (rejected blocks count 0) and the model stage when it ran."""

    mode: str = ""
    blocks_total: int = 0
    blocks_accepted: int = 0
    blocks_rejected: int = 0
    mean_block_gain: float | None = None
    heldout_sequences: int = 0
    seconds: float | None = None
    model: ModelRefinement | None = None


class JobSummary(_Model):
    layers: int
    mean_error_quant: float
    mean_error: float
    seconds: float
    objective: str = "weight"
    mean_objective_error_quant: float | None = None
    mean_objective_error: float | None = None
    evaluation: Evaluation | None = None
    calibration: Calibration | None = None
    refinement: Refinement | None = None


class JobRequest(_Model):
    """The request a job was created from (``options`` are the server's engine options)."""

    source: str
    output: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    calibration_data: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    distributed: bool = False
    shards_per_part: int = 1
    webhook_url: str | None = None
    webhook_events_filter: list[str] | None = None  # None: every change of state (DEFAULT_WEBHOOK_EVENTS)


class Job(_Model):
    id: str
    state: str  # queued | running | succeeded | failed | cancelling | cancelled
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    request: JobRequest | None = None
    output: str | None = None
    progress: Progress = Field(default_factory=Progress)
    error: ErrorInfo | None = None
    summary: JobSummary | None = None
    attempts: int = 0
    tenant: str = "default"
    webhook_secret: str | None = None
    """The secret that signs this job's webhooks (``whsec_...``): set in the answer to
    :meth:`LoftQClient.create_job` only, never again (``None`` from every other call)."""

    @property
    def finished(self) -> bool:
        """True once the job is succeeded, failed or cancelled."""
        return self.state in FINISHED_STATES


class JobPage(_Model):
    jobs: list[Job]
    has_more: bool = False
    next_after: str | None = None


class Event(_Model):
    id: str  # stream cursor, pass as ``after=``
    type: str  # "state", "layer", "progress", ...
    time: datetime
    data: dict[str, Any] = Field(default_factory=dict)


class EventPage(_Model):
    events: list[Event]
    next_after: str | None = None


class Artifact(_Model):
    path: str
    size: int
    sha256: str
    url: str | None = None


class ArtifactList(_Model):
    job_id: str
    artifacts: list[Artifact]


class WebhookDelivery(_Model):
    """One event sent (or being sent) to one webhook, retried with backoff until it is answered
    2xx or its attempts run out. ``id`` is the ``webhook-id`` header, the same on every attempt;
    ``target`` is "job" (the job's own ``webhook_url``) or "tenant" (the tenant's webhook)."""

    id: str
    event: str  # job.started | job.progress | job.succeeded | job.failed | job.cancelled
    target: str  # job | tenant
    url: str
    state: str = "pending"  # pending | delivered | failed
    attempts: int = 0
    created_at: datetime
    last_attempt_at: datetime | None = None
    last_status: int | None = None
    last_error: str | None = None
    delivered_at: datetime | None = None


class WebhookDeliveryList(_Model):
    job_id: str
    deliveries: list[WebhookDelivery]


__all__ = [
    "DEFAULT_WEBHOOK_EVENTS",
    "FINISHED_STATES",
    "JOB_STATES",
    "WEBHOOK_EVENTS",
    "Artifact",
    "ArtifactList",
    "Calibration",
    "ErrorInfo",
    "Evaluation",
    "Event",
    "EventPage",
    "Job",
    "JobPage",
    "JobRequest",
    "JobSummary",
    "ModelRefinement",
    "Progress",
    "Refinement",
    "WebhookDelivery",
    "WebhookDeliveryList",
]


class UploadPart(_Model):
    number: int
    size: int
    url: str


class UploadTarget(_Model):
    """Where one file goes: ``url`` (one PUT of the whole file) or ``parts`` (one PUT per part)."""

    path: str
    size: int
    url: str | None = None
    parts: list[UploadPart] | None = None


class Upload(_Model):
    """A model directory (or calibration text) brought into the tenant's own area; ``source``
    (``upload://<id>``) is what a job names once ``state`` is ``complete``."""

    id: str
    state: str
    source: str
    created_at: datetime
    completed_at: datetime | None = None
    urls_expire_at: datetime | None = None
    size: int = 0
    files: list[UploadTarget] = Field(default_factory=list)
