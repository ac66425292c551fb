"""LoftQ checkpoints from Hugging Face safetensors checkpoints, streamed layer by layer.

    from loftq import ConvertOptions, convert_directory
    report = convert_directory("path/to/model", "path/to/out", ConvertOptions(rank=16, iters=5))

Names are imported lazily, so ``loftq.options`` and ``loftq.errors`` can be used (by the
job API, for one) without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CalibrationOptions": "loftq.options",
    "ConvertOptions": "loftq.options",
    "RefineOptions": "loftq.options",
    "LoftQError": "loftq.errors",
    "LayerReport": "loftq.report",
    "ProgressEvent": "loftq.report",
    "Report": "loftq.report",
    "LocalDestination": "loftq.storage",
    "LocalSource": "loftq.storage",
    "convert": "loftq.converter",
    "convert_directory": "loftq.converter",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'loftq' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
