"""The block-by-block runner reproduces the model's own forward pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loftq.blockwise import StreamedModel, TensorReader
from loftq.checkpoint import INDEX_NAME, discover
from loftq.errors import UnsupportedArchitecture
from loftq.storage import LocalSource


def _streamed(path: Path) -> StreamedModel:
    source = LocalSource(path)
    files = source.list_files()
    index = (path / INDEX_NAME).read_text() if INDEX_NAME in files else None
    reader = TensorReader(source, discover(files, index))
    return StreamedModel(json.loads((path / "config.json").read_text()), reader, torch.device("cpu"))


def _full_model(path: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or [])
    auto = AutoModelForCausalLM if causal else AutoModel
    return auto.from_pretrained(path, dtype=torch.float32).eval()


def _stream_through(model: StreamedModel, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, tuple[float, int]]:
    with model.loaded(model.outer_param_names()):
        hidden, inputs = model.capture(ids, mask)
    for index in range(len(model.blocks)):
        with model.loaded(model.block_param_names(index)):
            hidden = model.run_block(index, hidden, inputs[index])
    with model.loaded(model.outer_param_names()):
        nll = model.run_head(hidden, ids, mask)
    return hidden, nll


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_streamed_loss_equals_the_full_model_loss(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    model = _streamed(path)
    ids = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    _, (total, tokens) = _stream_through(model, ids, mask)
    full = _full_model(path)
    with torch.no_grad():
        expected = full(input_ids=ids, attention_mask=mask, labels=ids).loss
    assert tokens == 3 * 23
    assert total / tokens == pytest.approx(float(expected), rel=1e-5)
    assert all(p.device.type == "meta" for p in model.model.parameters()), "weights are dropped after use"


def test_streamed_encoder_states_equal_the_full_model_with_padding(tiny_bert: Path) -> None:
    model = _streamed(tiny_bert)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    hidden, (total, tokens) = _stream_through(model, ids, mask)
    assert (total, tokens) == (0.0, 0)
    with torch.no_grad():
        expected = _full_model(tiny_bert)(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(hidden[real], expected[real], rtol=1e-5, atol=1e-5)


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    from transformers import T5Config

    config = T5Config(d_model=64, d_ff=128, num_layers=1, num_heads=4, vocab_size=64).to_dict()
    with pytest.raises(UnsupportedArchitecture, match="t5"):
        StreamedModel(config, reader=None, device=torch.device("cpu"))  # type: ignore[arg-type]
