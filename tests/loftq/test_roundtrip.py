"""LoftQ checkpoints through the real loaders: transformers, bitsandbytes and PEFT (README "The LoftQ checkpoint")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loftq import ConvertOptions, convert_directory
from loftq.quantizers import get_quantizer, pack_4bit

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

NF4 = get_quantizer("nf4", 4)
BNB_CONFIG = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False)
MODELS = {  # fixture -> loader class
    "tiny_llama": "AutoModelForCausalLM",
    "tiny_bert": "AutoModel",
    "tiny_gpt2": "AutoModelForCausalLM",
    "minilm": "AutoModel",
}


def _load(path: Path, loader: str, **kwargs) -> torch.nn.Module:
    return getattr(transformers, loader).from_pretrained(str(path), **kwargs).eval()


def _lora_layers(model: torch.nn.Module):
    """(module name as in the checkpoint, LoRA layer) for every adapted module."""
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_A:
            yield name.removeprefix("base_model.model."), module


def _out_in(module: torch.nn.Module) -> torch.Tensor:
    """A full-precision module's weight in PEFT's out×in orientation, fp32."""
    weight = module.weight.detach().float()
    return weight.T if isinstance(module, transformers.pytorch_utils.Conv1D) else weight


def _dequantized(layer: torch.nn.Module) -> torch.Tensor:
    weight = layer.weight
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()


def _relative_error(w: torch.Tensor, approx: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w - approx.detach()) / torch.linalg.matrix_norm(w))


@pytest.fixture(scope="module", params=list(MODELS))
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    source = request.getfixturevalue(request.param)
    out = tmp_path_factory.mktemp(f"{request.param}-loftq")
    options = ConvertOptions(rank=8, lora_alpha=24, iters=2)
    report = convert_directory(source, out, options)
    return source, out, MODELS[request.param], options, report


def test_full_precision_load_gives_q_plus_scaled_adapters(converted) -> None:
    source, out, loader, options, report = converted
    original = dict(_load(source, loader).named_modules())
    backbone = _load(out, loader)
    model = peft.PeftModel.from_pretrained(backbone, str(out), subfolder="loftq_init", is_trainable=True)
    reported = {layer.module: layer for layer in report.layers}
    seen = set()
    for name, layer in _lora_layers(model):
        seen.add(name)
        assert layer.scaling["default"] == pytest.approx(options.scaling)
        q = _out_in(layer.base_layer)
        delta = layer.get_delta_weight("default").float()
        delta = delta.T if isinstance(layer.base_layer, transformers.pytorch_utils.Conv1D) else delta
        lora = options.scaling * layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()
        torch.testing.assert_close(delta, lora, rtol=1e-5, atol=1e-7)
        w = _out_in(original[name])
        # The adapters close part of the gap between W and the stored Q.
        assert _relative_error(w, q + lora) < _relative_error(w, q)
        if q.dtype == torch.float32 and original[name].weight.dtype == torch.float32:
            assert _relative_error(w, q + lora) == pytest.approx(reported[name].error, abs=1e-6)
    assert seen == set(reported), "every reported layer carries an adapter and nothing else does"


def test_bitsandbytes_load_rebuilds_the_fitted_q(converted) -> None:
    source, out, loader, options, report = converted
    original = dict(_load(source, loader).named_modules())
    stored = dict(_load(out, loader).named_modules())
    quantized = _load(out, loader, quantization_config=transformers.BitsAndBytesConfig(**BNB_CONFIG))
    model = peft.PeftModel.from_pretrained(quantized, str(out), subfolder="loftq_init", is_trainable=True)
    reported = {layer.module: layer for layer in report.layers}
    checked = 0
    for name, layer in _lora_layers(model):
        base = layer.base_layer
        if not isinstance(base, bnb.nn.Linear4bit):  # transformers keeps some layers (e.g. the last) unquantized
            assert torch.equal(base.weight, stored[name].weight)
            continue
        checked += 1
        q_loaded = _dequantized(base)
        if stored[name].weight.dtype == torch.float32:
            assert torch.equal(q_loaded, _out_in(stored[name])), f"{name}: loader must rebuild exactly the stored Q"
        lora = options.scaling * layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()
        measured = _relative_error(_out_in(original[name]), q_loaded + lora)
        assert measured == pytest.approx(reported[name].error, abs=1e-6), name
    assert checked >= len(reported) - 1


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2", "tiny_bert"])
def test_bnb_4bit_backbone_loads_without_a_quantization_config(request, fixture: str, tmp_path: Path) -> None:
    source = request.getfixturevalue(fixture)
    loader = MODELS[fixture]
    options = ConvertOptions(rank=8, lora_alpha=16, iters=2, backbone_format="bnb-4bit")
    report = convert_directory(source, tmp_path, options)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is False
    original = dict(_load(source, loader).named_modules())
    model = peft.PeftModel.from_pretrained(_load(tmp_path, loader), str(tmp_path), subfolder="loftq_init")
    reported = {layer.module: layer for layer in report.layers}
    layers = dict(_lora_layers(model))
    assert set(layers) == set(reported)
    for name, layer in layers.items():
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit), name
        lora = options.scaling * layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()
        measured = _relative_error(_out_in(original[name]), _dequantized(layer.base_layer) + lora)
        assert measured == pytest.approx(reported[name].error, abs=1e-6), name
    # About 4x smaller than the source (plus the untouched embeddings and norms).
    source_bytes = sum(p.stat().st_size for p in Path(source).glob("*.safetensors"))
    packed_bytes = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    assert packed_bytes < source_bytes


def test_packed_backbone_is_byte_identical_to_what_bitsandbytes_saves(tmp_path: Path, tiny_bert: Path) -> None:
    """Quantize our stored fp32 Q with transformers + bnb, save it, and compare to our bnb-4bit file."""
    dequantized, packed = tmp_path / "dequantized", tmp_path / "packed"
    options = ConvertOptions(rank=8, iters=1)
    convert_directory(tiny_bert, dequantized, options)
    convert_directory(tiny_bert, packed, options.model_copy(update={"backbone_format": "bnb-4bit"}))
    from safetensors import safe_open

    ours = safe_open(str(packed / "model.safetensors"), "pt")
    theirs = _load(dequantized, "AutoModel", quantization_config=transformers.BitsAndBytesConfig(**BNB_CONFIG)).state_dict()
    name = "encoder.layer.0.attention.self.query.weight"
    for suffix in ("", ".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4"):
        assert torch.equal(ours.get_tensor(name + suffix).cpu(), theirs[name + suffix].cpu()), suffix


def test_stored_codes_are_exact_where_the_cpu_dequantize_kernel_is_not(tmp_path: Path, odd_llama: Path) -> None:
    """Rows of 160 elements: the loaded layer holds exactly our codes and absmax, and bnb's
    reference (pure torch) dequantization gives back exactly the stored Q."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    convert_directory(odd_llama, tmp_path, ConvertOptions(rank=8, iters=2))
    stored = dict(_load(tmp_path, "AutoModelForCausalLM").named_modules())
    quantized = _load(tmp_path, "AutoModelForCausalLM", quantization_config=transformers.BitsAndBytesConfig(**BNB_CONFIG))
    layer = dict(quantized.named_modules())["model.layers.0.mlp.down_proj"]
    q = stored["model.layers.0.mlp.down_proj"].weight.detach()
    assert q.shape[1] % 64 != 0
    ours = NF4.quantize(q)
    assert torch.equal(layer.weight.data.view(-1), pack_4bit(ours.codes, pad=NF4.zero_code).view(-1))
    assert torch.equal(layer.weight.quant_state.absmax, ours.scales)
    state = layer.weight.quant_state
    reference = _dequantize_4bit_compute(layer.weight.data.view(-1), state.absmax, _get_4bit_code("nf4", q.device), 64, q.shape, torch.float32)
    assert torch.equal(reference, q)
