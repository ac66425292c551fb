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
