"""Which checkpoint tensors are LoRA targets, decided the way PEFT decides it.

The architecture is built on the meta device from config.json (no weights, no memory; its sizes
checked against the checkpoint first, loftq/architecture.py), so
"all-linear", names and regexes are matched against real module names and module types,
exactly as PEFT will match them when the adapter is loaded. Regexes run on RE2
(loftq/target_regex.py): on module names (ASCII, dots) its full match agrees with PEFT's
``re.fullmatch``, in time linear in the name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loftq.architecture import build_meta_model, checkpoint_key
from loftq.errors import CorruptCheckpoint, LoftQError, NoTargetModules, UnsupportedCheckpoint
from loftq.options import ALL_LINEAR, ConvertOptions
from loftq.target_regex import fullmatch

_TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
}


@dataclass(frozen=True)
class Target:
    module: str  # module name in the loaded model, as PEFT sees it
    key: str  # tensor name in the checkpoint
    fan_in_fan_out: bool  # GPT-2-style Conv1D: stored in×out
    shape: tuple[int, int]  # out×in, as the architecture defines it


@dataclass(frozen=True)
class ModelLayout:
    architecture: str
    task_type: str | None
    targets: dict[str, Target]  # by checkpoint key
    linear_modules: list[str]  # every Linear/Conv1D module, targeted or not
    # Every Linear/Conv1D weight the checkpoint holds, by checkpoint key: the shape it must be
    # stored with (in×out for Conv1D), so a tensor that contradicts config.json is refused even
    # when it is not a target and would only be copied.
    weight_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)


def _is_linear(module: torch.nn.Module) -> tuple[bool, bool]:
    """(is a LoRA-able linear layer, is stored in×out)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return True, True
    return isinstance(module, torch.nn.Linear), False


def _selected(name: str, spec: str | list[str]) -> bool:
    if isinstance(spec, list):
        return any(name == t or name.endswith("." + t) for t in spec)
    return fullmatch(spec, name)  # RE2: linear in the name, whatever the pattern


def resolve_layout(config: dict, checkpoint_keys: set[str], options: ConvertOptions) -> ModelLayout:
    """Match the options' target_modules against the model that ``config`` (config.json) describes."""
    try:
        model = build_meta_model(config, checkpoint_keys)
    except LoftQError:  # config.json refused on its merits (loftq/architecture.py)
        raise
    except Exception as exc:  # transformers raises many kinds for unknown/odd configs
        raise UnsupportedCheckpoint(f"cannot build the architecture from config.json: {exc}", path="config.json") from exc

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_name = next((n for n, m in model.named_modules() if output is not None and m is output), None)
    prefix = getattr(model, "base_model_prefix", "") or ""
    spec = options.target_modules  # a regex was compiled (and cached) by ConvertOptions' validation
    linear: list[str] = []
    targets: dict[str, Target] = {}
    weight_shapes: dict[str, tuple[int, int]] = {}
    matched_names: set[str] = set()
    for name, module in model.named_modules():
        is_linear, transposed = _is_linear(module)
        if not is_linear:
            continue
        linear.append(name)
        key = checkpoint_key(f"{name}.weight", prefix, checkpoint_keys)
        if key is None:  # tied or absent from this checkpoint
            continue
        stored = tuple(module.weight.shape)  # Conv1D's weight is in×out already
        weight_shapes[key] = stored
        if spec == ALL_LINEAR:
            if name == output_name:
                continue
        elif not _selected(name, spec):
            continue
        shape = (stored[1], stored[0]) if transposed else stored
        targets[key] = Target(module=name, key=key, fan_in_fan_out=transposed, shape=shape)
        if isinstance(spec, list):
            matched_names.update(t for t in spec if name == t or name.endswith("." + t))

    if linear and not weight_shapes:
        raise CorruptCheckpoint(
            f"config.json describes a {type(model).__name__} with {len(linear)} linear layers, but the checkpoint holds "
            f"a weight for none of them (e.g. {linear[0]}.weight): config.json and the weights describe different models",
            path="config.json",
        )
    if isinstance(spec, list) and (missing := sorted(set(spec) - matched_names)):
        raise NoTargetModules(f"target_modules {missing} match no linear layer of this model")
    if not targets:
        raise NoTargetModules(f"target_modules={spec!r} matches no linear layer of this model")
    architecture = type(model).__name__
    task_type = next((t for suffix, t in _TASK_TYPES.items() if architecture.endswith(suffix)), None)
    return ModelLayout(architecture, task_type, targets, linear, weight_shapes)
