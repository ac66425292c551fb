"""Refinement of the closed-form adapters: the block stage, the model stage, and what they keep."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from loftq import model_refine
from loftq.adapter import ADAPTER_DIR
from loftq.converter import convert_directory
from loftq.errors import Cancelled, InsufficientMemory, InvalidOptions
from loftq.options import CalibrationOptions, ConvertOptions, RefineOptions
from loftq.refine import Batch, BlockAdapters, balanced, refine_block
from loftq.report import ProgressEvent
from loftq.storage import MANIFEST_NAME

SMALL = {"samples": 12, "seq_len": 32, "eval_samples": 4, "batch_size": 4}
FAST = {"steps": 12, "batch_size": 2, "holdout": 0.25, "model_steps": 3}


def _options(refine: str = "block", calibration: dict | None = None, refinement: dict | None = None, **fields: object) -> ConvertOptions:
    return ConvertOptions(
        objective="activation",
        refine=refine,
        refinement=RefineOptions(**{**FAST, **(refinement or {})}),
        calibration=CalibrationOptions(**{**SMALL, **(calibration or {})}),
        **fields,
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- units


def test_balanced_keeps_the_product_and_splits_it_evenly() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4, 24, generator=generator) * 10
    b = torch.randn(16, 4, generator=generator) * 0.01
    new_a, new_b = balanced(a, b)
    torch.testing.assert_close(new_b @ new_a, b @ a, rtol=1e-4, atol=1e-6)
    assert torch.linalg.matrix_norm(new_a) == pytest.approx(float(torch.linalg.matrix_norm(new_b)), rel=1e-4)


class _Block(nn.Module):
    """Two layers and a non-linearity: what a block's adapters must cancel jointly."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16, bias=False)
        self.down = nn.Linear(16, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _toy(noisy_train: bool) -> tuple[BlockAdapters, list[Batch], list[Batch]]:
    torch.manual_seed(0)
    reference, block = _Block(), _Block()
    with torch.no_grad():  # the "quantized" block: a perturbed copy, as Q is of W
        for ref, param in zip(reference.parameters(), block.parameters()):
            param.copy_(ref + 0.05 * torch.randn_like(ref))
    for param in block.parameters():
        param.requires_grad_(False)
    adapters = BlockAdapters(
        {"up": block.up, "down": block.down}, {"up": (torch.zeros(2, 8), torch.zeros(16, 2)), "down": (torch.zeros(2, 16), torch.zeros(8, 2))}, 1.0
    )
    # Adapters of zero cannot move (both factors zero): start from small random ones.
    for a, b in adapters.params.values():
        a.data.normal_(0, 0.01)
        b.data.normal_(0, 0.01)

    def batch(seed: int, noise: float) -> Batch:
        x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            target = reference(x) + noise * torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(seed + 100))
        return Batch(lambda: block(x), target, None)

    train = [batch(s, 5.0 if noisy_train else 0.0) for s in range(4)]
    heldout = [batch(s, 0.0) for s in range(10, 12)]
    return adapters, train, heldout


def test_block_refinement_is_accepted_when_it_lowers_the_held_out_error() -> None:
    adapters, train, heldout = _toy(noisy_train=False)
    report, refined = refine_block(0, adapters, train, heldout, RefineOptions(steps=200, lr=0.3), seed=0)
    assert report.accepted and refined is not None
    assert report.heldout_refined < 0.9 * report.heldout_closed_form
    assert report.gain > 0.1
    assert report.steps == 200


def test_block_refinement_that_only_fits_its_training_batches_is_rejected() -> None:
    # Targets of the training batches are noise: the steps fit them, the held-out error grows.
    adapters, train, heldout = _toy(noisy_train=True)
    report, refined = refine_block(0, adapters, train, heldout, RefineOptions(steps=200, lr=1.0), seed=0)
    assert not report.accepted and refined is None
    assert report.heldout_refined >= report.heldout_closed_form


# --------------------------------------------------------------------------- conversions


@pytest.fixture(scope="module")
def refined_llama(calib_llama: Path, calibration_text: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("refined")
    closed = tmp_path_factory.mktemp("closed")
    options = _options(calibration={"evaluate": True})
    report = convert_directory(calib_llama, out, options, calibration_data=calibration_text)
    baseline = convert_directory(calib_llama, closed, options.model_copy(update={"refine": "none"}), calibration_data=calibration_text)
    return out, closed, options, report, baseline


def test_refined_conversion_reports_every_block_and_never_a_worse_one(refined_llama, calib_llama: Path) -> None:
    out, _, options, report, _ = refined_llama
    refinement = report.refinement
    assert refinement is not None and refinement.mode == "block"
    blocks = len({layer.block for layer in report.layers if layer.block is not None})
    assert [b.block for b in refinement.blocks] == list(range(blocks))
    assert refinement.heldout_sequences == 3  # a quarter of 12
    for block in refinement.blocks:
        assert block.steps == FAST["steps"]
        if block.accepted:
            assert block.heldout_refined < block.heldout_closed_form
    accepted = {b.block for b in refinement.blocks if b.accepted}
    assert accepted, "on this model the steps lower the held-out error of some block"
    assert {layer.block for layer in report.layers if layer.refined} == accepted
    saved = (out / "loftq_report.json").read_text()
    assert '"blocks_accepted": %d' % len(accepted) in saved


def test_refinement_changes_only_the_adapters(refined_llama) -> None:
    out, closed, _, report, _ = refined_llama
    shards = [p for p in closed.glob("*.safetensors")]
    assert shards
    for shard in shards:  # Q is what the closed form stored: the backbone is byte for byte the same
        assert _sha256(shard) == _sha256(out / shard.name), shard.name
    adapter = next((closed / ADAPTER_DIR).glob("*.safetensors"))
    assert _sha256(adapter) != _sha256(out / ADAPTER_DIR / adapter.name)


def test_refined_checkpoint_loads_as_reported(refined_llama, calib_llama: Path, calibration_text: Path) -> None:
    """The held-out perplexity the report gives is the loaded checkpoint's, and each refined
    layer's error is its loaded W − (Q + scaling·B·A)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loftq.calibration_data import load_calibration

    out, _, options, report, baseline = refined_llama
    data = load_calibration(calibration_text, calib_llama, options.calibration, packed=True, max_length=None)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(model, out / ADAPTER_DIR).eval()
    total = tokens = 0.0
    with torch.no_grad():
        for ids, mask in data.evaluation.batches(4):
            count = int(mask[:, 1:].sum())
            total += float(model(input_ids=ids, attention_mask=mask, labels=ids).loss) * count
            tokens += count
    evaluation = report.summary.evaluation
    assert evaluation.perplexity_initialised == pytest.approx(math.exp(total / tokens), rel=1e-4)
    assert evaluation.perplexity_quantized == pytest.approx(baseline.summary.evaluation.perplexity_quantized, rel=1e-6)

    original = dict(AutoModelForCausalLM.from_pretrained(calib_llama, dtype=torch.float32).named_modules())
    loaded = dict(model.base_model.model.named_modules())
    checked = 0
    for layer in report.layers:
        if not layer.refined:
            continue
        lora = loaded[layer.module]
        q = lora.base_layer.weight.float()
        delta = options.scaling * lora.lora_B["default"].weight.detach() @ lora.lora_A["default"].weight.detach()
        w = original[layer.module].weight.float()
        assert float(torch.linalg.matrix_norm(w - q - delta) / torch.linalg.matrix_norm(w)) == pytest.approx(layer.error, rel=1e-4)
        checked += 1
    assert checked > 0


def test_refined_conversion_resumes_to_the_same_checkpoint(refined_llama, calib_llama: Path, calibration_text: Path, tmp_path: Path) -> None:
    reference, _, options, _, _ = refined_llama
    out = tmp_path / "out"
    events: list[ProgressEvent] = []
    with pytest.raises(Cancelled):
        convert_directory(
            calib_llama, out, options, calibration_data=calibration_text, on_progress=events.append,
            should_stop=lambda: any(e.stage == "shard" for e in events),
        )
    report = convert_directory(calib_llama, out, options, calibration_data=calibration_text)
    assert report.summary.shards_resumed >= 1
    for path in reference.rglob("*.safetensors"):
        assert _sha256(path) == _sha256(out / path.relative_to(reference)), path.name


def test_cancel_during_refinement_stops_the_conversion(calib_llama: Path, calibration_text: Path, tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    with pytest.raises(Cancelled):
        convert_directory(
            calib_llama, tmp_path / "out", _options(refinement={"steps": 400}), calibration_data=calibration_text,
            on_progress=events.append, should_stop=lambda: any(e.layer is not None for e in events),
        )
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


@pytest.mark.parametrize("fixture", ["calib_llama", "calib_bert"])
def test_model_stage_trains_all_adapters_and_reports_its_loss(fixture: str, request: pytest.FixtureRequest, calibration_text: Path, tmp_path: Path) -> None:
    path = request.getfixturevalue(fixture)
    report = convert_directory(
        path, tmp_path / "out", _options("block+model", calibration={"evaluate": True}), calibration_data=calibration_text
    )
    model = report.refinement.model
    assert model is not None and model.steps == FAST["model_steps"]
    assert model.loss == ("kl" if fixture == "calib_llama" else "hidden-mse")
    assert math.isfinite(model.heldout_before) and model.heldout_before > 0
    assert model.accepted == (model.heldout_after < model.heldout_before)
    assert (tmp_path / "out" / MANIFEST_NAME).is_file()


def test_block_target_with_the_model_stage_keeps_both_goals(calib_qwen2: Path, calibration_text: Path, tmp_path: Path) -> None:
    """Target 'block' matches the full-precision block on the propagated inputs while the model
    stage still gets the full-precision stream as its teacher."""
    report = convert_directory(
        calib_qwen2, tmp_path / "out", _options("block+model", refinement={"target": "block"}), calibration_data=calibration_text
    )
    refinement = report.refinement
    assert len(refinement.blocks) == 2 and all(b.heldout_closed_form > 0 for b in refinement.blocks)
    assert refinement.model is not None and refinement.model.heldout_before > 0


def test_model_stage_that_cannot_fit_is_refused_before_anything_is_written(
    calib_llama: Path, calibration_text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_refine, "available_memory", lambda: 1 << 20)
    with pytest.raises(InsufficientMemory, match=r"needs about .* GiB .* refine='block'") as raised:
        convert_directory(calib_llama, tmp_path / "out", _options("model"), calibration_data=calibration_text)
    assert raised.value.code == "out_of_memory"
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_refinement_needs_calibration_data(calib_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidOptions, match="refine='block'.*needs calibration data"):
        convert_directory(calib_llama, tmp_path / "out", ConvertOptions(refine="block"))


def test_one_calibration_sequence_keeps_the_closed_form_with_a_warning(calib_llama: Path, calibration_text: Path, tmp_path: Path) -> None:
    report = convert_directory(
        calib_llama, tmp_path / "out", _options(calibration={"samples": 1, "eval_samples": 0}), calibration_data=calibration_text
    )
    assert report.refinement is not None and report.refinement.blocks == []
    assert any("at least 2 calibration sequences" in w for w in report.warnings)


@pytest.mark.parametrize("fixture", ["calib_gpt2", "calib_bert", "calib_gemma2"])
def test_block_refinement_runs_on_every_family(fixture: str, request: pytest.FixtureRequest, calibration_text: Path, tmp_path: Path) -> None:
    path = request.getfixturevalue(fixture)
    options = ConvertOptions(
        objective="activation",
        refine="block",
        refinement=RefineOptions(steps=8, batch_size=2, holdout=0.25),
        calibration=CalibrationOptions(samples=8, seq_len=32, eval_samples=4, batch_size=4, evaluate=True),
    )
    report = convert_directory(path, tmp_path / "out", options, calibration_data=calibration_text)
    assert (tmp_path / "out" / MANIFEST_NAME).is_file()
    refinement = report.refinement
    assert refinement is not None and refinement.blocks
    for block in refinement.blocks:
        assert block.heldout_closed_form > 0 and (not block.accepted or block.heldout_refined < block.heldout_closed_form)
    for layer in report.layers:
        if layer.refined:  # a refined layer's errors are recomputed from W, Q and the refined adapters
            assert 0 < layer.error < 1 and layer.output_error is not None
