from __future__ import annotations

import math
import subprocess
import sys

import pytest
from pydantic import ValidationError

from loftq.options import CalibrationNeed, ConvertOptions
from loftq.quantizers import QUANTIZERS


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


def test_options_import_without_torch() -> None:
    """The job API validates requests with these options and never imports torch."""
    code = "import sys, loftq.options; assert not any(m.split('.')[0] == 'torch' for m in sys.modules), 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_options_accept_exactly_the_registered_quantizers() -> None:
    assert ConvertOptions.model_json_schema()["properties"]["quant"]["enum"] == list(QUANTIZERS)
    for name, spec in QUANTIZERS.items():
        assert ConvertOptions(quant=name).bits == (spec.fixed_bits or 4)  # bits left out: the format's own, else the default
        for bits in spec.bits:
            assert ConvertOptions(quant=name, bits=bits).bits == bits
    packable = {name for name, spec in QUANTIZERS.items() if spec.bnb_4bit}
    assert packable == {"nf4", "fp4"}
    for name in QUANTIZERS.keys() - packable:
        with pytest.raises(ValidationError, match="needs quant nf4 or fp4"):
            ConvertOptions(quant=name, backbone_format="bnb-4bit")


@pytest.mark.parametrize(
    ("options", "need", "reason"),
    [
        ({}, None, None),
        ({"refinement": {"steps": 5}}, None, None),  # refinement settings alone do not switch it on
        (
            {"objective": "activation"},
            CalibrationNeed("objective", "activation", "fits each layer in the metric of its calibration inputs"),
            "objective='activation' fits each layer in the metric of its calibration inputs",
        ),
        (
            {"refine": "block+model"},
            CalibrationNeed("refine", "block+model", "refines the adapters on calibration text"),
            "refine='block+model' refines the adapters on calibration text",
        ),
        (
            {"calibration": {"evaluate": True}},
            CalibrationNeed("calibration.evaluate", None, "measures the model on held-out calibration text"),
            "evaluate measures the model on held-out calibration text",
        ),
    ],
)
def test_calibration_need_names_the_option_by_its_path(options: dict, need: CalibrationNeed | None, reason: str | None) -> None:
    """``field`` is a path into the options, so a front end can name it its own way; the reason is the same rule in one sentence."""
    converted = ConvertOptions(**options)
    assert converted.calibration_need == need
    assert converted.calibration_reason == reason
    if need is not None:
        group, _, name = need.field.rpartition(".")
        assert name in type(getattr(converted, group) if group else converted).model_fields
