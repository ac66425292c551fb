"""Python client (SDK) and ``loftq-jobs`` command line for the LoftQ jobs API.

Standalone: needs only httpx and pydantic (rich for progress bars, typer for the CLI); it never
imports torch, the conversion engine or the server package.

    from loftq_client import LoftQClient

    with LoftQClient("http://127.0.0.1:8000", api_key="...") as client:
        job = client.create_job("s3://models/llama-3-8b/", rank=16, quant="nf4")
        job = client.wait(job.id)
        if job.state == "succeeded":
            client.download(job.id, "out/")

        # Calibrated LoftQ: fit in the metric of real activations, measure held-out quality.
        job = client.create_job("s3://models/llama-3-8b/", calibration_data="s3://datasets/calib.txt",
                                objective="activation", calibration={"samples": 128, "evaluate": True})
        print(client.wait(job.id).summary.evaluation)

        # Webhooks: the signing secret is in this answer only; keep it to verify webhook-signature.
        job = client.create_job("s3://models/llama-3-8b/", webhook_url="https://hooks.example.com/loftq",
                                webhook_events=["job.succeeded", "job.failed"])
        secret = job.webhook_secret
        print([(d.event, d.state, d.last_status) for d in client.webhook_deliveries(job.id)])

        # Remove a job and its artifacts (a running one is cancelled first, then removed).
        if client.delete_job(job.id) is not None:
            client.wait_deleted(job.id, timeout=600)
"""

from loftq_client.client import ApiError, ChecksumMismatch, LoftQClient, LoftQClientError, UnsafeArtifactPath, parse_sse
from loftq_client.models import (
    DEFAULT_WEBHOOK_EVENTS,
    FINISHED_STATES,
    JOB_STATES,
    WEBHOOK_EVENTS,
    Artifact,
    ArtifactList,
    Calibration,
    ErrorInfo,
    Evaluation,
    Event,
    EventPage,
    Job,
    JobPage,
    JobRequest,
    JobSummary,
    ModelRefinement,
    Progress,
    Refinement,
    Upload,
    WebhookDelivery,
    WebhookDeliveryList,
)

__all__ = [
    "DEFAULT_WEBHOOK_EVENTS",
    "FINISHED_STATES",
    "JOB_STATES",
    "WEBHOOK_EVENTS",
    "ApiError",
    "Artifact",
    "ArtifactList",
    "Calibration",
    "ChecksumMismatch",
    "ErrorInfo",
    "Evaluation",
    "Event",
    "EventPage",
    "Job",
    "JobPage",
    "JobRequest",
    "JobSummary",
    "LoftQClient",
    "LoftQClientError",
    "ModelRefinement",
    "Progress",
    "Refinement",
    "UnsafeArtifactPath",
    "Upload",
    "WebhookDelivery",
    "WebhookDeliveryList",
    "parse_sse",
]
