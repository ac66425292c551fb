"""The ``loftq_init/`` PEFT adapter: config and weights, in PEFT's own layout.

PEFT is not imported: the files are plain JSON and safetensors, so the engine stays usable
where PEFT is not installed, and the round-trip tests load them with the real PEFT.
"""

from __future__ import annotations

from loftq.options import ConvertOptions
from loftq.targets import ModelLayout

ADAPTER_DIR = "loftq_init"
ADAPTER_CONFIG = f"{ADAPTER_DIR}/adapter_config.json"
ADAPTER_WEIGHTS = f"{ADAPTER_DIR}/adapter_model.safetensors"


def lora_keys(module: str) -> tuple[str, str]:
    """Tensor names of lora_A and lora_B for a module, as ``PeftModel`` saves them."""
    return f"base_model.model.{module}.lora_A.weight", f"base_model.model.{module}.lora_B.weight"


def adapter_config(options: ConvertOptions, layout: ModelLayout, base_model: str) -> dict:
    modules = sorted(t.module for t in layout.targets.values())
    return {
        "peft_type": "LORA",
        "task_type": layout.task_type,
        "base_model_name_or_path": base_model,
        "r": options.rank,
        "lora_alpha": options.lora_alpha,
        "use_rslora": options.use_rslora,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": modules,
        "fan_in_fan_out": any(t.fan_in_fan_out for t in layout.targets.values()),
        # The adapters already hold the LoftQ init: PEFT must load them as they are.
        "init_lora_weights": True,
        "loftq_config": {"loftq_bits": options.bits, "loftq_iter": options.iters},
        "inference_mode": False,
    }
