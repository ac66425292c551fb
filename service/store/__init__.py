"""The job store: one Redis database shared by the API, the workers and the sweeper.

Split by concern, one file each, over one client and one key layout (base.py documents it):
records and their indexes (records.py), admission (admission.py), event streams (events.py),
leases (leases.py), parts of distributed jobs (parts.py), metrics (metrics.py) and webhook
deliveries (deliveries.py). Which state a job moves to is service/lifecycle.py's to decide;
the store only writes it atomically.
"""

from __future__ import annotations

import redis

from service.store.admission import Admission
from service.store.deliveries import Deliveries
from service.store.events import Events
from service.store.leases import Leases
from service.store.metrics import DURATION_BUCKETS, Metrics
from service.store.parts import MERGE, Parts
from service.store.records import Decide, NotLeaseHolder, new_job_id

__all__ = ["DURATION_BUCKETS", "MERGE", "Decide", "JobStore", "NotLeaseHolder", "new_job_id"]


class JobStore(Admission, Metrics, Events, Leases, Parts, Deliveries):
    """Jobs, their events, leases, parts, deliveries and counters in one Redis database."""

    @classmethod
    def from_url(cls, url: str, **kwargs) -> JobStore:
        """``retention_seconds`` and ``prefix`` go to the store, other kwargs to the client. The
        read timeout (30 s) stays above the longest blocking XREAD of ``wait_events`` callers
        (the SSE heartbeat, 15 s); redis-py's own default (5 s) would cut those short."""
        store_kwargs = {k: kwargs.pop(k) for k in ("retention_seconds", "prefix") if k in kwargs}
        client_kwargs = {"socket_connect_timeout": 5, "socket_timeout": 30, "health_check_interval": 30, **kwargs, "decode_responses": True}
        store = cls(redis.Redis.from_url(url, **client_kwargs), **store_kwargs)
        store.url = url  # a worker's lease watchdog (worker/watchdog.py) opens the same store from it
        return store
