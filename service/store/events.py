"""Each job's event stream: state changes, layers, redeliveries, in order, with cursors."""

from __future__ import annotations

import builtins
import json
from collections.abc import Iterable
from datetime import datetime

from service.errors import JobNotFound
from service.models import Event, EventPage
from service.store.base import EVENTS_MAXLEN, StoreBase


class Events(StoreBase):
    """A Redis stream per job; ids are cursors clients resume from."""

    def add_event(self, job_id: str, type: str, data: dict) -> str:
        if not self.client.exists(self._job_key(job_id)):
            raise JobNotFound(f"job {job_id} not found")
        return self.client.xadd(
            self._events_key(job_id), self._event_fields(type, data), maxlen=EVENTS_MAXLEN, approximate=True
        )

    @staticmethod
    def _parse(entries: Iterable[tuple[str, dict[str, str]]]) -> builtins.list[Event]:
        return [
            Event(id=entry_id, type=f["type"], time=datetime.fromisoformat(f["time"]), data=json.loads(f["data"]))
            for entry_id, f in entries
        ]

    def events(self, job_id: str, *, after: str | None = None, limit: int = 1000) -> EventPage:
        """Events strictly after the cursor ``after``; ``next_after`` is the cursor to pass next
        (unchanged when there was nothing new)."""
        if not self.client.exists(self._job_key(job_id)):
            raise JobNotFound(f"job {job_id} not found")
        low = f"({after}" if after else "-"
        events = self._parse(self.client.xrange(self._events_key(job_id), low, "+", count=max(1, limit)))
        return EventPage(events=events, next_after=events[-1].id if events else after)

    def wait_events(self, job_id: str, *, after: str | None, timeout_ms: int) -> builtins.list[Event]:
        """Events after ``after`` (None: from the start), blocking up to ``timeout_ms`` when there
        are none yet; [] on timeout. Pass the last id seen so no event is missed between calls."""
        streams = {self._events_key(job_id): after or "0-0"}
        block = timeout_ms if timeout_ms > 0 else None  # BLOCK 0 would wait forever
        reply = self.client.xread(streams, count=1000, block=block)
        if not reply:
            return []
        # RESP2 gives [[key, entries]], RESP3 gives {key: [entries]}.
        entries = next(iter(reply.values()))[0] if isinstance(reply, dict) else reply[0][1]
        return self._parse(entries)
