"""The per-shard pipeline's failure path: a failed fit ends the shard promptly and cleanly."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import loftq.shard
from loftq.backbone import Backbone
from loftq.converter import plan
from loftq.options import ConvertOptions
from loftq.quantizers import get_quantizer
from loftq.safetensors_io import iter_tensor_bytes
from loftq.storage import LocalSource


def test_a_failing_fit_while_the_writer_copies_ends_with_its_error(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer is still copying a non-target tensor (slowly, in many pieces, each handed to
    the hashing thread) when the next fit fails: the writer must drain into a hasher that is
    still running, and the fit's error must come out, not a hang."""
    options = ConvertOptions(rank=4, device="cpu")
    checkpoint, _, layout = plan(LocalSource(tiny_llama), options)
    first = checkpoint.shards[0]  # holds the embedding, then the first targets

    def slow_pieces(path, info, **kwargs):
        for piece in iter_tensor_bytes(path, info, chunk=256):
            time.sleep(0.002)
            yield piece

    def failing_fit(*args):
        raise ValueError("fit failed")

    monkeypatch.setattr(loftq.shard, "iter_tensor_bytes", slow_pieces)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            loftq.shard.convert_shard(
                tiny_llama / first, tmp_path / first, first, layout,
                Backbone(options, get_quantizer("nf4", 4, 64)), failing_fit,
                on_layer=lambda layer: None, should_stop=lambda: False,
            )
        except BaseException as exc:  # noqa: BLE001 - checked below
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the shard's threads deadlocked"
    assert len(outcome) == 1 and isinstance(outcome[0], ValueError), outcome
    assert not (tmp_path / first).exists() and not (tmp_path / f"{first}.partial").exists()
