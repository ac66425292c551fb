"""The per-layer LoftQ fit against an independent transcription of the paper's pseudocode."""

from __future__ import annotations

import math

import pytest
import torch

from loftq.algorithm import fit_layer, relative_error
from loftq.options import ConvertOptions
from loftq.quantizers import get_quantizer


def reference_loftq(weight: torch.Tensor, rank: int, iters: int, quantize) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Algorithm 1 of Li et al. (arXiv 2310.08659), written from the paper, with scaling = 1.

    Returns Q and the rank-r correction L = B·A of the *last* iterate (fp32, as the reference
    implementations compute it).
    """
    w = weight.float()
    a = torch.zeros(rank, w.shape[1])
    b = torch.zeros(w.shape[0], rank)
    q = torch.zeros_like(w)
    for _ in range(iters):
        q = quantize(w - b @ a)
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        b = u[:, :rank] @ torch.diag(s[:rank].sqrt())
        a = torch.diag(s[:rank].sqrt()) @ vh[:rank]
    return q, b @ a, w


@pytest.fixture
def weight() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(96, 192) * 0.02


NF4 = get_quantizer("nf4", 4)


@pytest.mark.parametrize("iters", [1, 2, 5])
def test_exact_mode_matches_reference(weight: torch.Tensor, iters: int) -> None:
    options = ConvertOptions(rank=8, lora_alpha=8, iters=iters, svd="exact")
    fit = fit_layer(weight, NF4.fake_quantize, options)
    # The reference keeps the last iterate; compare against the iterate we kept.
    q_ref, correction_ref, _ = reference_loftq(weight, 8, fit.best_iter, NF4.fake_quantize)
    # Same codes everywhere; absmax may differ in the last bit where W − B·A was rounded differently.
    assert torch.equal(NF4.quantize(fit.q).codes, NF4.quantize(q_ref).codes)
    torch.testing.assert_close(fit.q, q_ref, rtol=1e-6, atol=1e-8)
    ours = options.scaling * fit.lora_b @ fit.lora_a
    torch.testing.assert_close(ours, correction_ref, rtol=1e-4, atol=1e-6)
    assert fit.error == pytest.approx(relative_error(weight, q_ref + correction_ref), rel=1e-4)


@pytest.mark.parametrize(("alpha", "rslora"), [(8.0, False), (32.0, False), (3.0, False), (16.0, True), (5.0, True)])
def test_scaling_is_folded_into_the_adapters(weight: torch.Tensor, alpha: float, rslora: bool) -> None:
    """Whatever alpha, PEFT's ``scaling·B·A`` must reproduce the fit of the alpha == r case."""
    base = fit_layer(weight, NF4.fake_quantize, ConvertOptions(rank=8, lora_alpha=8, iters=2, svd="exact"))
    options = ConvertOptions(rank=8, lora_alpha=alpha, use_rslora=rslora, iters=2, svd="exact")
    fit = fit_layer(weight, NF4.fake_quantize, options)
    expected_scaling = alpha / (math.sqrt(8) if rslora else 8)
    assert options.scaling == pytest.approx(expected_scaling)
    torch.testing.assert_close(expected_scaling * fit.lora_b @ fit.lora_a, base.lora_b @ base.lora_a, rtol=1e-4, atol=1e-7)
    assert fit.error == pytest.approx(base.error, rel=1e-6)
    # A and B are balanced, so neither blows up when scaling is small or large.
    assert torch.linalg.matrix_norm(fit.lora_a) == pytest.approx(float(torch.linalg.matrix_norm(fit.lora_b)), rel=1e-4)


def test_best_iterate_is_kept_and_every_iterate_reported(weight: torch.Tensor) -> None:
    fit = fit_layer(weight, NF4.fake_quantize, ConvertOptions(rank=8, iters=6, svd="exact"))
    assert len(fit.iter_errors) == 6
    assert fit.error == min(fit.iter_errors)
    assert fit.iter_errors[fit.best_iter - 1] == fit.error
    assert fit.error < fit.error_quant
    assert fit.error_quant == pytest.approx(relative_error(weight, NF4.fake_quantize(weight)))


def test_worse_later_iterates_are_not_kept() -> None:
    """A quantizer that gets noisier each call makes later iterates worse: the first must be kept."""
    torch.manual_seed(1)
    weight = torch.randn(64, 64)
    noise = torch.randn(64, 64)
    calls = []

    def degrading(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return NF4.fake_quantize(x) + 0.1 * len(calls) * noise

    fit = fit_layer(weight, degrading, ConvertOptions(rank=4, iters=4, svd="exact"))
    assert fit.best_iter == 1
    assert fit.error == fit.iter_errors[0] < fit.iter_errors[-1]


def test_computes_in_fp32_whatever_the_storage_dtype(weight: torch.Tensor) -> None:
    options = ConvertOptions(rank=8, iters=2, svd="exact")
    fit16 = fit_layer(weight.to(torch.bfloat16), NF4.fake_quantize, options)
    fit32 = fit_layer(weight.to(torch.bfloat16).float(), NF4.fake_quantize, options)
    assert fit16.q.dtype == fit16.lora_a.dtype == fit16.lora_b.dtype == torch.float32
    assert torch.equal(fit16.q, fit32.q)
    assert fit16.error == fit32.error


def test_adapters_are_refitted_against_the_loaded_matrix(weight: torch.Tensor) -> None:
    """With bf16 storage the loader rebuilds a slightly different Q: the adapters fit that one."""

    def as_loaded(q: torch.Tensor) -> torch.Tensor:
        stored = q.to(torch.bfloat16)
        return NF4.dequantize(NF4.quantize(stored), dtype=torch.bfloat16).float()

    options = ConvertOptions(rank=8, iters=3, svd="exact")
    fit = fit_layer(weight, NF4.fake_quantize, options, as_loaded=as_loaded)
    assert not torch.equal(fit.q_loaded, fit.q)
    assert torch.equal(fit.q_loaded, as_loaded(fit.q))
    effective = fit.q_loaded + options.scaling * fit.lora_b @ fit.lora_a
    assert fit.error == pytest.approx(relative_error(weight, effective), abs=1e-6)
    naive = fit_layer(weight, NF4.fake_quantize, options)
    naive_effective = fit.q_loaded + options.scaling * naive.lora_b @ naive.lora_a
    assert fit.error < relative_error(weight, naive_effective)


def test_randomized_solver_is_reproducible_and_close_to_exact(weight: torch.Tensor) -> None:
    exact = fit_layer(weight, NF4.fake_quantize, ConvertOptions(rank=8, svd="exact"))
    first = fit_layer(weight, NF4.fake_quantize, ConvertOptions(rank=8, svd="randomized", seed=7))
    again = fit_layer(weight, NF4.fake_quantize, ConvertOptions(rank=8, svd="randomized", seed=7))
    assert torch.equal(first.lora_a, again.lora_a) and torch.equal(first.lora_b, again.lora_b)
    kept = (first.error_quant - first.error) / (exact.error_quant - exact.error)
    assert kept > 0.99
