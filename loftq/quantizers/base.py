"""What every quantizer is: a format that turns a weight into codes and scales and back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

TINY = 1e-38
"""bitsandbytes clamps a block's absmax to this before dividing (avoids 0/0 in zero blocks)."""


@dataclass(frozen=True)
class Quantized:
    """A quantized tensor: one code per element plus per-block (or per-row) scales."""

    codes: torch.Tensor  # uint8 (int8 for "int8"), same shape as the weight
    scales: torch.Tensor  # float32 per-block absmax over the flattened tensor, or per-row absmax (int8)
    shape: torch.Size


class Quantizer(ABC):
    """One quantization format. Subclasses set ``name``, ``bits`` and ``blocksize``."""

    name: str
    bits: int
    blocksize: int | None

    @abstractmethod
    def quantize(self, weight: torch.Tensor) -> Quantized:
        """Quantize ``weight`` (any float dtype; computed on ``weight.float()``)."""

    @abstractmethod
    def dequantize(self, q: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decode ``q`` in float32, then cast to ``dtype``."""

    @abstractmethod
    def error_bound(self, weight: torch.Tensor) -> torch.Tensor:
        """Per-element upper bound on ``|w - fake_quantize(w)|`` (float32, the weight's shape)."""

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """``dequantize(quantize(weight))`` in float32: what the runtime will see."""
        return self.dequantize(self.quantize(weight), torch.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, bits={self.bits}, blocksize={self.blocksize})"


def per_element(block_values: torch.Tensor, numel: int, blocksize: int) -> torch.Tensor:
    """Broadcast one value per block to one value per element of the flattened tensor."""
    return block_values.repeat_interleave(blocksize)[:numel]
