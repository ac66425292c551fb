"""Counts and duration histograms that every API replica reads at scrape time (/metrics)."""

from __future__ import annotations

from service.models import JobState
from service.store.records import Records

DURATION_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 12 * 3600.0)


class Metrics(Records):
    """Jobs per state, and job and layer durations written by the workers."""

    def counts_by_state(self) -> dict[str, int]:
        self._prune()
        with self.client.pipeline(transaction=False) as pipe:
            for state in JobState:
                pipe.zcard(self._index_key(state=state))
            counts = pipe.execute()
        return {state.value: int(n) for state, n in zip(JobState, counts)}

    def observe_duration(self, kind: str, seconds: float) -> None:
        """Count ``seconds`` into the shared histogram ``kind`` ("job" or "layer"): workers write,
        every API replica reads the same buckets at scrape time."""
        key = f"{self.prefix}metrics:{kind}_seconds"
        with self.client.pipeline(transaction=True) as pipe:
            for bound in DURATION_BUCKETS:
                if seconds <= bound:
                    pipe.hincrby(key, repr(bound), 1)
            pipe.hincrby(key, "+Inf", 1)
            pipe.hincrbyfloat(key, "sum", seconds)
            pipe.execute()

    def durations(self, kind: str) -> tuple[list[tuple[str, int]], float]:
        """Cumulative ``(upper bound, count)`` buckets ending with "+Inf", and the sum."""
        raw = self.client.hgetall(f"{self.prefix}metrics:{kind}_seconds")
        buckets = [(repr(bound), int(raw.get(repr(bound), 0))) for bound in DURATION_BUCKETS]
        return buckets + [("+Inf", int(raw.get("+Inf", 0)))], float(raw.get("sum", 0.0))
