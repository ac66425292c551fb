"""Calibrated conversions: memory release, the bnb-4bit backbone, legacy checkpoint names."""

from __future__ import annotations

import gc
import hashlib
import math
import weakref
from pathlib import Path

import pytest
import torch

from loftq.calibrated import CalibratedConversion, _SecondMoments
from loftq.converter import convert_directory
from loftq.options import CalibrationOptions, ConvertOptions

SMALL = {"samples": 8, "seq_len": 32, "eval_samples": 4, "batch_size": 4}


def _options(calibration: dict | None = None, **fields: object) -> ConvertOptions:
    return ConvertOptions(calibration=CalibrationOptions(**{**SMALL, **(calibration or {})}), **fields)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bnb_4bit_backbone_with_calibration_writes_the_weight_space_checkpoint(
    calib_gpt2: Path, tmp_path: Path, calibration_text: Path
) -> None:
    """The scratch store keeps the packed tensors (codes, absmax, quant_map, quant state) as the
    shard writer would have written them: objective=weight gives the same bytes either way."""
    options = ConvertOptions(backbone_format="bnb-4bit")
    convert_directory(calib_gpt2, tmp_path / "plain", options)
    report = convert_directory(
        calib_gpt2, tmp_path / "calibrated", _options(backbone_format="bnb-4bit"), calibration_data=calibration_text
    )
    written = [p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*.safetensors")]
    assert written
    for name in written:
        assert _sha256(tmp_path / "plain" / name) == _sha256(tmp_path / "calibrated" / name), name
    assert all(layer.output_error is not None for layer in report.layers)


def test_second_moments_release_the_batch_inputs_when_removed() -> None:
    """With a single batch, the inputs held for grouping must not outlive the pass (they would
    stay alive through every fit of the block)."""
    layers = {"a": torch.nn.Linear(8, 4), "b": torch.nn.Linear(8, 4)}
    moments = _SecondMoments(layers)
    x = torch.randn(2, 3, 8)
    moments.new_batch(torch.ones(2, 3))
    for layer in layers.values():
        layer(x)
    moments.remove()
    alive = weakref.ref(x)
    del x
    gc.collect()
    assert alive() is None
    assert moments.get("a") is moments.get("b")  # q/k/v-style sharing still found


def _conversion(path: Path, options: ConvertOptions, scratch: Path) -> CalibratedConversion:
    from loftq.backbone import Backbone
    from loftq.converter import plan
    from loftq.quantizers import get_quantizer
    from loftq.storage import LocalSource

    source = LocalSource(path)
    checkpoint, config, layout = plan(source, options)
    backbone = Backbone(options, get_quantizer(options.quant, options.bits, options.blocksize))
    scratch.mkdir()
    return CalibratedConversion(source, checkpoint, config, layout, backbone, torch.device("cpu"), scratch)


@pytest.mark.parametrize("propagation", ["initialised", "full-precision"])
def test_block_inputs_are_released_once_the_block_is_done(
    propagation: str, calib_mistral: Path, tmp_path: Path, calibration_text: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Peak memory holds each stream once: block 0's input states of the calibration and the
    held-out streams are gone when block 1 starts."""
    options = _options({"evaluate": True, "propagation": propagation}, objective="activation")
    conversion = _conversion(calib_mistral, options, tmp_path / "fits")
    captured: list[weakref.ref] = []
    capture = CalibratedConversion._capture

    def recording(self: CalibratedConversion, sequences) -> object:
        stream = capture(self, sequences)
        captured.extend(weakref.ref(h) for h in stream.hidden)
        return stream

    monkeypatch.setattr(CalibratedConversion, "_capture", recording)
    alive_at_block_1: list[int] = []

    def on_block(done: int, total: int) -> None:
        if done == 1:
            gc.collect()
            alive_at_block_1.append(sum(ref() is not None for ref in captured))

    data = conversion.load_data(calibration_text, calib_mistral)
    conversion.run(data, on_layer=lambda layer: None, on_block=on_block, should_stop=lambda: False)
    assert len(captured) == 3  # two calibration batches, one held-out batch
    assert alive_at_block_1 == [0]


def test_legacy_layernorm_names_are_read_as_transformers_reads_them(
    calib_bert: Path, tmp_path: Path, calibration_text: Path
) -> None:
    """Old BERT checkpoints store LayerNorm.gamma/beta (transformers renames them to weight/bias
    on load); the streamed model must find them instead of calling the checkpoint corrupt."""
    import shutil

    from safetensors.torch import load_file, save_file

    legacy = tmp_path / "legacy"
    shutil.copytree(calib_bert, legacy)
    for shard in legacy.glob("*.safetensors"):
        tensors = load_file(shard)
        renamed = {
            key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): value
            for key, value in tensors.items()
        }
        assert renamed.keys() != tensors.keys()
        save_file(renamed, shard, metadata={"format": "pt"})
    options = _options(objective="activation")
    expected = convert_directory(calib_bert, tmp_path / "a", options, calibration_data=calibration_text)
    report = convert_directory(legacy, tmp_path / "b", options, calibration_data=calibration_text)
    assert [layer.output_error for layer in report.layers] == [layer.output_error for layer in expected.layers]


def test_no_shard_stays_open_after_a_cancelled_calibration_pass(
    calib_mistral: Path, tmp_path: Path, calibration_text: Path
) -> None:
    """For object storage every open shard is a downloaded copy on scratch disk: one left open
    by a failed or cancelled job (or by bad calibration data, found after the model is built)
    stays there as long as the exception's traceback is kept."""
    import contextlib

    from loftq.backbone import Backbone
    from loftq.converter import plan
    from loftq.errors import Cancelled
    from loftq.quantizers import get_quantizer
    from loftq.storage import LocalSource

    opened: list[str] = []

    class Tracking(LocalSource):
        @contextlib.contextmanager
        def open_local(self, name: str):
            opened.append(name)
            try:
                with super().open_local(name) as path:
                    yield path
            finally:
                opened.remove(name)

    options = _options(objective="activation")
    source = Tracking(calib_mistral)
    checkpoint, config, layout = plan(source, options)
    backbone = Backbone(options, get_quantizer(options.quant, options.bits, options.blocksize))
    (tmp_path / "fits").mkdir()
    conversion = CalibratedConversion(source, checkpoint, config, layout, backbone, torch.device("cpu"), tmp_path / "fits")
    assert opened == []
    data = conversion.load_data(calibration_text, calib_mistral)
    done: list[int] = []
    with pytest.raises(Cancelled) as raised:
        conversion.run(data, on_layer=lambda layer: None, on_block=lambda d, t: done.append(d), should_stop=lambda: len(done) > 1)
    assert raised.value is not None and opened == []


def test_second_moments_do_not_copy_inputs_of_an_unpadded_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoder windows have no padding: selecting the real rows with a boolean mask would copy
    every layer input (≈2 GB for a 70B down_proj at 8×2048 tokens) and sync the device."""
    from loftq import calibrated

    seen: list[torch.Tensor] = []
    accumulate = calibrated.accumulate_hessian

    def recording(h, x, count=0):
        seen.append(x)
        return accumulate(h, x, count)

    monkeypatch.setattr(calibrated, "accumulate_hessian", recording)
    layer = torch.nn.Linear(8, 4)
    moments = _SecondMoments({"a": layer})
    x = torch.randn(2, 3, 8)
    moments.new_batch(torch.ones(2, 3, dtype=torch.int64))
    layer(x)
    padded = torch.ones(2, 3, dtype=torch.int64)
    padded[1, 2] = 0
    moments.new_batch(padded)
    layer(x)
    moments.remove()
    assert seen[0] is x
    assert seen[1].shape == (5, 8)  # padding still excluded
    rows = torch.cat([x.reshape(-1, 8), x[padded.bool()]])
    torch.testing.assert_close(moments.get("a"), rows.T @ rows / rows.shape[0])


@pytest.mark.parametrize(("propagation", "kept"), [("full-precision", set()), ("initialised", set())])
def test_fitted_copies_are_kept_only_when_something_runs_on_them(
    propagation: str, kept: set[str], calib_mistral: Path, tmp_path: Path, calibration_text: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No fitted copy outlives its layer's fit as a tensor of its own: with full-precision
    propagation and no evaluate it is dropped, with initialised propagation it becomes the
    layer's parameter in place of the full-precision weight (so the block is held once)."""
    options = _options({"propagation": propagation}, objective="activation")
    conversion = _conversion(calib_mistral, options, tmp_path / "fits")
    refs: list[tuple[str, weakref.ref]] = []
    alive: set[str] = set()
    fit = CalibratedConversion._fit

    def recording(self: CalibratedConversion, target, h, block):
        gc.collect()
        alive.update(name for name, ref in refs if ref() is not None)
        effective, parts = fit(self, target, h, block)
        refs.append(("effective", weakref.ref(effective)))
        refs.append(("q_loaded", weakref.ref(parts[0])))  # kept only for refinement
        return effective, parts

    def on_block(done: int, total: int) -> None:
        refs.clear()

    monkeypatch.setattr(CalibratedConversion, "_fit", recording)
    data = conversion.load_data(calibration_text, calib_mistral)
    conversion.run(data, on_layer=lambda layer: None, on_block=on_block, should_stop=lambda: False)
    assert alive == kept


def _qwen3(ids: dict[str, int]) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "max_position_embeddings": 128}
    config = Qwen3Config(**ids, **shape, num_attention_heads=8, num_key_value_heads=4, head_dim=16, tie_word_embeddings=True)
    return Qwen3ForCausalLM(config)


def _gemma3_text(ids: dict[str, int]) -> torch.nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "max_position_embeddings": 128}
    config = Gemma3TextConfig(
        **ids, **shape, num_attention_heads=8, num_key_value_heads=4, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=16, layer_types=["sliding_attention", "full_attention"],
    )
    return Gemma3ForCausalLM(config)


@pytest.mark.parametrize("build", [_qwen3, _gemma3_text], ids=["qwen3", "gemma3_text"])
def test_the_other_supported_families_stream_as_the_full_model(
    build, tmp_path: Path, bpe_tokenizer_dir: Path, calibration_text: Path
) -> None:
    """qwen3 and gemma3_text are in SUPPORTED_MODEL_TYPES; the streamed perplexity is the model's own."""
    from conftest import _calibrated_checkpoint, _token_ids
    from transformers import AutoModelForCausalLM

    from loftq.calibration_data import load_calibration

    torch.manual_seed(17)
    path = _calibrated_checkpoint(tmp_path / "model", build(_token_ids(bpe_tokenizer_dir)), bpe_tokenizer_dir)
    options = _options({"evaluate": True}, objective="activation")
    report = convert_directory(path, tmp_path / "out", options, calibration_data=calibration_text)
    data = load_calibration(calibration_text, path, options.calibration, packed=True, max_length=128)
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    total = tokens = 0.0
    with torch.no_grad():
        for ids, mask in data.evaluation.batches(options.calibration.batch_size):
            count = int(mask[:, 1:].sum())
            total += float(full(input_ids=ids, attention_mask=mask, labels=ids).loss) * count
            tokens += count
    assert report.summary.evaluation.perplexity_full_precision == pytest.approx(math.exp(total / tokens), rel=1e-4)
    assert all(layer.output_error < layer.output_error_quant for layer in report.layers)
