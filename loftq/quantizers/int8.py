"""bitsandbytes' LLM.int8() weight format (int8): row-wise absmax, one int8 code per weight."""

from __future__ import annotations

import torch

from loftq.quantizers.base import Quantized, Quantizer


class Int8RowwiseQuantizer(Quantizer):
    """bitsandbytes LLM.int8() weights (``Int8Params``): row-wise absmax, int8 codes.

    ``row_stats = max|row|``; ``codes = round(W * (127 / row_stats))``, computed exactly as
    ``bitsandbytes.functional.int8_vectorwise_quant``. Rows are the last dimension (a 1-D
    tensor is one row). All-zero rows get codes 0 and row_stats 0 instead of bnb's NaN.
    Note: ``Int8Params`` casts the weight to float16 before this step; we quantize the
    float32 weight as given.
    """

    name = "int8"
    bits = 8
    blocksize = None

    @staticmethod
    def _rows(weight: torch.Tensor) -> torch.Tensor:
        return weight.float().reshape(-1, weight.shape[-1] if weight.dim() else 1)

    def quantize(self, weight: torch.Tensor) -> Quantized:
        rows = self._rows(weight)
        row_stats = rows.abs().max(dim=1).values
        divisor = torch.where(row_stats == 0, torch.ones_like(row_stats), row_stats)
        codes = torch.round(rows * (127.0 / divisor.unsqueeze(-1))).to(torch.int8)
        return Quantized(codes.reshape(weight.shape), row_stats, weight.shape)

    def dequantize(self, q: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # bnb's int8_vectorwise_dequant multiplies by the float reciprocal of 127 rather
        # than dividing; we do the same so the numbers match bit for bit.
        rows = q.codes.reshape(q.scales.numel(), -1)
        out = rows * q.scales.float().view(-1, 1) * 7.874015718698502e-3
        return out.reshape(q.shape).to(dtype)

    def error_bound(self, weight: torch.Tensor) -> torch.Tensor:
        """``row_stats / 127 / 2`` per element, plus float32 slack."""
        rows = self._rows(weight)
        row_stats = rows.abs().max(dim=1, keepdim=True).values
        return (row_stats * (0.5 / 127 + 1e-6)).expand_as(rows).reshape(weight.shape)


def int8_rowwise(bits: int, blocksize: int) -> Int8RowwiseQuantizer:
    return Int8RowwiseQuantizer()
