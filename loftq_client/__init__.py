"""Python client (SDK) and ``loftq-jobs`` command line for the LoftQ jobs API.

Standalone: needs only httpx and pydantic (rich for progress bars, typer for the CLI); it never
imports torch, the conversion engine or the server package.

    from loftq_client import LoftQClient

    with LoftQClient("http://127.0.0.1:8000", api_key="...") as client:
        job = client.create_job("s3://models/llama-3-8b/", rank=16, quant="nf4")
        job = client.wait(job.id)
        if job.state == "succeeded":
            client.download(job.id, "out/")
"""

from loftq_client.client import ApiError, ChecksumMismatch, LoftQClient, LoftQClientError, UnsafeArtifactPath, parse_sse
from loftq_client.models import (
    FINISHED_STATES,
    JOB_STATES,
    Artifact,
    ArtifactList,
    ErrorInfo,
    Event,
    EventPage,
    Job,
    JobPage,
    JobRequest,
    JobSummary,
    Progress,
)

__all__ = [
    "FINISHED_STATES",
    "JOB_STATES",
    "ApiError",
    "Artifact",
    "ArtifactList",
    "ChecksumMismatch",
    "ErrorInfo",
    "Event",
    "EventPage",
    "Job",
    "JobPage",
    "JobRequest",
    "JobSummary",
    "LoftQClient",
    "LoftQClientError",
    "Progress",
    "UnsafeArtifactPath",
    "parse_sse",
]
