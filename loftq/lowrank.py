"""Best rank-r approximation of a residual: exact SVD or a seeded randomized SVD.

The randomized solver is written here rather than taken from ``torch.svd_lowrank`` because
the converter needs it reproducible (an explicit generator, not the global RNG) and accurate
on residuals with flat spectra, where ``svd_lowrank``'s subspace iteration is not (block
Krylov, basis on the smaller side).
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


THIN_COLUMNS = 128
"""QRs up to this many columns run on one CPU thread (see ``_one_cpu_thread``)."""


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
    if a.shape[1] > THIN_COLUMNS:
        return torch.linalg.qr(a)[0]
    with _one_cpu_thread(a.device):
        return torch.linalg.qr(a)[0]


def exact_svd(matrix: torch.Tensor, rank: int) -> LowRank:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return LowRank(u[:, :rank], s[:rank], vh[:rank])


def _top_singular(projected: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``rank`` singular triplets of a short, wide matrix B (k×n, k ≪ n) from the
    eigendecomposition of the k×k Gram matrix B·Bᵀ in fp64: about 5× faster than an SVD of B
    (0.7 s for 720×4096 on 2 cores) and exact to fp32 for the leading values, which are the
    only ones kept."""
    b64 = projected.double()
    eigenvalues, vectors = torch.linalg.eigh(b64 @ b64.T)  # ascending
    top = torch.arange(eigenvalues.shape[0] - 1, eigenvalues.shape[0] - 1 - rank, -1, device=eigenvalues.device)
    s = eigenvalues[top].clamp_min(0).sqrt()
    u = vectors[:, top]
    vh = (u.T @ b64) / s.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
    return u.to(projected.dtype), s.to(projected.dtype), vh.to(projected.dtype)


def randomized_svd(
    matrix: torch.Tensor,
    rank: int,
    *,
    oversample: int = 16,
    power_iters: int = 8,
    generator: torch.Generator | None = None,
) -> LowRank:
    """Randomized block Krylov SVD (Musco & Musco, NeurIPS 2015).

    A LoftQ residual W − Q is close to white noise: its singular values decay slowly, which is
    the worst case for plain subspace (power) iteration. The block Krylov space
    [A·Ω, (A·Aᵀ)·A·Ω, …, (A·Aᵀ)^q·A·Ω] keeps every intermediate block instead of only the last,
    and converges independently of the spectral gap: on a 4096×4096 NF4 residual at rank 16 it
    keeps 99.6 % of the exact SVD's error reduction where subspace iteration with the same
    products kept 96.9 %, at 1/25 of the exact SVD's time. Blocks have ``rank + oversample``
    columns, ``power_iters`` is q.

    Works on the transpose when the matrix is wide so the basis lives on the short side.
    Falls back to the exact SVD when the Krylov space would not be smaller than the matrix.
    """
    m, n = matrix.shape
    block = rank + oversample
    if block * (power_iters + 1) >= min(m, n):
        return exact_svd(matrix, rank)
    wide = n > m
    a = matrix.T if wide else matrix  # tall: rows >= cols
    omega = torch.randn(a.shape[1], block, generator=generator, device="cpu", dtype=a.dtype).to(a.device)
    current = _orthonormal(a @ omega)
    blocks = [current]
    for _ in range(power_iters):
        current = _orthonormal(a @ (a.T @ current))  # orthonormalised each step: no loss of rank
        blocks.append(current)
    basis = _orthonormal(torch.cat(blocks, dim=1))
    u_small, s, vh = _top_singular(basis.T @ a, rank)
    u = basis @ u_small
    if wide:
        return LowRank(vh.T.contiguous(), s, u.T.contiguous())
    return LowRank(u, s, vh)
