"""Quality on a real pretrained model: all-MiniLM-L6-v2 (BERT, 37 linear layers), NF4, r=16."""

from __future__ import annotations

from pathlib import Path

import pytest

from loftq import ConvertOptions, Report, convert_directory

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reports(minilm: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Report]:
    results = {}
    for svd in ("exact", "randomized"):
        for iters in (1, 5):
            out = tmp_path_factory.mktemp(f"minilm-{svd}-{iters}")
            # lora_alpha deliberately differs from r: the error must not depend on it.
            results[svd, iters] = convert_directory(minilm, out, ConvertOptions(rank=16, lora_alpha=32, iters=iters, svd=svd))
    return results


def test_every_linear_layer_is_targeted(reports) -> None:
    assert {r.summary.layers for r in reports.values()} == {37}


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_mean_relative_error_meets_the_published_bounds(reports, svd: str) -> None:
    t1, t5 = reports[svd, 1].summary, reports[svd, 5].summary
    assert t1.mean_error_quant == pytest.approx(0.0938, abs=5e-5)  # plain NF4
    assert t1.mean_error <= 0.0864
    assert t5.mean_error <= 0.0783
    assert t5.mean_error < t1.mean_error < t1.mean_error_quant


@pytest.mark.parametrize("iters", [1, 5])
def test_randomized_keeps_the_error_reduction_of_exact_svd(reports, iters: int) -> None:
    exact, randomized = reports["exact", iters].summary, reports["randomized", iters].summary
    kept = (randomized.mean_error_quant - randomized.mean_error) / (exact.mean_error_quant - exact.mean_error)
    assert kept >= 0.995
