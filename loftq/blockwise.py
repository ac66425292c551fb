"""Run a transformers model one block at a time, with only the weights in use in memory.

The model is built from config.json with its parameters on the meta device (buffers such as
rotary frequencies are real: they are computed, not stored; loftq/architecture.py bounds
them). Weights are read from the shards into the modules that need them and dropped again
afterwards, so a calibrated conversion holds one block (or the embeddings and head) at a time.

Whatever the architecture passes to its blocks (attention masks, position ids, rotary
embeddings, per-layer sliding-window masks) is captured by running the model's own forward
with every block replaced by a recorder, so nothing about the blocks' signatures is assumed.
The part after the blocks (final norm, head, loss) is run the same way: the model's forward
with its blocks replaced by a stub that hands back already computed hidden states.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loftq.checkpoint import SourceCheckpoint
from loftq.errors import CorruptCheckpoint, UnsupportedArchitecture
from loftq.safetensors_io import SafetensorsHeader, TensorInfo, read_header, read_tensor
from loftq.storage import Source
from loftq.architecture import build_meta_model, checkpoint_key

CAUSAL_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2"}
ENCODER_MODEL_TYPES = {"bert"}
SUPPORTED_MODEL_TYPES = CAUSAL_MODEL_TYPES | ENCODER_MODEL_TYPES

HEAD_LOGITS_BYTES = 64 * 2**20


class TensorReader:
    """Checkpoint tensors by name, keeping the shards in use open (each ``open_local`` of an
    object-storage source is a download, and blocks are read in shard order)."""

    def __init__(self, source: Source, checkpoint: SourceCheckpoint, keep_open: int = 2) -> None:
        self.source = source
        self.keep_open = keep_open
        self._open: dict[str, tuple[contextlib.ExitStack, Path, SafetensorsHeader]] = {}
        if checkpoint.index is not None:
            self.shard_of = dict(checkpoint.index["weight_map"])
        else:
            shard = checkpoint.shards[0]
            self.shard_of = {name: shard for name in self._shard(shard)[1].tensors}

    def _shard(self, shard: str) -> tuple[Path, SafetensorsHeader]:
        if shard in self._open:
            self._open[shard] = self._open.pop(shard)  # most recently used last
        else:
            while len(self._open) >= self.keep_open:
                oldest = next(iter(self._open))
                self._open.pop(oldest)[0].close()
            stack = contextlib.ExitStack()
            path = stack.enter_context(self.source.open_local(shard))
            self._open[shard] = (stack, path, read_header(path))
        _, path, header = self._open[shard]
        return path, header

    @property
    def keys(self) -> set[str]:
        return set(self.shard_of)

    def info(self, key: str) -> TensorInfo:
        path, header = self._shard(self.shard_of[key])
        if key not in header.tensors:
            raise CorruptCheckpoint(f"the index maps {key} to {self.shard_of[key]}, which does not hold it", path=key)
        return header.tensors[key]

    def read(self, key: str) -> torch.Tensor:
        path, header = self._shard(self.shard_of[key])
        if key not in header.tensors:
            raise CorruptCheckpoint(f"the index maps {key} to {self.shard_of[key]}, which does not hold it", path=key)
        return read_tensor(path, header.tensors[key])

    def close(self) -> None:
        for stack, _, _ in self._open.values():
            stack.close()
        self._open.clear()


class _StopForward(Exception):
    """Raised by the last recorder: nothing after the blocks is needed while capturing."""


@dataclass
class BlockInputs:
    """What the model passed to one block, besides the hidden states, for one batch."""

    args: tuple  # positional arguments after the hidden states
    kwargs: dict
    hidden_key: str | None  # "hidden_states" when the hidden states came as a keyword


class _Recorder(nn.Module):
    def __init__(self, calls: list[BlockInputs], stop: bool) -> None:
        super().__init__()
        self.calls = calls
        self.stop = stop
        self.first_hidden: torch.Tensor | None = None

    def forward(self, *args: object, **kwargs: object) -> object:
        if args:
            hidden, rest, key = args[0], tuple(args[1:]), None
        else:
            kwargs = dict(kwargs)
            hidden, rest, key = kwargs.pop("hidden_states"), (), "hidden_states"
        self.calls.append(BlockInputs(rest, dict(kwargs), key))
        self.first_hidden = hidden
        if self.stop:
            raise _StopForward
        return hidden


class _Replay(nn.Module):
    """Stands for block 0 and hands back precomputed final hidden states; the other blocks
    are stood for by pass-through stubs, so the model's own code after the blocks runs."""

    def __init__(self, hidden: torch.Tensor | None, as_tuple: bool) -> None:
        super().__init__()
        self.hidden = hidden
        self.as_tuple = as_tuple

    def forward(self, *args: object, **kwargs: object) -> object:
        hidden = self.hidden if self.hidden is not None else (args[0] if args else kwargs["hidden_states"])
        return (hidden,) if self.as_tuple else hidden


class StreamedModel:
    """A transformers model whose weights are loaded on demand, block by block."""

    def __init__(self, config_dict: dict, reader: TensorReader, device: torch.device) -> None:
        model_type = config_dict.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
            raise UnsupportedArchitecture(
                f"calibrated conversion streams the model block by block and supports model types {supported}; "
                f"this checkpoint is {model_type!r} (convert it without calibration data, objective=weight)",
                path="config.json",
            )
        self.model = build_meta_model({**config_dict, "use_cache": False}, reader.shard_of, computed_buffers=True).eval()
        config = self.model.config
        if getattr(config, "tie_word_embeddings", False) and hasattr(self.model, "tie_weights"):
            self.model.tie_weights()  # the head shares the embedding's parameter, as from_pretrained does
        for module in self.model.modules():  # buffers only: parameters stay on meta
            for key, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[key] = buffer.to(device)
        self.config = config
        self.reader = reader
        self.device = device
        self.causal = model_type in CAUSAL_MODEL_TYPES
        self.has_loss = self.causal and hasattr(self.model, "get_output_embeddings") and self.model.get_output_embeddings() is not None
        self.blocks, self.block_prefix = self._find_blocks()
        self.block_returns_tuple: bool | None = None
        self._prefix = getattr(self.model, "base_model_prefix", "") or ""
        # Tied parameters (lm_head ↔ embed_tokens) are one Parameter under several names.
        groups: dict[int, list[str]] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
        self._tied = {name: names for names in groups.values() for name in names}
        self.param_names = [names[0] for names in groups.values()]

    @property
    def max_length(self) -> int | None:
        value = getattr(self.config, "max_position_embeddings", None)
        return int(value) if value else None

    def _find_blocks(self) -> tuple[nn.ModuleList, str]:
        layers = getattr(self.config, "num_hidden_layers", None)
        for name, module in self.model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == layers and len(module) > 0:
                return module, name
        raise UnsupportedArchitecture(f"cannot find the {layers} transformer blocks of {type(self.model).__name__}")

    def block_param_names(self, index: int) -> list[str]:
        prefix = f"{self.block_prefix}.{index}."
        return [n for n in self.param_names if n.startswith(prefix)]

    def outer_param_names(self) -> list[str]:
        prefix = f"{self.block_prefix}."
        return [n for n in self.param_names if not n.startswith(prefix)]

    def checkpoint_key(self, name: str) -> str | None:
        keys = self.reader.shard_of
        return next((k for alias in self._tied[name] if (k := checkpoint_key(alias, self._prefix, keys)) is not None), None)

    def _set(self, name: str, value: nn.Parameter) -> None:
        for alias in self._tied[name]:
            module_name, _, leaf = alias.rpartition(".")
            self.model.get_submodule(module_name)._parameters[leaf] = value

    def load(self, names: list[str]) -> None:
        """Read these parameters (fp32, on the compute device) from the checkpoint."""
        for name in names:
            key = self.checkpoint_key(name)
            meta = self.model.get_parameter(name)
            if key is None:
                raise CorruptCheckpoint(f"the checkpoint has no tensor for parameter {name}", path=name)
            tensor = self.reader.read(key)
            if tuple(tensor.shape) != tuple(meta.shape):
                raise CorruptCheckpoint(
                    f"tensor {key} has shape {list(tensor.shape)} but config.json implies {list(meta.shape)}", path=key
                )
            self._set(name, nn.Parameter(tensor.to(self.device, torch.float32), requires_grad=False))

    def unload(self, names: list[str]) -> None:
        for name in names:
            param = self.model.get_parameter(name)
            self._set(name, nn.Parameter(torch.empty(param.shape, device="meta"), requires_grad=False))

    @contextlib.contextmanager
    def loaded_on_use(self, names: list[str]) -> Iterator[Callable[[list[str]], None]]:
        """Load each of these parameters when its module is first called, drop them all at the
        end: a capture needs the embeddings but not the head, a head pass the reverse, and
        which module is which is the model's business. Yields ``ensure(names)`` to load
        parameters a caller needs whether or not their module ran."""
        wanted = set(names)
        loaded: set[str] = set()

        def ensure(params: list[str]) -> None:
            todo = [p for p in params if p not in loaded]
            self.load(todo)
            loaded.update(todo)

        owners: dict[str, list[str]] = {}
        for name in names:
            for alias in self._tied[name]:
                owners.setdefault(alias.rpartition(".")[0], []).append(name)
        handles = [
            self.model.get_submodule(module).register_forward_pre_hook(lambda *_, params=params: ensure(params))
            for module, params in owners.items()
        ]
        try:
            yield ensure
        finally:
            for handle in handles:
                handle.remove()
            self.unload(sorted(loaded & wanted))

    @contextlib.contextmanager
    def loaded(self, names: list[str]) -> Iterator[None]:
        self.load(names)
        try:
            yield
        finally:
            self.unload(names)

    @contextlib.contextmanager
    def _blocks_replaced(self, stand_ins: list[nn.Module]) -> Iterator[None]:
        originals = list(self.blocks)
        for i, module in enumerate(stand_ins):
            self.blocks[i] = module
        try:
            yield
        finally:
            for i, module in enumerate(originals):
                self.blocks[i] = module

    def _forward_kwargs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        return {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device), "use_cache": False}

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, list[BlockInputs]]:
        """Block 0's hidden states and every block's other inputs for one batch.

        The outer weights (embeddings) must be loaded."""
        calls: list[BlockInputs] = []
        recorders = [_Recorder(calls, stop=i == len(self.blocks) - 1) for i in range(len(self.blocks))]
        with self._blocks_replaced(recorders), contextlib.suppress(_StopForward):
            self.model(**self._forward_kwargs(input_ids, attention_mask))
        if len(calls) != len(self.blocks) or recorders[0].first_hidden is None:
            raise UnsupportedArchitecture(f"{type(self.model).__name__} did not call each of its blocks once")
        return recorders[0].first_hidden.float(), calls

    @torch.no_grad()
    def run_block(self, index: int, hidden: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        return self.block_forward(index, hidden, inputs)

    def block_forward(self, index: int, hidden: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        """Block ``index`` on ``hidden`` with what the model passed it besides; autograd as the
        caller's mode says (refinement differentiates through it)."""
        kwargs = dict(inputs.kwargs)
        if inputs.hidden_key is None:
            out = self.blocks[index](hidden, *inputs.args, **kwargs)
        else:
            out = self.blocks[index](*inputs.args, **{inputs.hidden_key: hidden, **kwargs})
        if self.block_returns_tuple is None:
            self.block_returns_tuple = isinstance(out, tuple)
        return out[0] if isinstance(out, tuple) else out

    def head_logits(self, final_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The logits of the model's own head (final norm, LM head) on final hidden states, with
        autograd as the caller's mode says. The outer weights must be loaded."""
        as_tuple = bool(self.block_returns_tuple)
        stand_ins = [_Replay(final_hidden, as_tuple)] + [_Replay(None, as_tuple) for _ in range(len(self.blocks) - 1)]
        embeds = torch.zeros(*final_hidden.shape[:2], int(self.config.hidden_size), device=self.device)
        with self._blocks_replaced(stand_ins):
            return self.model(inputs_embeds=embeds, attention_mask=attention_mask.to(self.device), use_cache=False).logits

    @torch.no_grad()
    def run_head(self, final_hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[float, int]:
        """The model's own code after the blocks on precomputed final hidden states.

        Returns (summed next-token negative log-likelihood, tokens) for causal LMs with a
        head, (0, 0) otherwise (the forward still runs, so hooks on head layers see inputs).
        The outer weights must be loaded."""
        as_tuple = bool(self.block_returns_tuple)
        stand_ins = [_Replay(final_hidden, as_tuple)] + [_Replay(None, as_tuple) for _ in range(len(self.blocks) - 1)]
        kwargs = self._forward_kwargs(input_ids, attention_mask)
        # Zeros stand in for the token embeddings (block 0's stand-in replaces them anyway), so
        # the head pass does not need the embedding matrix unless the head is tied to it.
        ids = kwargs.pop("input_ids")
        hidden_size = int(self.config.hidden_size)
        if not self.has_loss:
            with self._blocks_replaced(stand_ins):
                self.model(**kwargs, inputs_embeds=torch.zeros(*ids.shape, hidden_size, device=self.device))
            return 0.0, 0
        # The logits (sequences × L × vocab, fp32) are the largest tensor of the whole pass:
        # the head runs on as many sequences at a time as fit in HEAD_LOGITS_BYTES.
        vocab = int(getattr(self.config, "vocab_size", 0) or 1)
        rows = max(1, HEAD_LOGITS_BYTES // (4 * vocab * input_ids.shape[1]))
        total, tokens = 0.0, 0
        for start in range(0, input_ids.shape[0], rows):
            part = slice(start, start + rows)
            mask = kwargs["attention_mask"][part]
            labels = ids[part].masked_fill(mask == 0, -100)
            stand_ins[0].hidden = final_hidden[part]
            embeds = torch.zeros(*labels.shape, hidden_size, device=self.device)
            with self._blocks_replaced(stand_ins):
                out = self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False, labels=labels)
            count = int((labels[:, 1:] != -100).sum())
            total, tokens = total + float(out.loss) * count, tokens + count
        return total, tokens
