"""Best rank-r approximation of a residual: exact SVD or a seeded randomized SVD.

The randomized solver is written here rather than taken from ``torch.svd_lowrank`` because
the converter needs it reproducible (an explicit generator, not the global RNG) and tuned
for the thin rank-r case (range finder on the smaller side, QR between power steps).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRank:
    """``u @ diag(s) @ vh``: u is m×r, s has r entries, vh is r×n (fp32)."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    def matrix(self) -> torch.Tensor:
        return (self.u * self.s) @ self.vh


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Thin QRs (k ≤ a few hundred columns) are latency-bound: on CPU, splitting them over
    OpenMP threads gains nothing alone and, when another process holds a core, every call
    waits for a descheduled thread at a barrier (measured on 2 cores: a 4096×48 QR took 1.7 ms
    on one thread and 316 ms on two beside a busy process)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _orthonormal(a: torch.Tensor) -> torch.Tensor:
    with _one_cpu_thread(a.device):
        return torch.linalg.qr(a)[0]


def exact_svd(matrix: torch.Tensor, rank: int) -> LowRank:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return LowRank(u[:, :rank], s[:rank], vh[:rank])


def randomized_svd(
    matrix: torch.Tensor,
    rank: int,
    *,
    oversample: int = 32,
    power_iters: int = 8,
    generator: torch.Generator | None = None,
) -> LowRank:
    """Halko–Martinsson–Tropp range finder with subspace iteration.

    Works on the transpose when the matrix is wide so the sketch lives on the short side.
    Falls back to the exact SVD when the sketch would not be smaller than the matrix.
    """
    m, n = matrix.shape
    sketch = rank + oversample
    if sketch >= min(m, n):
        return exact_svd(matrix, rank)
    wide = n > m
    a = matrix.T if wide else matrix  # tall: rows >= cols
    omega = torch.randn(a.shape[1], sketch, generator=generator, device="cpu", dtype=a.dtype).to(a.device)
    basis = _orthonormal(a @ omega)
    for _ in range(power_iters):
        basis = _orthonormal(a.T @ basis)
        basis = _orthonormal(a @ basis)
    u_small, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
    u = basis @ u_small[:, :rank]
    s, vh = s[:rank], vh[:rank]
    if wide:
        return LowRank(vh.T.contiguous(), s, u.T.contiguous())
    return LowRank(u, s, vh)
