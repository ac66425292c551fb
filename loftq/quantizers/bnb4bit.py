"""bitsandbytes' 4-bit formats, nf4 and fp4: their code tables and their packed storage.

Pure torch, never imports bitsandbytes: the tables are bitsandbytes' own (checked against it
in the tests), so a model loaded with ``BitsAndBytesConfig`` gets back the very codes fitted here.
"""

from __future__ import annotations

import torch

from loftq.quantizers.codebook import CodebookQuantizer

# bitsandbytes' NF4 table (functional.get_4bit_type("nf4")), sorted ascending.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

# bitsandbytes' FP4 table (functional.get_4bit_type("fp4")): the E2M1 values in
# bit-pattern order, divided by 12 in float32. bnb's quantize_4bit kernel takes its
# decision boundaries from this exact table too (via _get_4bit_code), NOT from the
# 4-decimal rounding _FP4_QUANT_TABLE in bitsandbytes/backends/utils.py, which that path never reads.
FP4_CODE = torch.tensor(
    [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
    dtype=torch.float32,
).div_(12.0)


def nf4(bits: int, blocksize: int) -> CodebookQuantizer:
    return CodebookQuantizer("nf4", 4, NF4_CODE, blocksize)


def fp4(bits: int, blocksize: int) -> CodebookQuantizer:
    return CodebookQuantizer("fp4", 4, FP4_CODE, blocksize)


def pack_4bit(codes: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """Pack 4-bit codes two per byte, bitsandbytes' layout: high nibble first.

    Flattens, pads to an even count with ``pad``, returns uint8 of shape ``(ceil(n/2), 1)``.
    bnb itself pads the *scaled values* with 0.0 before encoding, so its pad nibble is the
    code of 0.0 (7 for nf4, see ``CodebookQuantizer.zero_code``); the pad nibble is never
    read back, so ``pad`` only matters for byte-identical files.
    """
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_full((1,), pad)])
    return ((flat[0::2] << 4) | flat[1::2]).unsqueeze(1)


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_4bit`: flat uint8 codes, the first ``numel`` of them."""
    flat = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    out = torch.empty(flat.numel() * 2, dtype=torch.uint8, device=flat.device)
    out[0::2] = flat >> 4
    out[1::2] = flat & 0xF
    return out[:numel]
