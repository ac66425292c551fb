"""The parts of distributed jobs: the plan, which parts are done, and deliveries per part."""

from __future__ import annotations

import builtins
import json

from service.errors import JobNotFound
from service.store.base import StoreBase

MERGE = "merge"  # the attempts field of a distributed job's merge

# KEYS[1] job, KEYS[2] parts; ARGV[1] ttl, then part number, shards JSON, ...
# Records the part set once (a redelivered RUN_JOB gets the first plan back).
_INIT_PARTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 2))
  redis.call('EXPIRE', KEYS[2], ARGV[1])
end
return redis.call('HGETALL', KEYS[2])
"""
# KEYS[1] parts, KEYS[2] done; ARGV: part, record, ttl. -1 unknown part, 0 finished before,
# 1 finished now, 2 finished now and it was the last one (exactly one caller sees 2).
_FINISH_PART = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return -1 end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('EXPIRE', KEYS[2], ARGV[3])
if redis.call('HLEN', KEYS[2]) == redis.call('HLEN', KEYS[1]) then return 2 end
return 1
"""
_HINCR_TTL = """
local count = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return count
"""

class Parts(StoreBase):
    """Exactly one worker sees "that was the last part" and sends the merge."""

    def init_parts(self, job_id: str, parts: builtins.list[builtins.list[str]]) -> dict[int, builtins.list[str]]:
        """Record the job's parts (part number → shards) unless they were recorded before, and
        return what is recorded: a redelivered planning step keeps the first plan."""
        if not parts:
            raise ValueError("a distributed job needs at least one part")
        args: builtins.list = [self.retention_seconds]
        for number, shards in enumerate(parts):
            args += [number, json.dumps(shards)]
        reply = self._script(_INIT_PARTS)(keys=[self._job_key(job_id), self._parts_keys(job_id)[0]], args=args)
        if reply is None:
            raise JobNotFound(f"job {job_id} not found")
        pairs = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2])  # RESP3 / RESP2
        return self._numbered(dict(pairs))

    @staticmethod
    def _numbered(raw: dict[str, str]) -> dict:
        return {int(number): json.loads(value) for number, value in sorted(raw.items(), key=lambda p: int(p[0]))}

    def parts(self, job_id: str) -> dict[int, builtins.list[str]]:
        """Part number → shards; {} for a job that was never split."""
        return self._numbered(self.client.hgetall(self._parts_keys(job_id)[0]))

    def parts_done(self, job_id: str) -> dict[int, dict]:
        """Finished part number → what ``finish_part`` recorded about it."""
        return self._numbered(self.client.hgetall(self._parts_keys(job_id)[1]))

    def finish_part(self, job_id: str, part: int, record: dict) -> bool:
        """Mark ``part`` finished (the first call wins; ``record`` says who did it). True for
        exactly one call per job: the one that finished the last part, which sends the merge."""
        parts_key, done_key, _ = self._parts_keys(job_id)
        result = int(self._script(_FINISH_PART)(keys=[parts_key, done_key], args=[part, json.dumps(record), self.retention_seconds]))
        if result < 0:
            raise JobNotFound(f"job {job_id} has no part {part}")
        return result == 2

    def increment_part_attempts(self, job_id: str, part: int | str) -> int:
        """Deliveries of one part (or of the merge, ``part=MERGE``) so far, this one included."""
        return int(self._script(_HINCR_TTL)(keys=[self._parts_keys(job_id)[2]], args=[part, self.retention_seconds]))

    def part_attempts(self, job_id: str) -> dict[str, int]:
        """Deliveries so far of each part (keys "0", "1", ...) and of the merge (``MERGE``)."""
        return {name: int(count) for name, count in self.client.hgetall(self._parts_keys(job_id)[2]).items()}
