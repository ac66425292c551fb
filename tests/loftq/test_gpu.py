"""The same engine on CUDA: selected by device, no separate code path. Runs where CUDA exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loftq import ConvertOptions, convert_directory
from loftq.quantizers import get_quantizer

pytestmark = pytest.mark.gpu


def test_quantizers_give_the_same_codes_on_cuda() -> None:
    weight = torch.randn(384, 1536)
    for quant, bits in [("nf4", 4), ("fp4", 4), ("int8", 8), ("int", 3), ("nf3", 3)]:
        quantizer = get_quantizer(quant, bits)
        on_cpu, on_gpu = quantizer.quantize(weight), quantizer.quantize(weight.cuda())
        assert torch.equal(on_cpu.codes, on_gpu.codes.cpu()), quant
        assert torch.equal(on_cpu.scales, on_gpu.scales.cpu()), quant


def test_conversion_on_cuda_matches_cpu(tiny_llama: Path, tmp_path: Path) -> None:
    options = ConvertOptions(rank=8, iters=3, svd="exact")
    on_cpu = convert_directory(tiny_llama, tmp_path / "cpu", options.model_copy(update={"device": "cpu"}))
    on_gpu = convert_directory(tiny_llama, tmp_path / "gpu", options.model_copy(update={"device": "cuda"}))
    assert on_gpu.device.startswith("cuda") and on_gpu.summary.peak_device_mb is not None
    for cpu_layer, gpu_layer in zip(on_cpu.layers, on_gpu.layers):
        assert gpu_layer.error == pytest.approx(cpu_layer.error, rel=1e-3)


def test_calibrated_conversion_on_cuda_matches_cpu(calib_mistral: Path, tmp_path: Path, calibration_text: Path) -> None:
    from loftq.options import CalibrationOptions

    calibration = CalibrationOptions(samples=8, seq_len=32, eval_samples=4, batch_size=4, evaluate=True)
    options = ConvertOptions(rank=8, svd="exact", objective="activation", calibration=calibration)
    reports = {
        device: convert_directory(calib_mistral, tmp_path / device, options.model_copy(update={"device": device}), calibration_data=calibration_text)
        for device in ("cpu", "cuda")
    }
    cpu, gpu = reports["cpu"], reports["cuda"]
    assert gpu.device.startswith("cuda")
    for cpu_layer, gpu_layer in zip(cpu.layers, gpu.layers):
        assert gpu_layer.output_error == pytest.approx(cpu_layer.output_error, rel=1e-2)
    assert gpu.summary.evaluation.perplexity_initialised == pytest.approx(cpu.summary.evaluation.perplexity_initialised, rel=1e-3)


def test_refined_conversion_on_cuda(calib_mistral: Path, tmp_path: Path, calibration_text: Path) -> None:
    """Both refinement stages run on the device; no block is kept unless it is better held out."""
    from loftq.options import CalibrationOptions, RefineOptions

    calibration = CalibrationOptions(samples=12, seq_len=32, eval_samples=4, batch_size=4, evaluate=True)
    options = ConvertOptions(
        rank=8, objective="activation", device="cuda", calibration=calibration, refine="block+model",
        refinement=RefineOptions(steps=10, batch_size=2, holdout=0.25, model_steps=3),
    )
    report = convert_directory(calib_mistral, tmp_path / "out", options, calibration_data=calibration_text)
    assert report.device.startswith("cuda")
    refinement = report.refinement
    assert refinement is not None and refinement.blocks and refinement.model is not None
    for block in refinement.blocks:
        assert not block.accepted or block.heldout_refined < block.heldout_closed_form
    assert (tmp_path / "out" / "manifest.json").is_file()
