"""Weight quantizers: the "Q" of LoftQ's W ≈ Q + B·A.

Pure torch, runs on any device, and never imports bitsandbytes: the 4-bit and int8 paths
replicate bitsandbytes' own reference kernels operation by operation, so the codes and
scales we produce are bit-identical to what bitsandbytes would store for the same weight.
That matters because LoftQ fits the adapters to the residual ``W - dequant(Q)``: if the
runtime quantized the backbone differently, the adapters would correct the wrong error.

One module per family, all listed in :data:`QUANTIZERS` (loftq/quantizers/registry.py):

* ``nf4`` / ``fp4`` (bnb4bit.py): bitsandbytes 4-bit, block-wise absmax over the flattened tensor.
* ``nf2`` / ``nf3`` (normal_float.py): LoftQ's asymmetric normal-float codebooks, same block-wise scheme.
* ``int8`` (int8.py): bitsandbytes LLM.int8() row-wise absmax (``Int8Params``).
* ``int`` (uniform.py): uniform symmetric block-wise integers, 2..8 bits.

This package and its registry import no torch, so ``loftq.options`` can list and check the
quantizers in the torch-free job API; the torch names below are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from loftq.quantizers.registry import QUANTIZERS, QuantizerSpec, get_quantizer

_EXPORTS = {
    "Quantized": "loftq.quantizers.base",
    "Quantizer": "loftq.quantizers.base",
    "CodebookQuantizer": "loftq.quantizers.codebook",
    "FP4_CODE": "loftq.quantizers.bnb4bit",
    "NF4_CODE": "loftq.quantizers.bnb4bit",
    "pack_4bit": "loftq.quantizers.bnb4bit",
    "unpack_4bit": "loftq.quantizers.bnb4bit",
    "normal_float_code": "loftq.quantizers.normal_float",
    "Int8RowwiseQuantizer": "loftq.quantizers.int8",
    "UniformIntQuantizer": "loftq.quantizers.uniform",
}

__all__ = [
    "FP4_CODE",
    "NF4_CODE",
    "QUANTIZERS",
    "CodebookQuantizer",
    "Int8RowwiseQuantizer",
    "Quantized",
    "Quantizer",
    "QuantizerSpec",
    "UniformIntQuantizer",
    "get_quantizer",
    "normal_float_code",
    "pack_4bit",
    "unpack_4bit",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'loftq.quantizers' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
