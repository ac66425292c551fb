"""Uniform symmetric block-wise integers (int, 2..8 bits), fake-quantized like the normal-float formats."""

from __future__ import annotations

import math

import torch

from loftq.quantizers.base import Quantized, Quantizer, per_element


class UniformIntQuantizer(Quantizer):
    """Uniform symmetric block-wise integers, ``bits`` in 2..8.

    Blocks of ``blocksize`` run over the flattened tensor (the last may be partial).
    ``L = 2**(bits-1) - 1`` levels per side; ``scale = absmax / L``;
    ``code = clamp(round(w / scale), -L, L) + L`` stored as uint8 (so 0..2L);
    ``w ≈ (code - L) * scale``. ``Quantized.scales`` holds the block absmax, not ``scale``.
    An all-zero block has absmax 0 and decodes to zeros.
    """

    name = "int"

    def __init__(self, bits: int, blocksize: int):
        self.bits = bits
        self.blocksize = blocksize
        self.levels = 2 ** (bits - 1) - 1

    def _step(self, absmax: torch.Tensor) -> torch.Tensor:
        return absmax / self.levels

    def quantize(self, weight: torch.Tensor) -> Quantized:
        flat = weight.reshape(-1).float()
        n = flat.numel()
        blocks = math.ceil(n / self.blocksize)
        padded = torch.nn.functional.pad(flat, (0, blocks * self.blocksize - n)).reshape(blocks, self.blocksize)
        absmax = padded.abs().max(dim=-1).values if blocks else flat.new_empty(0)
        step = self._step(absmax)
        step = torch.where(step == 0, torch.ones_like(step), step)  # zero block: codes 0, no NaN
        q = torch.clamp(torch.round(padded / step.view(-1, 1)), -self.levels, self.levels) + self.levels
        codes = q.reshape(-1)[:n].to(torch.uint8).reshape(weight.shape)
        return Quantized(codes, absmax, weight.shape)

    def dequantize(self, q: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = q.codes.numel()
        step = per_element(self._step(q.scales.float()), n, self.blocksize)
        out = (q.codes.reshape(-1).float() - self.levels) * step
        return out.reshape(q.shape).to(dtype)

    def error_bound(self, weight: torch.Tensor) -> torch.Tensor:
        """``absmax_of_block / L / 2`` per element, plus float32 slack."""
        flat = weight.reshape(-1).float()
        n = flat.numel()
        blocks = math.ceil(n / self.blocksize)
        padded = torch.nn.functional.pad(flat, (0, blocks * self.blocksize - n)).reshape(blocks, self.blocksize)
        absmax = padded.abs().max(dim=-1).values if blocks else flat.new_empty(0)
        bound = absmax * (0.5 / self.levels + 1e-6)
        return per_element(bound, n, self.blocksize).reshape(weight.shape)


def uniform_int(bits: int, blocksize: int) -> UniformIntQuantizer:
    return UniformIntQuantizer(bits, blocksize)
