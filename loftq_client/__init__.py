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
"""

from loftq_client.client import ApiError, ChecksumMismatch, LoftQClient, LoftQClientError, UnsafeArtifactPath, parse_sse
from loftq_client.models import (
    FINISHED_STATES,
    JOB_STATES,
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
)

__all__ = [
    "FINISHED_STATES",
    "JOB_STATES",
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
    "parse_sse",
]
