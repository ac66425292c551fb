"""Leases: which worker owns a job (or a part) now, and one-time claims across processes."""

from __future__ import annotations

from service.store.base import StoreBase

# Compare-and-act scripts: the check and the write must be one atomic step.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Leases(StoreBase):
    """``SET NX EX`` leases renewed by their owner only; a lapsed lease means nobody works on it."""

    def acquire_lease(self, job_id: str, owner: str, ttl_seconds: int) -> bool:
        return bool(self.client.set(self._lease_key(job_id), owner, nx=True, ex=ttl_seconds))

    def renew_lease(self, job_id: str, owner: str, ttl_seconds: int) -> bool:
        return bool(self._script(_RENEW)(keys=[self._lease_key(job_id)], args=[owner, ttl_seconds]))

    def release_lease(self, job_id: str, owner: str) -> None:
        self._script(_RELEASE)(keys=[self._lease_key(job_id)], args=[owner])

    def leased(self, job_id: str) -> bool:
        """Whether a live worker holds the lease (``part_lease_id`` for a part's)."""
        return bool(self.client.exists(self._lease_key(job_id)))

    @staticmethod
    def part_lease_id(job_id: str, part: int) -> str:
        """What the lease methods take for one part's lease (key ``lease:{job}:part:{n}``)."""
        return f"{job_id}:part:{part}"

    def claim_once(self, name: str, ttl_seconds: int) -> bool:
        """True for the first caller in ``ttl_seconds`` across every process: one API replica
        sweeps per period, and one lost attempt is handed out once."""
        return bool(self.client.set(f"{self.prefix}once:{name}", "1", nx=True, ex=max(1, int(ttl_seconds))))
