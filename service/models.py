"""Request and response models of the jobs API (pydantic v2); the job record stored in Redis."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic.json_schema import SkipJsonSchema

from loftq.options import ConvertOptions, stored
from service.locations import JobInputs
from service.text import escape_unsafe, unsafe_message

WEBHOOK_EVENTS = ("job.started", "job.progress", "job.succeeded", "job.failed", "job.cancelled")
"""What a webhook can be told, in the order a job goes through them."""
DEFAULT_WEBHOOK_EVENTS = ("job.started", "job.succeeded", "job.failed", "job.cancelled")
"""A webhook without a filter hears of every change of state, not of progress."""
WebhookEvent = Literal["job.started", "job.progress", "job.succeeded", "job.failed", "job.cancelled"]


class JobState(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelling = "cancelling"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled)


# Checked transitions: a finished job never changes state again.
TRANSITIONS: dict[JobState, set[JobState]] = {
    JobState.queued: {JobState.running, JobState.cancelled, JobState.cancelling, JobState.failed},
    JobState.running: {JobState.succeeded, JobState.failed, JobState.cancelling, JobState.queued},
    JobState.cancelling: {JobState.cancelled, JobState.failed, JobState.succeeded},
    JobState.succeeded: set(),
    JobState.failed: set(),
    JobState.cancelled: set(),
}


class JobCreate(BaseModel):
    """Body of ``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    source: str = Field(
        max_length=2048,
        description="s3://bucket/prefix/, file:///path under an allowed root, or hf://org/name[@revision].",
        examples=["s3://models/llama-3-8b/", "file:///models/minilm"],
    )
    output: str | None = Field(
        None,
        max_length=512,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*/?$",
        description="Artifact prefix, e.g. team/llama-3-8b-loftq/ (default: jobs/<id>/, which is reserved).",
    )
    options: ConvertOptions = Field(default_factory=ConvertOptions)
    calibration_data: str | None = Field(
        None,
        max_length=2048,
        description=(
            "Calibration text (.txt, or .jsonl with a \"text\" field): file:///path under an allowed root (a file or a "
            "directory), s3://bucket/key.txt (one object) or s3://bucket/prefix/ (every .txt/.jsonl object under it). "
            "Required when options.objective is not 'weight', options.refine is not 'none' or options.calibration.evaluate "
            "is true."
        ),
        examples=["s3://datasets/wikitext-2/train.txt", "s3://datasets/calibration/"],
    )
    metadata: dict[str, str] = Field(default_factory=dict, description="Small string map kept with the job.")
    distributed: bool = Field(
        False,
        description=(
            "Spread the conversion over several workers: one task per part (shards_per_part consecutive weight "
            "shards), then a merge that writes the adapters, index, report and manifest. The artifacts are "
            "byte-identical to a single-worker job's (loftq_report.json, loftq_layers.png and manifest.json hold "
            "timings). Weight-space jobs only: not with calibration_data, options.objective other than 'weight', "
            "options.refine other than 'none' or options.calibration.evaluate (a calibrated conversion runs the model "
            "block by block in one process)."
        ),
    )
    shards_per_part: int = Field(
        1, ge=1, le=1024, description="With distributed: consecutive weight shards converted by one part task."
    )
    webhook_url: str | None = Field(
        None,
        max_length=2048,
        description=(
            "Where to POST the job's events (http:// or https://), signed as Standard Webhooks specifies "
            "(webhook-id, webhook-timestamp, webhook-signature: HMAC-SHA256 with the secret returned once, in "
            "webhook_secret of this request's response). Private, loopback and link-local addresses are refused "
            "unless the operator allows them (LOFTQ_WEBHOOK_ALLOWED_NETWORKS)."
        ),
        examples=["https://hooks.example.com/loftq"],
    )
    webhook_events_filter: list[WebhookEvent] | None = Field(
        None,
        min_length=1,
        max_length=len(WEBHOOK_EVENTS),
        description="Which events to send (default: every change of state; job.progress only when listed, throttled).",
    )

    @field_validator("output", mode="before")
    @classmethod
    def _no_unsafe_characters(cls, value: object, info: ValidationInfo) -> object:
        """Before the pattern, so the message names the character (a bidi override, say)."""
        problem = unsafe_message(value) if isinstance(value, str) and not stored(info) else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("output")
    @classmethod
    def _not_reserved(cls, value: str | None, info: ValidationInfo) -> str | None:
        top = value.split("/", 1)[0] if value is not None and not stored(info) else None
        if top == "jobs":
            raise ValueError("the jobs/ prefix is reserved for jobs without an output prefix")
        if top == "inputs":
            raise ValueError("the inputs/ prefix is reserved for uploads (POST /v1/uploads)")
        return value

    @field_validator("distributed")
    @classmethod
    def _weight_space_only(cls, value: bool, info: ValidationInfo) -> bool:
        """Refused at POST (422) instead of a job failing later: parts cannot share a calibration pass."""
        if not value:
            return value
        options, calibration_data = info.data.get("options"), info.data.get("calibration_data")
        if calibration_data is not None:
            raise ValueError("a distributed job cannot use calibration_data (calibrated conversions run in one process)")
        if options is not None and options.objective != "weight":
            raise ValueError(f"a distributed job needs options.objective='weight', not {options.objective!r}")
        if options is not None and options.refine != "none":
            raise ValueError(f"a distributed job needs options.refine='none', not {options.refine!r}")
        if options is not None and options.calibration.evaluate:
            raise ValueError("a distributed job cannot use options.calibration.evaluate")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        """The URL's form; whether its address may be reached is decided at submission and again
        before every delivery (service/webhooks.py), against the operator's allowed networks."""
        if value is None or stored(info):
            return value
        from service.webhooks import check_webhook_url

        return check_webhook_url(value)

    @field_validator("webhook_events_filter")
    @classmethod
    def _events_filter(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else sorted(set(value), key=WEBHOOK_EVENTS.index)

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        if stored(info):
            return value
        if len(value) > 32 or any(len(k) > 64 or len(v) > 512 for k, v in value.items()):
            raise ValueError("metadata is limited to 32 entries, keys ≤ 64 and values ≤ 512 characters")
        for key, text in value.items():
            problem = unsafe_message(key)
            if problem:
                raise ValueError(f"key '{escape_unsafe(key)}' {problem}")
            problem = unsafe_message(text)
            if problem:
                raise ValueError(f"the value of '{escape_unsafe(key)}' {problem}")
        return value


class ErrorInfo(BaseModel):
    code: str
    message: str


class Progress(BaseModel):
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


class EvaluationSummary(BaseModel):
    """Held-out quality (``loftq.report.Evaluation``): the full-precision, plainly quantized and
    initialised models on calibration sequences never used for fitting. Numbers are optional
    because a degenerate measurement (NaN, inf) is stored as null."""

    sequences: int
    tokens: int
    cosine_quantized: float | None = None
    cosine_initialised: float | None = None
    perplexity_full_precision: float | None = None
    perplexity_quantized: float | None = None
    perplexity_initialised: float | None = None
    gap_recovered: float | None = None


class CalibrationSummary(BaseModel):
    """What the activation statistics were computed from (``loftq.report.Calibration``)."""

    sha256: str
    documents: int
    sequences: int
    tokens: int
    seq_len: int
    packed: bool
    propagation: str
    blocks: int


class ModelRefinementSummary(BaseModel):
    """The model stage of refinement (``loftq.report.ModelRefinement``): the held-out loss (``loss``:
    "kl" for decoders, "hidden-mse" for encoders) before and after, and whether it was kept."""

    loss: str
    heldout_before: float | None = None
    heldout_after: float | None = None
    accepted: bool
    steps: int = 0
    seconds: float | None = None


class RefinementSummary(BaseModel):
    """What refinement did (``loftq.report.Refinement``): how many blocks kept their refined
    adapters, their mean held-out gain (rejected blocks count 0) and the model stage."""

    mode: str
    blocks_total: int = 0
    blocks_accepted: int = 0
    blocks_rejected: int = 0
    mean_block_gain: float | None = None
    heldout_sequences: int = 0
    seconds: float | None = None
    model: ModelRefinementSummary | None = None


class JobSummary(BaseModel):
    layers: int
    mean_error_quant: float
    mean_error: float
    seconds: float
    objective: str = "weight"
    mean_objective_error_quant: float | None = None  # the objective's metric (= the weight errors for "weight")
    mean_objective_error: float | None = None
    # Calibrated jobs: ‖(W − ·)·H^½‖/‖W·H^½‖ with the full H of each layer's inputs, whatever the objective.
    mean_output_error_quant: float | None = None
    mean_output_error: float | None = None
    evaluation: EvaluationSummary | None = None
    calibration: CalibrationSummary | None = None
    refinement: RefinementSummary | None = None


class Artifact(BaseModel):
    path: str
    size: int
    sha256: str
    url: str | None = None


class Job(BaseModel):
    """A job as stored and as returned by ``GET /v1/jobs/{id}``."""

    id: str
    state: JobState
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    request: JobCreate
    output: str
    progress: Progress = Field(default_factory=Progress)
    error: ErrorInfo | None = None
    summary: JobSummary | None = None
    attempts: int = 0
    tenant: str = "default"
    # The URIs as parsed at submission, for the worker; never shown (a file:// path has its links
    # resolved, which would tell a caller where links on the server lead). The store writes it.
    inputs: SkipJsonSchema[JobInputs | None] = Field(None, exclude=True)
    webhook_secret: str | None = Field(
        None,
        description="The secret that signs this job's webhooks: in the response to POST /v1/jobs only, never again.",
    )


class JobPage(BaseModel):
    jobs: list[Job]
    has_more: bool
    next_after: str | None = None


class Event(BaseModel):
    id: str  # stream cursor, pass as ``after=``
    type: str  # "state", "layer", "progress" or "redelivered" (the sweeper sent lost work again)
    time: datetime
    data: dict


class EventPage(BaseModel):
    events: list[Event]
    next_after: str | None = None


class ArtifactList(BaseModel):
    job_id: str
    artifacts: list[Artifact]


class WebhookDelivery(BaseModel):
    """One event sent (or being sent) to one webhook: retried with backoff until it is answered
    2xx or the attempts run out. ``id`` is the webhook-id header, the same on every attempt."""

    id: str
    event: WebhookEvent
    target: Literal["job", "tenant"]
    url: str
    state: Literal["pending", "delivered", "failed"] = "pending"
    attempts: int = 0
    created_at: datetime
    last_attempt_at: datetime | None = None
    last_status: int | None = None
    last_error: str | None = None
    delivered_at: datetime | None = None


class WebhookDeliveryList(BaseModel):
    job_id: str
    deliveries: list[WebhookDelivery]

