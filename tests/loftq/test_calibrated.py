"""Calibrated conversions on generated models of every supported family and on MiniLM."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from loftq.adapter import ADAPTER_DIR, ADAPTER_WEIGHTS
from loftq.calibration_data import load_calibration
from loftq.converter import convert_directory
from loftq.errors import Cancelled, InvalidOptions, UnsupportedArchitecture
from loftq.options import CalibrationOptions, ConvertOptions
from loftq.plot import PLOT_NAME
from loftq.report import ProgressEvent
from loftq.storage import MANIFEST_NAME, REPORT_NAME

SMALL = {"samples": 8, "seq_len": 32, "eval_samples": 4, "batch_size": 4}
FAMILIES = ["calib_llama", "calib_mistral", "calib_qwen2", "calib_gemma", "calib_gemma2", "calib_gpt2", "calib_bert"]


def _options(calibration: dict | None = None, **fields: object) -> ConvertOptions:
    return ConvertOptions(calibration=CalibrationOptions(**{**SMALL, **(calibration or {})}), **fields)


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _causal(path: Path) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in _config(path).get("architectures", []))


def _held_out(path: Path, text: Path, options: ConvertOptions):
    config = _config(path)
    max_length = config.get("max_position_embeddings") or config.get("n_positions")
    data = load_calibration(text, path, options.calibration, packed=_causal(path), max_length=max_length)
    return list(data.evaluation.batches(options.calibration.batch_size))


def _load(path: Path, adapter: Path | None = None) -> torch.nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    model = (AutoModelForCausalLM if _causal(path) else AutoModel).from_pretrained(path, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    return model


@torch.no_grad()
def _perplexity(model: torch.nn.Module, batches) -> float:
    total = tokens = 0.0
    for ids, mask in batches:
        labels = ids.masked_fill(mask == 0, -100)
        count = int((labels[:, 1:] != -100).sum())
        total += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * count
        tokens += count
    return math.exp(total / tokens)


@torch.no_grad()
def _pooled(model: torch.nn.Module, batches) -> torch.Tensor:
    vectors = []
    for ids, mask in batches:
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask[..., None].float()
        vectors.append((hidden * weights).sum(1) / weights.sum(1))
    return torch.cat(vectors)


@pytest.mark.parametrize("fixture", FAMILIES)
def test_every_supported_family_converts_with_calibration(fixture: str, request: pytest.FixtureRequest, tmp_path: Path, calibration_text: Path) -> None:
    path = request.getfixturevalue(fixture)
    options = _options({"evaluate": True}, objective="activation")
    out = tmp_path / "out"
    report = convert_directory(path, out, options, calibration_data=calibration_text)

    manifest = {f["path"] for f in json.loads((out / MANIFEST_NAME).read_text())["files"]}
    assert {REPORT_NAME, PLOT_NAME, ADAPTER_WEIGHTS} <= manifest
    assert (out / PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.calibration is not None and report.calibration.sequences == SMALL["samples"]
    assert report.calibration.blocks == _config(path).get("num_hidden_layers", _config(path).get("n_layer"))
    assert {layer.objective for layer in report.layers} == {"activation"}
    for layer in report.layers:  # the fit never makes a layer's output worse than plain quantization
        assert layer.output_error is not None and layer.output_error < layer.output_error_quant * 1.001, layer.module

    evaluation = report.summary.evaluation
    assert evaluation is not None and evaluation.sequences == SMALL["eval_samples"]
    batches = _held_out(path, calibration_text, options)
    full = _load(path)
    if _causal(path):  # the streamed full-precision pass is the model's own
        assert evaluation.perplexity_full_precision == pytest.approx(_perplexity(full, batches), rel=1e-4)
    else:
        assert evaluation.perplexity_full_precision is None
    if _config(path).get("torch_dtype", _config(path).get("dtype")) == "float32":
        # fp32 storage loads back as exactly the fitted weights: the reported numbers are what a user gets
        initialised = _load(out, adapter=out / ADAPTER_DIR)
        if _causal(path):
            assert evaluation.perplexity_initialised == pytest.approx(_perplexity(initialised, batches), rel=1e-4)
        else:
            cosine = torch.nn.functional.cosine_similarity(_pooled(full, batches), _pooled(initialised.base_model.model, batches))
            assert evaluation.cosine_initialised == pytest.approx(float(cosine.mean()), abs=1e-5)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_weight_objective_with_calibration_writes_the_same_checkpoint(calib_llama: Path, tmp_path: Path, calibration_text: Path) -> None:
    plain = tmp_path / "plain"
    calibrated = tmp_path / "calibrated"
    convert_directory(calib_llama, plain, ConvertOptions())
    report = convert_directory(calib_llama, calibrated, _options({"evaluate": True}), calibration_data=calibration_text)
    written = [str(p.relative_to(plain)) for p in plain.rglob("*.safetensors")]
    assert len(written) > 2  # several model shards and the adapter
    for name in written:
        assert _sha256(plain / name) == _sha256(calibrated / name), name
    assert report.summary.evaluation is not None
    assert all(layer.output_error is not None for layer in report.layers)


def test_activation_objective_lowers_every_layers_output_error(calib_llama: Path, tmp_path: Path, calibration_text: Path) -> None:
    # With full-precision propagation both runs see the same inputs, hence the same metric.
    calibration = {"propagation": "full-precision"}
    weight = convert_directory(calib_llama, tmp_path / "w", _options(calibration), calibration_data=calibration_text)
    activation = convert_directory(calib_llama, tmp_path / "a", _options(calibration, objective="activation"), calibration_data=calibration_text)
    by_module = {layer.module: layer for layer in weight.layers}
    assert len(activation.layers) == len(by_module) > 0
    for layer in activation.layers:
        other = by_module[layer.module]
        assert layer.output_error_quant == pytest.approx(other.output_error_quant, rel=1e-6)
        assert layer.output_error < other.output_error, layer.module
        assert layer.objective_error == pytest.approx(layer.output_error, rel=1e-5)


def test_diagonal_objective_is_recorded_per_layer(calib_gpt2: Path, tmp_path: Path, calibration_text: Path) -> None:
    report = convert_directory(calib_gpt2, tmp_path / "out", _options(objective="activation-diag"), calibration_data=calibration_text)
    assert {layer.objective for layer in report.layers} == {"activation-diag"}
    assert report.summary.objective == "activation-diag"
    assert report.summary.mean_objective_error < report.summary.mean_objective_error_quant


def test_progress_reports_blocks_and_each_fitted_layer(calib_mistral: Path, tmp_path: Path, calibration_text: Path) -> None:
    events: list[ProgressEvent] = []
    report = convert_directory(calib_mistral, tmp_path / "out", _options(objective="activation"), calibration_data=calibration_text, on_progress=events.append)
    calibration = [e for e in events if e.stage == "calibration"]
    assert [e.blocks_done for e in calibration if e.layer is None] == [0, 1, 2]
    assert {e.blocks_total for e in calibration} == {2}
    assert len([e for e in calibration if e.layer is not None]) == len(report.layers)
    assert not [e for e in events if e.stage == "layer"]  # layers are not reported twice
    assert events[-1].stage == "done"


def test_objectives_that_need_data_are_refused_without_it(calib_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidOptions, match="calibration data"):
        convert_directory(calib_llama, tmp_path / "a", _options(objective="activation"))
    with pytest.raises(InvalidOptions, match="evaluate measures .* needs calibration data"):
        convert_directory(calib_llama, tmp_path / "b", _options({"evaluate": True}))
    assert not (tmp_path / "a" / MANIFEST_NAME).exists()


def test_unsupported_architecture_is_refused_before_writing(tmp_path: Path, calibration_text: Path, bpe_tokenizer_dir: Path) -> None:
    from conftest import add_tokenizer
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=1, num_heads=4, vocab_size=520)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    add_tokenizer(tmp_path / "t5", bpe_tokenizer_dir)
    out = tmp_path / "out"
    with pytest.raises(UnsupportedArchitecture, match="'t5'"):
        convert_directory(tmp_path / "t5", out, _options(objective="activation"), calibration_data=calibration_text)
    assert not out.exists() or not any(out.iterdir())


def test_cancelled_while_calibrating_leaves_no_manifest(calib_qwen2: Path, tmp_path: Path, calibration_text: Path) -> None:
    events: list[ProgressEvent] = []
    out = tmp_path / "out"
    with pytest.raises(Cancelled):
        convert_directory(
            calib_qwen2,
            out,
            _options(objective="activation"),
            calibration_data=calibration_text,
            on_progress=events.append,
            should_stop=lambda: any(e.stage == "calibration" and e.blocks_done == 1 for e in events),
        )
    assert not (out / MANIFEST_NAME).exists()


@pytest.mark.slow
def test_minilm_embeddings_are_closest_with_the_activation_objective(minilm: Path, tmp_path: Path, calibration_text: Path) -> None:
    """The real model, held-out sentences: activation LoftQ > weight LoftQ > plain NF4 (cosine to full precision)."""
    calibration = {"samples": 128, "seq_len": 64, "eval_samples": 48, "batch_size": 16, "evaluate": True}
    results = {}
    for objective in ("weight", "activation"):
        options = _options(calibration, objective=objective, rank=16, lora_alpha=32)
        report = convert_directory(minilm, tmp_path / objective, options, calibration_data=calibration_text)
        results[objective] = report.summary.evaluation
    weight, activation = results["weight"], results["activation"]
    assert weight.cosine_quantized == pytest.approx(activation.cosine_quantized, abs=1e-6)  # same plain NF4
    assert activation.cosine_initialised > weight.cosine_initialised > weight.cosine_quantized
    assert activation.gap_recovered > 0.4


def test_interrupted_calibrated_conversion_resumes_to_the_same_checkpoint(calib_llama: Path, tmp_path: Path, calibration_text: Path) -> None:
    options = _options(objective="activation")
    reference = tmp_path / "reference"
    convert_directory(calib_llama, reference, options, calibration_data=calibration_text)
    out = tmp_path / "out"
    events: list[ProgressEvent] = []
    with pytest.raises(Cancelled):  # stopped while writing the shards, after the calibration pass
        convert_directory(
            calib_llama,
            out,
            options,
            calibration_data=calibration_text,
            on_progress=events.append,
            should_stop=lambda: any(e.stage == "shard" for e in events),
        )
    assert not (out / MANIFEST_NAME).exists()
    report = convert_directory(calib_llama, out, options, calibration_data=calibration_text)
    assert report.summary.shards_resumed >= 1
    for path in reference.rglob("*.safetensors"):
        assert _sha256(path) == _sha256(out / path.relative_to(reference)), path.name
    assert report.summary.mean_output_error is not None
    assert report.summary.mean_output_error < report.summary.mean_output_error_quant
