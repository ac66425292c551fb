from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from loftq.options import ConvertOptions


def test_defaults() -> None:
    options = ConvertOptions()
    assert (options.quant, options.bits, options.rank, options.iters, options.svd) == ("nf4", 4, 16, 1, "randomized")
    assert options.target_modules == "all-linear"
    assert options.lora_alpha == options.rank and options.scaling == 1.0


def test_alpha_defaults_to_rank_and_sets_scaling() -> None:
    assert ConvertOptions(rank=8).lora_alpha == 8
    assert ConvertOptions(rank=8, lora_alpha=32).scaling == 4.0
    assert ConvertOptions(rank=16, lora_alpha=8, use_rslora=True).scaling == pytest.approx(8 / math.sqrt(16))


@pytest.mark.parametrize(
    "bad",
    [
        {"rank": 0},
        {"iters": 0},
        {"lora_alpha": -1},
        {"quant": "nf4", "bits": 3},
        {"quant": "int8", "bits": 4},
        {"quant": "int", "bits": 9},
        {"quant": "q5"},
        {"svd": "qr"},
        {"backbone_format": "bnb-4bit", "quant": "int8", "bits": 8},
        {"target_modules": []},
        {"target_modules": ""},
        {"unknown_option": 1},
    ],
)
def test_invalid_options_are_rejected(bad: dict) -> None:
    with pytest.raises(ValidationError):
        ConvertOptions(**bad)


def test_evaluate_needs_held_out_sequences() -> None:
    from loftq.options import CalibrationOptions

    with pytest.raises(ValidationError, match="eval_samples must be at least 1"):
        CalibrationOptions(evaluate=True, eval_samples=0)
    assert CalibrationOptions(evaluate=False, eval_samples=0).eval_samples == 0


@pytest.mark.parametrize("field, value", [("svd_oversample", 1025), ("svd_power_iters", 65)])
def test_solver_sizes_are_bounded(field: str, value: int) -> None:
    """One request must not buy unbounded work: a Krylov space of 10^9 columns or products."""
    with pytest.raises(ValidationError, match=field):
        ConvertOptions(**{field: value})
    ConvertOptions(**{field: value - 1})
