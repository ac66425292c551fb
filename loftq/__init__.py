"""LoftQ checkpoints from Hugging Face safetensors checkpoints, streamed layer by layer.

    from loftq import ConvertOptions, convert_directory
    report = convert_directory("path/to/model", "path/to/out", ConvertOptions(rank=16, iters=5))

Names are imported lazily, so ``loftq.options`` and ``loftq.errors`` can be used (by the
job API, for one) without importing torch.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# OpenMP threads that wait for work sleep instead of spinning. Beside other busy processes a
# spinning thread holds a core the thread it waits for needs: a conversion ran 8.7× slower beside
# one torch process and 28× beside two, and alone just as fast either way (bench/contention.py).
# The OpenMP runtime reads it once, when torch loads it, so it is set here, which every engine
# import passes through first; a value already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
