"""LoftQ for one weight matrix (README "What it does", docs/adr/0001-engine.md), with the scaling folded into the adapters.

Everything here works in PEFT's orientation (out×in) and in fp32 on the weight's device.

With a ``Whitening`` (loftq.whitening) the low-rank step and the choice of iterate minimise
the error in the metric of the layer's inputs instead of the plain Frobenius norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loftq.lowrank import LowRank, exact_svd, randomized_svd
from loftq.options import ConvertOptions
from loftq.whitening import Whitening

FakeQuantize = Callable[[torch.Tensor], torch.Tensor]
"""Maps a fp32 out×in matrix to the fp32 matrix its quantized form dequantizes to."""


@dataclass
class LayerFit:
    """The result for one layer; ``q + scaling * lora_b @ lora_a`` approximates the weight."""

    q: torch.Tensor  # fp32, out×in: the kept iterate's quantized weight, to be stored
    q_loaded: torch.Tensor  # fp32, out×in: what the loader rebuilds from it; the adapters fit this
    lora_a: torch.Tensor  # fp32, r×in
    lora_b: torch.Tensor  # fp32, out×r
    error_quant: float  # ‖W − quant(W)‖/‖W‖: plain quantization, no adapters
    error: float  # relative error of the returned fit in the objective's metric (see below)
    iter_errors: list[float] = field(default_factory=list)  # error of every iterate, in order
    best_iter: int = 1  # 1-based index of the iterate that was kept
    # "weight": error is ‖W − (q + scaling·B·A)‖/‖W‖. "activation"/"activation-diag": error is
    # ‖(W − (q + scaling·B·A))·S‖/‖W·S‖ with S·Sᵀ the damped second moment of the inputs.
    objective: str = "weight"
    weight_error: float = math.nan  # ‖W − (q_loaded + scaling·B·A)‖/‖W‖ whatever the objective
    objective_error_quant: float = math.nan  # error_quant in the objective's metric
    warnings: list[str] = field(default_factory=list)


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(weight - approx) / torch.linalg.matrix_norm(weight).clamp_min(1e-30))


def _solve(residual: torch.Tensor, options: ConvertOptions, generator: torch.Generator) -> LowRank:
    rank = min(options.rank, *residual.shape)
    if options.svd == "exact":
        return exact_svd(residual, rank)
    return randomized_svd(
        residual,
        rank,
        oversample=options.svd_oversample,
        power_iters=options.svd_power_iters,
        generator=generator,
    )


def _solve_weighted(
    residual: torch.Tensor, options: ConvertOptions, generator: torch.Generator, whitening: Whitening
) -> LowRank:
    """The best rank-r L in the metric: [(W − Q)·S]_r · S⁻¹, returned as the SVD of L itself.

    The whitened solve gives L = (U·Σ)·(Vᵀ·S⁻¹), whose right factor is not orthonormal (and
    is large where S is small), so splitting that product as-is would leave A much larger than
    B. A QR of the right factor and an r×r SVD turn it into L's own SVD, which ``_adapters``
    splits into equal norms at O(in·r²) cost, without forming L.
    """
    whitened = _solve(whitening.apply(residual), options, generator)
    right = whitening.unapply(whitened.vh)  # r×in
    basis, tri = torch.linalg.qr(right.T)  # right = triᵀ·basisᵀ, basis in×r orthonormal
    u_small, s, vh_small = torch.linalg.svd(whitened.s[:, None] * tri.T, full_matrices=False)
    return LowRank((whitened.u @ u_small).contiguous(), s, (vh_small @ basis.T).contiguous())


def _adapters(low_rank: LowRank, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split u·s·vh into B (out×r) and A (r×in) with equal norms, divided by sqrt(scaling),
    so that PEFT's ``scaling·B·A`` reproduces the fit for any lora_alpha."""
    root = torch.sqrt(low_rank.s / scaling)
    return (low_rank.vh * root[:, None]).contiguous(), (low_rank.u * root).contiguous()


def fit_layer(
    weight: torch.Tensor,
    fake_quantize: FakeQuantize,
    options: ConvertOptions,
    *,
    as_loaded: FakeQuantize | None = None,
    whitening: Whitening | None = None,
) -> LayerFit:
    """Run T alternating iterations and keep the best iterate.

    ``as_loaded`` maps the kept Q to what the documented loader will rebuild from the stored
    backbone. When that differs from Q (bf16/fp16 storage), the adapters are fitted once more
    against the rebuilt matrix, so the reported error is the one a user gets after loading.

    ``whitening`` (the metric of this layer's inputs) switches the objective: each low-rank
    step is the weighted solve and every error, hence the kept iterate, is measured in that
    metric. It decides the objective on its own; ``options.objective`` only says whether the
    caller should build one. Without it the computation is exactly plain LoftQ.
    """
    w = weight.float()
    scaling = options.scaling
    generator = torch.Generator().manual_seed(options.seed)
    w_norm = torch.linalg.matrix_norm(w).clamp_min(1e-30)  # ‖W‖ once, not per iterate
    if whitening is None:

        def measure(diff: torch.Tensor) -> float:  # takes W − approx
            return float(torch.linalg.matrix_norm(diff) / w_norm)

        def solve(residual: torch.Tensor) -> LowRank:
            return _solve(residual, options, generator)
    else:
        if whitening.in_features != w.shape[1]:
            raise ValueError(f"whitening is for {whitening.in_features} inputs, the weight has {w.shape[1]}")
        whitening = whitening.to(w.device)
        reference = whitening.norm(w).clamp_min(1e-30)  # ‖W·S‖, the same for every iterate

        def measure(diff: torch.Tensor) -> float:  # takes W − approx; == whitening.error(w, approx)
            return float(whitening.norm(diff) / reference)

        def solve(residual: torch.Tensor) -> LowRank:
            return _solve_weighted(residual, options, generator, whitening)

    def difference(q: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:
        """W − (Q + L), computed in that order (the reported errors are those floats), in one buffer."""
        approx = q + correction
        return torch.sub(w, approx, out=approx)

    correction: torch.Tensor | None = None  # scaling·B·A of the previous iterate
    best: tuple[float, torch.Tensor, LowRank] | None = None
    errors: list[float] = []
    error_quant = objective_error_quant = math.nan
    best_iter = 0
    for step in range(1, options.iters + 1):
        q = fake_quantize(w if correction is None else w - correction)
        residual = w - q
        if step == 1:
            error_quant = float(torch.linalg.matrix_norm(residual) / w_norm)
            objective_error_quant = error_quant if whitening is None else measure(residual)
        low_rank = solve(residual)
        del residual
        correction = low_rank.matrix()
        error = measure(difference(q, correction))
        errors.append(error)
        if best is None or error < best[0]:
            best, best_iter = (error, q, low_rank), step
    assert best is not None
    error, q, low_rank = best
    loaded = q if as_loaded is None else as_loaded(q)
    if not torch.equal(loaded, q):
        low_rank = solve(w - loaded)
        error = measure(difference(loaded, low_rank.matrix()))
    weight_error = error if whitening is None else relative_error(w, loaded + low_rank.matrix())
    lora_a, lora_b = _adapters(low_rank, scaling)
    return LayerFit(
        q=q,
        q_loaded=loaded,
        lora_a=lora_a,
        lora_b=lora_b,
        error_quant=error_quant,
        error=error,
        iter_errors=errors,
        best_iter=best_iter,
        objective="weight" if whitening is None else whitening.objective,
        weight_error=weight_error,
        objective_error_quant=objective_error_quant,
        warnings=[] if whitening is None or whitening.warning is None else [whitening.warning],
    )
