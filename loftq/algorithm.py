"""LoftQ for one weight matrix (DESIGN §1), with the scaling folded into the adapters.

Everything here works in PEFT's orientation (out×in) and in fp32 on the weight's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loftq.lowrank import LowRank, exact_svd, randomized_svd
from loftq.options import ConvertOptions

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
    error: float  # ‖W − (q + scaling·B·A)‖/‖W‖ of the returned fit
    iter_errors: list[float] = field(default_factory=list)  # error of every iterate, in order
    best_iter: int = 1  # 1-based index of the iterate that was kept


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
) -> LayerFit:
    """Run T alternating iterations and keep the best iterate.

    ``as_loaded`` maps the kept Q to what the documented loader will rebuild from the stored
    backbone. When that differs from Q (bf16/fp16 storage), the adapters are fitted once more
    against the rebuilt matrix, so the reported error is the one a user gets after loading.
    """
    w = weight.float()
    scaling = options.scaling
    generator = torch.Generator().manual_seed(options.seed)
    correction = torch.zeros_like(w)  # scaling·B·A of the previous iterate
    best: tuple[float, torch.Tensor, LowRank] | None = None
    errors: list[float] = []
    error_quant = math.nan
    best_iter = 0
    for step in range(1, options.iters + 1):
        q = fake_quantize(w - correction)
        if step == 1:
            error_quant = relative_error(w, q)
        low_rank = _solve(w - q, options, generator)
        correction = low_rank.matrix()
        error = relative_error(w, q + correction)
        errors.append(error)
        if best is None or error < best[0]:
            best, best_iter = (error, q, low_rank), step
    assert best is not None
    error, q, low_rank = best
    loaded = q if as_loaded is None else as_loaded(q)
    if not torch.equal(loaded, q):
        low_rank = _solve(w - loaded, options, generator)
        error = relative_error(w, loaded + low_rank.matrix())
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
    )
