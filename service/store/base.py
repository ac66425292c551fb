"""The job store's ground floor: the Redis client, the key layout and the record codec.

Layout (``p`` = prefix):

* ``p job:{id}``   hash: ``job`` (the Job as JSON, without progress/attempts), ``progress`` (JSON),
  ``attempts`` (int), ``cancel`` ("1" once cancellation was asked). Progress and attempts live in
  their own fields so the per-layer progress write and the attempt counter are single atomic
  commands that never rewrite (and never race with) the state.
* ``p events:{id}`` stream of events (``type``, ``time``, ``data`` as JSON).
* ``p lease:{id}``  the worker that owns the job (``SET NX EX``).
* ``p idx:all``, ``p idx:state:{state}``, ``p idx:tenant:{tenant}``,
  ``p idx:tenant:{tenant}:state:{state}``: sorted sets of job ids, all scores 0, so members sort
  by id; ids are time-sortable, so a reverse lex range is "newest first" and an id is a cursor.
* ``p parts:{id}`` (distributed jobs) hash: part number → JSON list of the weight shards it
  converts; ``p parts:{id}:done`` hash: part number → JSON of who finished it (Celery worker
  name, lease owner, seconds); ``p parts:{id}:attempts`` hash: deliveries per part (and of
  the merge, field ``merge``). Part leases are ``p lease:{id}:part:{n}``. Finishing a part
  and "was it the last one?" is one script, so exactly one worker sends the merge.
* ``p idx:expires``: finished jobs (member ``"{id} {tenant}"``, score = unix time their keys
  expire) so index entries can be pruned once the records expire.

State changes are check-and-set under WATCH/MULTI; the per-state indexes change in the same
transaction as the record, so counts and filtered lists never disagree with ``get``.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import redis
from redis.commands.core import Script

from loftq.options import STORED
from service.models import ErrorInfo, Job, JobState

EVENTS_MAXLEN = 10_000


def now() -> datetime:
    return datetime.now(timezone.utc)


class StoreBase:
    """What every part of the job store shares: one client, one key prefix, one retention."""

    def __init__(self, client: redis.Redis, *, retention_seconds: int = 30 * 24 * 3600, prefix: str = "loftq:") -> None:
        self.client = client
        self.retention_seconds = retention_seconds
        self.prefix = prefix
        self.url: str | None = None  # the server's URL when made by from_url
        self._scripts: dict[str, Script] = {}

    def _script(self, source: str) -> Script:
        """A Lua script, registered once per store: compare-and-act steps must be atomic."""
        if source not in self._scripts:
            self._scripts[source] = self.client.register_script(source)
        return self._scripts[source]

    # -- keys ---------------------------------------------------------------------------------

    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _events_key(self, job_id: str) -> str:
        return f"{self.prefix}events:{job_id}"

    def _lease_key(self, job_id: str) -> str:
        return f"{self.prefix}lease:{job_id}"

    def _parts_keys(self, job_id: str) -> tuple[str, str, str]:
        """The part set, the finished parts and the attempts per part of a distributed job."""
        key = f"{self.prefix}parts:{job_id}"
        return key, f"{key}:done", f"{key}:attempts"

    def _index_key(self, state: JobState | None = None, tenant: str | None = None) -> str:
        key = f"{self.prefix}idx"
        if tenant is not None:
            key += f":tenant:{tenant}"
        if state is not None:
            key += f":state:{JobState(state).value}"
        if tenant is None and state is None:
            key += ":all"
        return key

    @property
    def _expires_key(self) -> str:
        return f"{self.prefix}idx:expires"

    def _deliveries_key(self, job_id: str) -> str:
        return f"{self.prefix}webhooks:{job_id}"

    def _job_keys(self, job_id: str) -> list[str]:
        """Every key that belongs to one job (its record, events, parts and webhook deliveries)."""
        return [self._job_key(job_id), self._events_key(job_id), *self._parts_keys(job_id), self._deliveries_key(job_id)]

    # -- health -------------------------------------------------------------------------------

    def ping(self) -> bool:
        """Readiness probe: never raises, so /healthz can report instead of crash."""
        try:
            return bool(self.client.ping())
        except (redis.RedisError, OSError):
            return False

    # -- codec --------------------------------------------------------------------------------

    @staticmethod
    def _decode(fields: dict[str, str]) -> Job | None:
        if not fields or "job" not in fields:
            return None
        data = json.loads(fields["job"])
        data["progress"] = json.loads(fields["progress"]) if "progress" in fields else {}
        data["attempts"] = int(fields.get("attempts", 0))
        return Job.model_validate(data, context=STORED)  # stays readable when checks are added; the worker re-checks

    @staticmethod
    def _encode(job: Job) -> str:
        data = job.model_dump(mode="json", exclude={"progress", "attempts", "webhook_secret"})
        data["inputs"] = job.inputs.model_dump(mode="json") if job.inputs is not None else None  # not in the API's view
        return json.dumps(data)

    def _state_event(self, job: Job, error: ErrorInfo | None = None) -> dict[str, str]:
        data: dict = {"state": job.state.value}
        if error is not None:
            data["error"] = error.model_dump()
        return self._event_fields("state", data)

    @staticmethod
    def _event_fields(type: str, data: dict) -> dict[str, str]:
        return {"type": type, "time": now().isoformat(), "data": json.dumps(data)}
