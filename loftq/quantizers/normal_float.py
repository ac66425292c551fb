"""LoftQ's normal-float formats (nf2, nf3): codebooks of normal quantiles, fake-quantized.

The backbone stores their dequantized values: no runtime loads these codes, so only the values
have to match LoftQ's reference.
"""

from __future__ import annotations

import torch

from loftq.quantizers.codebook import CodebookQuantizer


def normal_float_code(bits: int, offset: float = 0.9677083) -> torch.Tensor:
    """LoftQ's asymmetric normal-float codebook (``create_normal_map(symmetric=False)``).

    Quantiles of N(0, 1): ``2**bits / 2`` positive values, zero, and one fewer negative
    value, sorted and normalised so the maximum is exactly 1.0. The reference evaluates
    ``scipy.stats.norm.ppf`` (float64) on a float32 ``linspace``; ``torch.special.ndtri``
    is the same function, so we avoid the scipy dependency.
    """
    variations = 2**bits

    def ppf(count: int) -> torch.Tensor:
        probs = torch.linspace(offset, 0.5, count, dtype=torch.float32)[:-1]
        return torch.special.ndtri(probs.double())

    values = torch.cat([ppf(variations // 2 + 1), torch.zeros(1, dtype=torch.float64), -ppf(variations // 2)])
    values = values.float().sort().values
    return values / values.max()


def normal_float(bits: int, blocksize: int) -> CodebookQuantizer:
    return CodebookQuantizer(f"nf{bits}", bits, normal_float_code(bits), blocksize)
