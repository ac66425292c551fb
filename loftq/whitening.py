"""The metric of a layer's inputs, for the activation-weighted LoftQ objective.

A layer computes W·x, so what a user sees of an error E = W − Q − L is E·x over the inputs
x it is fed, and the mean of ‖E·x‖² is ‖E·H^½‖²_F with H = XᵀX/n the inputs' second moment.
Any factor S with S·Sᵀ = H gives the same norm (‖E·S‖² = tr(E·H·Eᵀ)), so the Cholesky
factor serves, and the best rank-r L in that metric is [(W − Q)·S]_r · S⁻¹: whiten, take the
truncated SVD, unwhiten.

H is damped, H + λ·mean(diag H)·I, because calibration sets are finite: directions no
sample spans would otherwise cost nothing (and H would not be invertible), and the adapters
would be free to grow along them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from loftq.options import ConvertOptions

CHOLESKY_RETRIES = 3
"""Times the damping is raised 10× when the Cholesky factorization fails, before falling back."""

MIN_RETRY_DAMPING = 1e-6
"""A retry from damping 0 starts here (10× of nothing would be nothing)."""


@dataclass(frozen=True)
class Whitening:
    """The factor S of the damped second moment H_d = S·Sᵀ of a layer's inputs.

    ``factor`` is lower-triangular (in×in, fp32) or, when ``diagonal``, the vector sqrt(diag H_d).
    ``damping`` is the λ that was actually used (larger than asked for after a failed
    Cholesky); ``warning`` says why the full factor was given up for the diagonal, if it was.
    """

    factor: torch.Tensor
    diagonal: bool
    damping: float
    warning: str | None = None

    @classmethod
    def from_hessian(cls, h: torch.Tensor, damping: float, diagonal: bool = False) -> Whitening:
        """Factor H + λ·mean(diag H)·I; the factorization runs in fp64 because H's smallest
        eigenvalues, the ones the damping props up, are the ones fp32 gets wrong."""
        if h.ndim != 2 or h.shape[0] != h.shape[1]:
            raise ValueError(f"the second moment must be a square matrix, got shape {tuple(h.shape)}")
        if not bool(torch.isfinite(h).all()):
            raise ValueError("the second moment holds NaN or inf")
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        # Memory matters here: for a 14336-wide input H is 1.6 GB in fp64. One fp64 copy is
        # damped in place (no identity matrix, no symmetrised copy: the Cholesky reads only
        # the lower triangle, so rounding asymmetry in H is irrelevant) and factored.
        diag = h.detach().diagonal().to(torch.float64)
        scale = float(diag.mean())
        if not scale > 0:  # no signal at all: the damping alone defines the metric
            scale = 1.0
        if diagonal:
            return cls._diagonal(diag, damping, scale)
        damped = h.detach().to(torch.float64, copy=True)
        lam = applied = damping
        damped.diagonal().add_(applied * scale)
        for attempt in range(CHOLESKY_RETRIES + 1):
            factor, info = torch.linalg.cholesky_ex(damped)
            if int(info) == 0 and bool(torch.isfinite(factor).all()):
                del damped
                return cls(factor.to(torch.float32).contiguous(), diagonal=False, damping=lam)
            del factor
            if attempt < CHOLESKY_RETRIES:
                lam = max(lam * 10, MIN_RETRY_DAMPING)
                damped.diagonal().add_((lam - applied) * scale)
                applied = lam
        warning = f"Cholesky of the damped second moment failed up to damping {lam:g}; used its diagonal instead"
        return cls._diagonal(diag, damping, scale, warning=warning)

    @classmethod
    def _diagonal(cls, diag: torch.Tensor, damping: float, scale: float, warning: str | None = None) -> Whitening:
        # Floor the entries so that unapply never divides by zero when damping is 0.
        damped = (diag + damping * scale).clamp_min(MIN_RETRY_DAMPING * scale)
        return cls(damped.sqrt().to(torch.float32).contiguous(), diagonal=True, damping=damping, warning=warning)

    @property
    def objective(self) -> str:
        """The ConvertOptions.objective whose metric this is (after any fallback)."""
        return "activation-diag" if self.diagonal else "activation"

    @property
    def in_features(self) -> int:
        return self.factor.shape[0]

    def to(self, device: torch.device | str) -> Whitening:
        return dataclasses.replace(self, factor=self.factor.to(device))

    def apply(self, e: torch.Tensor) -> torch.Tensor:
        """E·S: a residual in the metric's coordinates, where the plain Frobenius norm is the objective."""
        return e * self.factor if self.diagonal else e @ self.factor

    def unapply(self, l: torch.Tensor) -> torch.Tensor:
        """L·S⁻¹, by a triangular solve: S can be ill-conditioned and an explicit inverse loses digits."""
        if self.diagonal:
            return l / self.factor
        return torch.linalg.solve_triangular(self.factor, l, upper=False, left=False)

    def norm(self, e: torch.Tensor) -> torch.Tensor:
        """‖E·S‖_F, a 0-d tensor."""
        return torch.linalg.matrix_norm(self.apply(e))

    def error(self, w: torch.Tensor, approx: torch.Tensor) -> float:
        """‖(W − approx)·S‖/‖W·S‖: the relative error in the metric of the inputs."""
        return float(self.norm(w - approx) / self.norm(w).clamp_min(1e-30))


def whitening_for(h: torch.Tensor, options: ConvertOptions) -> Whitening | None:
    """The Whitening that options.objective asks for, or None for the plain weight objective."""
    if options.objective == "weight":
        return None
    return Whitening.from_hessian(h, options.damping, diagonal=options.objective == "activation-diag")


def accumulate_hessian(h: torch.Tensor | None, x: torch.Tensor, count: int = 0) -> tuple[torch.Tensor, int]:
    """Fold a batch of inputs x (…×in) into the running mean H = XᵀX/n of the ``count`` rows seen.

    Returns (H, count + rows). Start with ``h=None, count=0``. H is updated in place when
    given (an in×in buffer per layer is too large to reallocate every batch).

    Accumulates in fp32: the matmul runs at full speed on accelerators, and keeping a running
    *mean* rather than a sum keeps H's entries O(‖x‖²), so a late batch is not rounded away
    against a huge total as it would be in an fp32 sum over millions of tokens. The damping
    added later (1% of the mean diagonal by default) is far above the remaining rounding.
    """
    x = x.detach().reshape(-1, x.shape[-1]).float()
    rows = x.shape[0]
    if h is None:
        if count:
            raise ValueError("count must be 0 when h is None")
        h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    elif h.shape != (x.shape[1], x.shape[1]):
        raise ValueError(f"inputs of width {x.shape[1]} do not match a second moment of shape {tuple(h.shape)}")
    if rows == 0:
        return h, count
    total = count + rows
    h.mul_(count / total).addmm_(x.T, x, alpha=1.0 / total)
    return h, total
