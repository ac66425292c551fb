"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

from api.deps import ArtifactsDep, QueueDep, StoreDep
from api.schemas import Readiness, error_responses
from service.errors import Unavailable

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up: answered on the event loop, so it needs no thread of the pool the
    sync routes share, and answers however busy they are."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "Something is down."}})
def readyz(store: StoreDep, queue: QueueDep, artifacts: ArtifactsDep) -> JSONResponse:
    """Broker, job store and storage reachable: 200, else 503 naming what is down. A sync
    route on purpose: the checks are blocking calls (with timeouts), kept off the event loop."""
    checks = {"job_store": store.ping(), "broker": queue.ping(), "storage": artifacts.ping()}
    ready = all(checks.values())
    return JSONResponse({"status": "ready" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503)


class _ServiceCollector:
    """Read at scrape time from the shared job store, so every API replica reports the same."""

    def __init__(self, store, queue) -> None:
        self.store, self.queue = store, queue

    def collect(self):
        jobs = GaugeMetricFamily("loftq_jobs", "Jobs by state", labels=["state"])
        for state, count in self.store.counts_by_state().items():
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily("loftq_queue_depth", "Jobs waiting in the broker", value=self.queue.depth())
        for kind, help_text in (("job", "Wall time of finished conversions"), ("layer", "Time to fit one layer")):
            buckets, total = self.store.durations(kind)
            yield HistogramMetricFamily(f"loftq_{kind}_duration_seconds", help_text, buckets=buckets, sum_value=total)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}},
        **error_responses(Unavailable),
    },
)
def metrics(store: StoreDep, queue: QueueDep) -> Response:
    registry = CollectorRegistry()
    registry.register(_ServiceCollector(store, queue))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
