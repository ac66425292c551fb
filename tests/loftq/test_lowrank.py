from __future__ import annotations

import pytest
import torch

from loftq.lowrank import exact_svd, randomized_svd


@pytest.mark.parametrize("shape", [(200, 80), (80, 200), (128, 128)])
def test_randomized_recovers_an_exactly_low_rank_matrix(shape: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(shape[0], 6, generator=generator)
    right = torch.randn(6, shape[1], generator=generator)
    matrix = left @ right
    approx = randomized_svd(matrix, 6, oversample=8, power_iters=2, generator=torch.Generator().manual_seed(1))
    assert approx.u.shape == (shape[0], 6) and approx.vh.shape == (6, shape[1])
    torch.testing.assert_close(approx.matrix(), matrix, rtol=1e-4, atol=1e-4)


def test_randomized_matches_exact_singular_values_on_a_decaying_spectrum() -> None:
    generator = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(300, 100, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(150, 100, generator=generator))
    s = torch.logspace(0, -3, 100)
    matrix = (u * s) @ v.T
    exact = exact_svd(matrix, 10)
    approx = randomized_svd(matrix, 10, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(approx.s, exact.s, rtol=1e-4, atol=1e-6)


def test_falls_back_to_exact_when_the_sketch_is_not_smaller() -> None:
    matrix = torch.randn(40, 30)
    approx = randomized_svd(matrix, 8, oversample=32)
    exact = exact_svd(matrix, 8)
    torch.testing.assert_close(approx.matrix(), exact.matrix())


def test_randomized_is_reproducible_and_orthonormal_on_a_flat_spectrum() -> None:
    # Gaussian noise is the flattest spectrum there is; 9 blocks widened to 64 columns fit in 768.
    matrix = torch.randn(1024, 768, generator=torch.Generator().manual_seed(4))
    first = randomized_svd(matrix, 8, generator=torch.Generator().manual_seed(5))
    again = randomized_svd(matrix, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first.u, again.u) and torch.equal(first.s, again.s) and torch.equal(first.vh, again.vh)
    torch.testing.assert_close(first.u.T @ first.u, torch.eye(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(first.vh @ first.vh.T, torch.eye(8), atol=1e-5, rtol=0)
    exact = exact_svd(matrix, 8)
    assert float((first.s**2).sum()) >= 0.995 * float((exact.s**2).sum())
    # the triplets are those of the matrix: u·s = M·vᵀ
    torch.testing.assert_close(first.u * first.s, matrix @ first.vh.T, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("shape", [(600, 400), (400, 600)])
def test_randomized_recovers_a_low_rank_matrix_when_later_blocks_are_rounding_noise(shape: tuple[int, int]) -> None:
    # After the first block the Krylov space is exhausted: every later block is what rounding
    # left after orthogonalisation, and must neither break the basis nor the result.
    generator = torch.Generator().manual_seed(6)
    matrix = torch.randn(shape[0], 6, generator=generator) @ torch.randn(6, shape[1], generator=generator)
    approx = randomized_svd(matrix, 6, oversample=8, power_iters=4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(approx.matrix(), matrix, rtol=0, atol=1e-4 * float(matrix.abs().max()))
