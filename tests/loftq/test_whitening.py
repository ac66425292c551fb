"""The activation-weighted objective: the closed form, its numerics, and its effect on a layer's output."""

from __future__ import annotations

import math

import pytest
import torch

from loftq.algorithm import _solve_weighted, fit_layer, relative_error
from loftq.lowrank import LowRank, exact_svd, randomized_svd
from loftq.options import ConvertOptions
from loftq.quantizers import get_quantizer
from loftq.whitening import Whitening, accumulate_hessian, whitening_for

NF4 = get_quantizer("nf4", 4)


def anisotropic_inputs(n: int, d: int, generator: torch.Generator, *, rotate: bool = True, outliers: int = 4) -> torch.Tensor:
    """n×d inputs with a few directions of 20× the spread of the rest (rotated off the axes, or not)."""
    scales = torch.ones(d)
    scales[torch.randperm(d, generator=generator)[:outliers]] = 20.0
    x = torch.randn(n, d, generator=generator) * scales
    if rotate:
        rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=generator))
        x = x @ rotation
    return x


def second_moment(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


def damped(h: torch.Tensor, damping: float) -> torch.Tensor:
    return h + damping * h.diagonal().mean() * torch.eye(h.shape[0])


def sym_sqrt(h: torch.Tensor) -> torch.Tensor:
    """H^½ by eigendecomposition: a factor independent of the Cholesky one under test."""
    values, vectors = torch.linalg.eigh(h.double())
    return ((vectors * values.clamp_min(0).sqrt()) @ vectors.T).float()


def weighted_norm(e: torch.Tensor, root: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(e @ root))


@pytest.fixture
def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A residual E (48×64), inputs X (256×64, n > in) and their second moment."""
    generator = torch.Generator().manual_seed(0)
    e = torch.randn(48, 64, generator=generator)
    x = anisotropic_inputs(256, 64, generator)
    return e, x, second_moment(x)


EXACT = ConvertOptions(rank=6, svd="exact")


def test_closed_form_is_the_weighted_optimum(problem) -> None:
    e, _, h = problem
    whitening = Whitening.from_hessian(h, 0.01)
    low_rank = _solve_weighted(e, EXACT, torch.Generator(), whitening)
    l = low_rank.matrix()
    assert torch.linalg.matrix_rank(l) == 6
    # Eckart–Young in the metric, with the symmetric root instead of our Cholesky factor.
    root = sym_sqrt(damped(h, 0.01))
    tail = torch.linalg.svdvals((e @ root).double())[6:]
    optimum = float(tail.square().sum().sqrt())
    ours = weighted_norm(e - l, root)
    assert ours == pytest.approx(optimum, rel=1e-4)
    assert float(whitening.norm(e - l)) == pytest.approx(optimum, rel=1e-4)  # any factor gives the same norm
    # No nearby rank-6 candidate, nor the plain (unweighted) truncated SVD, does better.
    generator = torch.Generator().manual_seed(1)
    b, a = low_rank.u * low_rank.s, low_rank.vh
    for size in (1e-3, 1e-2, 1e-1):
        for _ in range(5):
            db = torch.randn(b.shape, generator=generator) * size * b.norm() / math.sqrt(b.numel())
            da = torch.randn(a.shape, generator=generator) * size * a.norm() / math.sqrt(a.numel())
            assert weighted_norm(e - (b + db) @ (a + da), root) >= ours * (1 - 1e-6)
    assert weighted_norm(e - exact_svd(e, 6).matrix(), root) > ours * 1.01


def test_closed_form_satisfies_both_least_squares_conditions(problem) -> None:
    """With A fixed the best B is a least-squares solve, and vice versa: ours must be both."""
    e, _, h = problem
    whitening = Whitening.from_hessian(h, 0.01)
    low_rank = _solve_weighted(e, EXACT, torch.Generator(), whitening)
    b, a = (low_rank.u * low_rank.s).double(), low_rank.vh.double()
    s = whitening.factor.double()
    es = e.double() @ s
    best_b = torch.linalg.lstsq((a @ s).T, es.T).solution.T  # min_B ‖E·S − B·(A·S)‖
    best_a = torch.linalg.lstsq(b, e.double()).solution  # min_A ‖(E − B·A)·S‖ = min ‖E − B·A‖·S (S invertible)
    torch.testing.assert_close(best_b, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))
    torch.testing.assert_close(best_a, a, rtol=1e-3, atol=1e-4 * float(a.abs().max()))


def test_full_rank_reproduces_the_residual(problem) -> None:
    e, _, h = problem
    whitening = Whitening.from_hessian(h, 0.01)
    full = ConvertOptions(rank=48, svd="exact")
    l = _solve_weighted(e, full, torch.Generator(), whitening).matrix()
    # A full-rank least-squares solve of L·S = E·S gives E back too.
    lstsq = torch.linalg.lstsq(whitening.factor.T.double(), (e.double() @ whitening.factor.double()).T).solution.T
    torch.testing.assert_close(l.double(), lstsq, rtol=0, atol=1e-4)
    assert whitening.error(e, l) < 1e-5


def test_apply_unapply_and_error_agree_with_the_definition(problem) -> None:
    e, _, h = problem
    whitening = Whitening.from_hessian(h, 0.05)
    s = whitening.factor
    torch.testing.assert_close(s @ s.T, damped(h, 0.05), rtol=1e-4, atol=1e-3)
    assert torch.equal(s, s.tril())
    torch.testing.assert_close(whitening.unapply(whitening.apply(e)), e, rtol=1e-4, atol=1e-4)
    root = sym_sqrt(damped(h, 0.05))
    approx = e + 0.1 * torch.randn(e.shape, generator=torch.Generator().manual_seed(3))
    expected = weighted_norm(e - approx, root) / weighted_norm(e, root)
    assert whitening.error(e, approx) == pytest.approx(expected, rel=1e-4)


def output_error(w: torch.Tensor, fit, x: torch.Tensor, options: ConvertOptions) -> float:
    """‖(W − W_eff)·Xᵀ‖: what the layer's outputs lose over the calibration inputs."""
    effective = fit.q_loaded + options.scaling * fit.lora_b @ fit.lora_a
    return float(torch.linalg.matrix_norm((w - effective) @ x.T))


@pytest.mark.parametrize("iters", [1, 3])
def test_activation_objective_lowers_the_output_error_on_every_layer(iters: int) -> None:
    generator = torch.Generator().manual_seed(0)
    options = ConvertOptions(rank=8, lora_alpha=16, iters=iters, svd="exact")
    for shape in [(64, 128), (128, 64), (96, 96), (128, 256)]:
        w = torch.randn(*shape, generator=generator) * 0.02
        x = anisotropic_inputs(1024, shape[1], generator)
        whitening = Whitening.from_hessian(second_moment(x), options.damping)

        plain = fit_layer(w, NF4.fake_quantize, options)
        weighted = fit_layer(w, NF4.fake_quantize, options, whitening=whitening)
        ratio = output_error(w, weighted, x, options) / output_error(w, plain, x, options)
        assert ratio < 0.5, (shape, ratio)  # measured 0.19–0.38
        assert weighted.objective == "activation" and plain.objective == "weight"
        # The reported numbers: error in the metric, weight_error in weight space.
        effective = weighted.q_loaded + options.scaling * weighted.lora_b @ weighted.lora_a
        assert weighted.error == pytest.approx(whitening.error(w, effective), rel=1e-5)
        assert weighted.weight_error == pytest.approx(relative_error(w, effective), rel=1e-5)
        assert weighted.weight_error > plain.error  # it trades weight-space error for output error
        assert weighted.error == min(weighted.iter_errors) < weighted.objective_error_quant
        assert weighted.error_quant == plain.error_quant  # still the plain quantization number


def test_diagonal_objective_helps_with_axis_aligned_outliers() -> None:
    generator = torch.Generator().manual_seed(5)
    options = ConvertOptions(rank=8, iters=2, svd="exact", objective="activation-diag")
    w = torch.randn(96, 128, generator=generator) * 0.02
    x = anisotropic_inputs(1024, 128, generator, rotate=False)
    whitening = whitening_for(second_moment(x), options)
    assert whitening is not None and whitening.diagonal and whitening.factor.shape == (128,)
    fit = fit_layer(w, NF4.fake_quantize, options, whitening=whitening)
    plain = fit_layer(w, NF4.fake_quantize, options)
    assert fit.objective == "activation-diag"
    assert output_error(w, fit, x, options) < 0.5 * output_error(w, plain, x, options)


def test_adapters_are_balanced_and_scaling_is_folded(problem) -> None:
    _, _, h = problem
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(2)) * 0.02
    whitening = Whitening.from_hessian(h, 0.01)
    base = fit_layer(w, NF4.fake_quantize, ConvertOptions(rank=6, iters=2, svd="exact"), whitening=whitening)
    options = ConvertOptions(rank=6, lora_alpha=1.5, iters=2, svd="exact")
    fit = fit_layer(w, NF4.fake_quantize, options, whitening=whitening)
    torch.testing.assert_close(options.scaling * fit.lora_b @ fit.lora_a, base.lora_b @ base.lora_a, rtol=1e-4, atol=1e-7)
    # The whitened right factor V·S⁻¹ is far from orthonormal; the split must still be even.
    assert float(torch.linalg.matrix_norm(fit.lora_a)) == pytest.approx(float(torch.linalg.matrix_norm(fit.lora_b)), rel=1e-4)
    # And the rows of A / columns of B are orthogonal: it is the SVD of L itself.
    gram = fit.lora_a @ fit.lora_a.T
    torch.testing.assert_close(gram, torch.diag(gram.diagonal()), rtol=0, atol=1e-5 * float(gram.max()))


def test_as_loaded_refit_uses_the_weighted_solve(problem) -> None:
    _, _, h = problem
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(4)) * 0.02
    whitening = Whitening.from_hessian(h, 0.01)

    def as_loaded(q: torch.Tensor) -> torch.Tensor:
        return NF4.dequantize(NF4.quantize(q.to(torch.bfloat16)), dtype=torch.bfloat16).float()

    options = ConvertOptions(rank=6, iters=2, svd="exact")
    fit = fit_layer(w, NF4.fake_quantize, options, as_loaded=as_loaded, whitening=whitening)
    assert not torch.equal(fit.q_loaded, fit.q)
    effective = fit.q_loaded + fit.lora_b @ fit.lora_a
    assert fit.error == pytest.approx(whitening.error(w, effective), rel=1e-5)
    expected = _solve_weighted(w - fit.q_loaded, options, torch.Generator(), whitening).matrix()
    torch.testing.assert_close(fit.lora_b @ fit.lora_a, expected, rtol=1e-4, atol=1e-6)


def test_randomized_solver_in_the_metric_is_close_to_exact(problem) -> None:
    _, _, h = problem
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(6)) * 0.02
    whitening = Whitening.from_hessian(h, 0.01)
    exact = fit_layer(w, NF4.fake_quantize, ConvertOptions(rank=4, svd="exact"), whitening=whitening)
    randomized = ConvertOptions(rank=4, svd="randomized", svd_oversample=8, seed=3)
    first = fit_layer(w, NF4.fake_quantize, randomized, whitening=whitening)
    again = fit_layer(w, NF4.fake_quantize, randomized, whitening=whitening)
    assert torch.equal(first.lora_a, again.lora_a) and torch.equal(first.lora_b, again.lora_b)
    kept = (first.objective_error_quant - first.error) / (exact.objective_error_quant - exact.error)
    assert kept > 0.99


def test_isotropic_inputs_give_plain_loftq() -> None:
    """H = c·I makes the metric a multiple of the Frobenius norm: the fit must be LoftQ's."""
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(7)) * 0.02
    whitening = Whitening.from_hessian(3.0 * torch.eye(96), 0.01)
    options = ConvertOptions(rank=8, iters=3, svd="exact")
    plain = fit_layer(w, NF4.fake_quantize, options)
    weighted = fit_layer(w, NF4.fake_quantize, options, whitening=whitening)
    assert weighted.best_iter == plain.best_iter
    # Later iterates quantize W − L with L rounded differently: same codes, absmax within an ulp or so.
    torch.testing.assert_close(weighted.q, plain.q, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(weighted.lora_b @ weighted.lora_a, plain.lora_b @ plain.lora_a, rtol=1e-4, atol=1e-6)
    assert weighted.error == pytest.approx(plain.error, rel=1e-5)
    assert weighted.weight_error == pytest.approx(plain.error, rel=1e-5)


def test_damping_handles_rank_deficient_inputs() -> None:
    generator = torch.Generator().manual_seed(8)
    x = anisotropic_inputs(16, 96, generator)  # n < in: H has rank 16
    h = second_moment(x)
    assert torch.linalg.matrix_rank(h) == 16
    whitening = Whitening.from_hessian(h, 0.01)
    assert not whitening.diagonal and whitening.warning is None and whitening.damping == 0.01
    assert bool(torch.isfinite(whitening.factor).all())
    w = torch.randn(64, 96, generator=generator) * 0.02
    fit = fit_layer(w, NF4.fake_quantize, ConvertOptions(rank=8, iters=3, svd="exact"), whitening=whitening)
    for tensor in (fit.lora_a, fit.lora_b):
        assert bool(torch.isfinite(tensor).all())
    assert all(math.isfinite(e) for e in [*fit.iter_errors, fit.weight_error, fit.objective_error_quant])
    assert fit.error < fit.objective_error_quant and fit.warnings == []
    # The adapters cannot blow up along the directions no input spans.
    assert fit.weight_error < 2 * fit.error_quant


def test_zero_damping_on_a_singular_moment_is_raised_until_cholesky_succeeds() -> None:
    whitening = Whitening.from_hessian(torch.zeros(32, 32), 0.0)
    assert not whitening.diagonal and whitening.warning is None
    assert whitening.damping > 0
    torch.testing.assert_close(whitening.factor, math.sqrt(whitening.damping) * torch.eye(32))


def test_indefinite_moment_falls_back_to_the_diagonal_with_a_warning() -> None:
    h = torch.eye(32)
    h[0, 0] = -1e6  # no damping within 1000× fixes this
    whitening = Whitening.from_hessian(h, 0.01)
    assert whitening.diagonal and whitening.warning and "diagonal" in whitening.warning
    assert bool(torch.isfinite(whitening.factor).all()) and bool((whitening.factor > 0).all())
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(9))
    fit = fit_layer(w, NF4.fake_quantize, ConvertOptions(rank=4, svd="exact"), whitening=whitening)
    assert fit.warnings == [whitening.warning] and fit.objective == "activation-diag"
    assert math.isfinite(fit.error)


def test_diagonal_variant_matches_the_full_one_on_a_diagonal_moment() -> None:
    generator = torch.Generator().manual_seed(10)
    h = torch.diag(torch.rand(80, generator=generator) * 10 + 0.01)
    full = Whitening.from_hessian(h, 0.01)
    diag = Whitening.from_hessian(h, 0.01, diagonal=True)
    torch.testing.assert_close(full.factor, torch.diag(diag.factor), rtol=1e-6, atol=1e-7)
    e = torch.randn(40, 80, generator=generator)
    torch.testing.assert_close(full.apply(e), diag.apply(e), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full.unapply(e), diag.unapply(e), rtol=1e-5, atol=1e-6)
    w = torch.randn(40, 80, generator=generator) * 0.02
    options = ConvertOptions(rank=5, iters=2, svd="exact")
    fit_full = fit_layer(w, NF4.fake_quantize, options, whitening=full)
    fit_diag = fit_layer(w, NF4.fake_quantize, options, whitening=diag)
    assert fit_full.best_iter == fit_diag.best_iter
    torch.testing.assert_close(fit_full.q, fit_diag.q, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(fit_full.lora_b @ fit_full.lora_a, fit_diag.lora_b @ fit_diag.lora_a, rtol=1e-4, atol=1e-6)
    assert fit_full.error == pytest.approx(fit_diag.error, rel=1e-5)


def test_accumulated_moment_equals_that_of_the_concatenation() -> None:
    generator = torch.Generator().manual_seed(11)
    batches = [torch.randn(3, 7, 24, generator=generator), torch.randn(5, 24, generator=generator), torch.randn(0, 24), torch.randn(2, 9, 24, generator=generator)]
    h, count = None, 0
    for batch in batches:
        h, count = accumulate_hessian(h, batch, count)
    assert h is not None and h.dtype == torch.float32
    rows = torch.cat([b.reshape(-1, 24) for b in batches])
    assert count == rows.shape[0] == 21 + 5 + 18
    torch.testing.assert_close(h, second_moment(rows), rtol=1e-5, atol=1e-6)
    # bf16 activations are accumulated in fp32.
    h16, _ = accumulate_hessian(None, rows.to(torch.bfloat16))
    assert h16.dtype == torch.float32
    with pytest.raises(ValueError):
        accumulate_hessian(h, torch.randn(4, 25))
    with pytest.raises(ValueError):
        accumulate_hessian(None, rows, 3)


def previous_fit_layer(weight: torch.Tensor, fake_quantize, options: ConvertOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """fit_layer as it was before the weighted objective (no as_loaded), transcribed."""
    w = weight.float()
    generator = torch.Generator().manual_seed(options.seed)

    def solve(residual: torch.Tensor) -> LowRank:
        rank = min(options.rank, *residual.shape)
        if options.svd == "exact":
            return exact_svd(residual, rank)
        return randomized_svd(residual, rank, oversample=options.svd_oversample, power_iters=options.svd_power_iters, generator=generator)

    correction = torch.zeros_like(w)
    best = None
    errors = []
    for _ in range(options.iters):
        q = fake_quantize(w - correction)
        low_rank = solve(w - q)
        correction = low_rank.matrix()
        error = relative_error(w, q + correction)
        errors.append(error)
        if best is None or error < best[0]:
            best = (error, q, low_rank)
    _, q, low_rank = best
    root = torch.sqrt(low_rank.s / options.scaling)
    return q, (low_rank.vh * root[:, None]).contiguous(), (low_rank.u * root).contiguous(), errors


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_without_whitening_the_fit_is_bit_for_bit_the_previous_one(svd: str) -> None:
    w = torch.randn(72, 160, generator=torch.Generator().manual_seed(12)) * 0.02
    options = ConvertOptions(rank=8, lora_alpha=4, iters=4, svd=svd, svd_oversample=8, seed=5)
    q, lora_a, lora_b, errors = previous_fit_layer(w, NF4.fake_quantize, options)
    for fit in (fit_layer(w, NF4.fake_quantize, options), fit_layer(w, NF4.fake_quantize, options, whitening=None)):
        assert torch.equal(fit.q, q) and torch.equal(fit.q_loaded, q)
        assert torch.equal(fit.lora_a, lora_a) and torch.equal(fit.lora_b, lora_b)
        assert fit.iter_errors == errors and fit.error == min(errors)
        assert fit.objective == "weight" and fit.weight_error == fit.error
        assert fit.objective_error_quant == fit.error_quant and fit.warnings == []


def test_options_select_the_whitening() -> None:
    h = second_moment(torch.randn(64, 16, generator=torch.Generator().manual_seed(13)))
    assert whitening_for(h, ConvertOptions()) is None
    full = whitening_for(h, ConvertOptions(objective="activation", damping=0.1))
    assert full is not None and not full.diagonal and full.damping == 0.1 and full.objective == "activation"
    with pytest.raises(ValueError):
        fit_layer(torch.randn(8, 17), NF4.fake_quantize, ConvertOptions(rank=2), whitening=full)
