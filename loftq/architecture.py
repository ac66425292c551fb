"""The architecture config.json describes, built without letting config.json size memory.

config.json comes with the checkpoint, from whoever uploaded it, and its numbers size what
transformers builds: the layers (Python objects even on the meta device: 60 000 declared
layers took a minute and 2.6 GB), per-layer lists in the config object itself, and the buffers
computed in ``__init__`` (position ids, rotary frequencies, causal masks), which are real memory
as soon as the model runs. So each is checked against what the checkpoint holds before anything
it sizes exists, and a config that asks for more is ``corrupt_checkpoint``, naming the field:

1. A layer count (``num_hidden_layers`` and its aliases, at any depth) may not exceed the
   checkpoint's number of tensors, checked before the config object is made: every layer
   stores at least one tensor, or shares another's (ALBERT), so no real checkpoint has more.
2. The model is built on the meta device while a registration hook counts the parameters and
   submodules it creates; past ``PARTS_PER_TENSOR`` per checkpoint tensor the build stops. This
   covers every other field that multiplies modules (experts, block sizes, ...).
3. Every entry of every ``nn.ModuleList`` that has parameters must have weights in the
   checkpoint: the layers config.json declares are layers the checkpoint stores.
4. The buffers, still on meta, must fit in ``MAX_BUFFER_BYTES`` before any is made real.

Only ``transformers.PreTrainedModel`` classes are instantiated, whatever ``architectures`` names.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Collection, Iterator

import torch
from torch import nn

from loftq.errors import CorruptCheckpoint, UnsupportedArchitecture, UnsupportedCheckpoint

LAYER_COUNT_FIELDS = frozenset(
    {"num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
     "num_encoder_layers", "num_decoder_layers"}
)
"""config.json's names for a number of layers; a config class's own alias of num_hidden_layers
(``attribute_map``: ``depth``, ``num_stages``, ...) is added per class."""

PARTS_PER_TENSOR = 16
PARTS_FLOOR = 4096
"""The build may register at most 16 parameters and submodules per checkpoint tensor, plus 4096:
a decoder layer of Llama registers 22 for its 9 tensors, a BERT layer 31 for 16, so real models
stay below a fifth of the bound, and a config that declares far more than the weights hold is
stopped after a few thousand objects instead of building all of them."""

MAX_BUFFER_BYTES = 1 << 30
"""Most bytes of buffers a config may make the model compute (position ids, rotary frequencies,
causal masks): at their default sizes the largest built-in transformers architecture needs
0.44 GB (ibert), GPT-Neo's per-layer causal masks 0.1 GB, BERT 8 KB. Buffers are computed from
config.json, not stored, so nothing in the checkpoint backs them."""


def build_meta_model(config_dict: dict, stored: Collection[str], *, computed_buffers: bool = False) -> nn.Module:
    """The architecture config.json describes, with its parameters on the meta device, after
    checking config.json's sizes against ``stored`` (the checkpoint's tensor names).

    ``computed_buffers`` makes the buffers real (on the CPU) and computes them the way
    ``from_pretrained`` does, for a model that will run once its weights are loaded."""
    import transformers

    if "auto_map" in config_dict:
        raise UnsupportedCheckpoint(
            "the model needs trust_remote_code (custom modelling code); only architectures built into transformers are supported",
            path="config.json",
        )
    model_type = config_dict.get("model_type")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        raise UnsupportedCheckpoint(f"unknown model_type {model_type!r}", path="config.json")
    _check_layer_counts(config_dict, len(stored))
    config = transformers.CONFIG_MAPPING[model_type].from_dict(config_dict)
    model_class = _model_class(config)
    limit = PARTS_PER_TENSOR * len(stored) + PARTS_FLOOR
    with _counted_parts(limit) as where, torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = model_class(config) if model_class is not None else transformers.AutoModel.from_config(config)
        except _TooManyParts:
            raise CorruptCheckpoint(
                f"the model it describes has more than {limit} parameters and modules (stopped at {where[0]}), "
                f"but the checkpoint holds {len(stored)} tensors{_suspects(config_dict, len(stored))}",
                path="config.json",
            ) from None
    _check_layers_stored(model, config_dict, stored)
    _check_buffers(model, config_dict)
    if computed_buffers:
        _compute_buffers(model)
    return model


def checkpoint_key(param: str, prefix: str, keys: Collection[str]) -> str | None:
    """The checkpoint's name for a model parameter: the checkpoint may or may not carry the
    base-model prefix (e.g. ``bert.``), and old checkpoints (the original BERTs) store
    LayerNorm parameters as gamma/beta, which transformers renames when it loads them."""
    candidates = [param]
    if prefix:
        candidates += [f"{prefix}.{param}", param.removeprefix(f"{prefix}.")]
    candidates += [_legacy_name(c) for c in candidates if _legacy_name(c) != c]
    return next((c for c in candidates if c in keys), None)


def _legacy_name(key: str) -> str:
    for new, old in ((".LayerNorm.weight", ".LayerNorm.gamma"), (".LayerNorm.bias", ".LayerNorm.beta")):
        if key.endswith(new):
            return key.removesuffix(new) + old
    return key


# -- architectures ----------------------------------------------------------------------------


def _model_class(config: object) -> type | None:
    """The class ``architectures`` names, if this transformers has it; None: build the model
    type's AutoModel. A name that is anything but a model class (``Trainer``, a function) is
    refused before it is called: config.json must not choose what code runs."""
    import transformers

    names = getattr(config, "architectures", None) or []
    if not isinstance(names, list):
        raise UnsupportedArchitecture(f"architectures must be a list of model class names, got {names!r:.100}", path="config.json")
    for name in names:
        if not isinstance(name, str) or not name.isidentifier():
            raise UnsupportedArchitecture(f"architectures names {name!r:.100}, not a model class name", path="config.json")
        try:
            candidate = getattr(transformers, name, None)
        except Exception as exc:  # noqa: BLE001 - the lazy import behind the name failed
            raise UnsupportedArchitecture(f"architectures names {name!r}, which transformers cannot import: {exc}", path="config.json") from exc
        if candidate is None:
            continue  # a class of another transformers version
        if not isinstance(candidate, type) or not issubclass(candidate, transformers.PreTrainedModel) or candidate is transformers.PreTrainedModel:
            raise UnsupportedArchitecture(
                f"architectures names {name!r}, which is not a transformers model class (a PreTrainedModel subclass); "
                "only model classes are built",
                path="config.json",
            )
        return candidate
    return None


# -- 1. layer counts --------------------------------------------------------------------------


def _int_fields(config_dict: dict) -> Iterator[tuple[str, dict | list, str | int, int]]:
    """(dotted path, the dict or list holding it, key, value) of every integer in config.json,
    nested configs (``text_config``, ...) and lists (``block_sizes``) included."""
    pending: list[tuple[str, object]] = [("", config_dict)]
    while pending:
        path, node = pending.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            dotted = f"{path}.{key}" if path and isinstance(node, dict) else f"{path}[{key}]" if path else str(key)
            if isinstance(value, (dict, list)):
                pending.append((dotted, value))
            elif isinstance(value, int) and not isinstance(value, bool):
                yield dotted, node, key, value


def _layer_count_fields(node: dict | list) -> set[str]:
    import transformers

    if not isinstance(node, dict):
        return set()
    fields = set(LAYER_COUNT_FIELDS)
    model_type = node.get("model_type")
    if isinstance(model_type, str) and model_type in transformers.CONFIG_MAPPING:
        alias = getattr(transformers.CONFIG_MAPPING[model_type], "attribute_map", {}).get("num_hidden_layers")
        if isinstance(alias, str):
            fields.add(alias)
    return fields


def _check_layer_counts(config_dict: dict, tensors: int) -> None:
    """Before the config object exists: config classes build per-layer lists in ``__init__``."""
    for path, node, key, value in _int_fields(config_dict):
        if key in _layer_count_fields(node) and value > tensors:
            raise CorruptCheckpoint(
                f"{path}={value} declares more layers than the checkpoint holds tensors ({tensors}); every layer stores weights",
                path="config.json",
            )


# -- 2. the build -----------------------------------------------------------------------------


class _TooManyParts(BaseException):
    """A BaseException, so that no ``except Exception`` in a model's ``__init__`` swallows it."""


@contextlib.contextmanager
def _counted_parts(limit: int) -> Iterator[list[str]]:
    """Count the parameters and submodules registered by this thread; past ``limit`` the
    registration raises, which ends the model's ``__init__``. Yields [where it stopped]."""
    from torch.nn.modules.module import register_module_module_registration_hook, register_module_parameter_registration_hook

    thread = threading.get_ident()
    count = [0]
    where = [""]

    def hook(module: nn.Module, name: str, value: object) -> None:
        if threading.get_ident() != thread:
            return
        count[0] += 1
        if count[0] > limit:
            where[0] = f"{type(module).__name__}.{name}"
            raise _TooManyParts

    handles = [register_module_parameter_registration_hook(hook), register_module_module_registration_hook(hook)]
    try:
        yield where
    finally:
        for handle in handles:
            handle.remove()


def _suspects(config_dict: dict, tensors: int) -> str:
    """Counts in config.json above the number of tensors: the likely cause, for the message."""
    words = ("layer", "expert", "block", "stage", "depth")
    found = [f"{path}={value}" for path, _, _, value in _int_fields(config_dict) if value > tensors and any(w in path.lower() for w in words)]
    return f" ({', '.join(sorted(found)[:5])})" if found else ""


# -- 3. layers backed by weights --------------------------------------------------------------


def _fields_equal_to(config_dict: dict, value: int) -> str:
    """The config fields that hold ``value`` (only the layer counts, if one does): what sized a
    module list or a buffer."""
    matches = [(key in _layer_count_fields(node), path) for path, node, key, found in _int_fields(config_dict) if found == value]
    counts = [path for is_count, path in matches if is_count]
    return ", ".join(f"{path}={value}" for path in sorted(counts or [path for _, path in matches])[:3])


def _check_layers_stored(model: nn.Module, config_dict: dict, stored: Collection[str]) -> None:
    prefix = getattr(model, "base_model_prefix", "") or ""
    for list_name, modules in model.named_modules():
        if not isinstance(modules, nn.ModuleList):
            continue
        missing, with_weights = [], 0
        for index, entry in enumerate(modules):
            names = [f"{list_name}.{index}.{p}" for p, _ in entry.named_parameters(remove_duplicate=False)]
            if not names:
                continue  # nothing to store (activations, dropouts, rotary tables)
            with_weights += 1
            if not any(checkpoint_key(name, prefix, stored) is not None for name in names):
                missing.append(index)
        if not missing:
            continue
        fields = _fields_equal_to(config_dict, len(modules))
        held = "none of them" if len(missing) == with_weights else f"only {with_weights - len(missing)}"
        raise CorruptCheckpoint(
            f"{fields or 'it'} declares {len(modules)} entries of {list_name} in {type(model).__name__}, but the "
            f"checkpoint holds weights for {held} (none for {list_name}.{missing[0]}"
            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''})",
            path="config.json",
        )


# -- 4. buffers -------------------------------------------------------------------------------


def _check_buffers(model: nn.Module, config_dict: dict) -> None:
    sizes = [(name, tuple(buffer.shape), buffer.numel() * buffer.element_size()) for name, buffer in model.named_buffers()]
    total = sum(nbytes for _, _, nbytes in sizes)
    if total <= MAX_BUFFER_BYTES:
        return
    name, shape, nbytes = max(sizes, key=lambda item: item[2])
    fields = ", ".join(dict.fromkeys(f for dim in set(shape) if dim > 1 and (f := _fields_equal_to(config_dict, dim))))
    raise CorruptCheckpoint(
        f"{fields or 'its sizes'} would make the model compute {_gib(total)} of buffers (the largest, {name}, is "
        f"{list(shape)}: {_gib(nbytes)}); buffers are computed, not stored in the checkpoint, and at most "
        f"{_gib(MAX_BUFFER_BYTES)} of them are built from config.json",
        path="config.json",
    )


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def _compute_buffers(model: nn.Module) -> None:
    """Real buffers, computed by the model's own initialisation as ``from_pretrained`` computes
    the buffers a checkpoint does not store; the parameters stay on meta."""
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = torch.empty_like(buffer, device="cpu")
    model.initialize_weights()
