"""Weight quantizers: the "Q" of LoftQ's W ≈ Q + B·A.

Pure torch, runs on any device, and never imports bitsandbytes: the 4-bit and int8 paths
replicate bitsandbytes' own reference kernels operation by operation, so the codes and
scales we produce are bit-identical to what bitsandbytes would store for the same weight.
That matters because LoftQ fits the adapters to the residual ``W - dequant(Q)``: if the
runtime quantized the backbone differently, the adapters would correct the wrong error.

Families:

* ``nf4`` / ``fp4``: bitsandbytes 4-bit, block-wise absmax over the flattened tensor.
* ``nf2`` / ``nf3``: LoftQ's asymmetric normal-float codebooks, same block-wise scheme.
* ``int8``: bitsandbytes LLM.int8() row-wise absmax (``Int8Params``).
* ``int``: uniform symmetric block-wise integers, 2..8 bits.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from loftq.errors import InvalidOptions
from loftq.threads import one_cpu_thread

__all__ = [
    "FP4_CODE",
    "NF4_CODE",
    "CodebookQuantizer",
    "Int8RowwiseQuantizer",
    "Quantized",
    "Quantizer",
    "UniformIntQuantizer",
    "get_quantizer",
    "normal_float_code",
    "pack_4bit",
    "unpack_4bit",
]

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
# 4-decimal rounding _FP4_QUANT_TABLE in backends/utils.py, which that path never reads.
FP4_CODE = torch.tensor(
    [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
    dtype=torch.float32,
).div_(12.0)

# bitsandbytes clamps a block's absmax to this before dividing (avoids 0/0 in zero blocks).
_TINY = 1e-38


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


# --------------------------------------------------------------------------- helpers


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ``flat`` (fp32, 1-D) block-wise into [-1, 1] exactly as bitsandbytes does.

    Full blocks are multiplied by ``1.0 / absmax``; the trailing partial block is divided
    by its absmax (bnb's reference kernel does both, and the two round differently). A
    partial block's stored absmax is clamped to 1e-38, a full block's is not: also bnb.
    Returns ``(scaled, absmax)``.
    """
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = full // blocksize
    body = flat[:full].reshape(blocks, blocksize)
    absmax = body.abs().max(dim=-1)[0] if blocks else flat.new_empty(0)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=_TINY).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=_TINY)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    return scaled, absmax


def _per_element(block_values: torch.Tensor, numel: int, blocksize: int) -> torch.Tensor:
    """Broadcast one value per block to one value per element of the flattened tensor."""
    return block_values.repeat_interleave(blocksize)[:numel]


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


FAKE_QUANTIZE_CHUNK = 1 << 17
"""Elements per chunk of ``CodebookQuantizer.fake_quantize`` on CPU: its dozen passes then
run in cache (512 KiB per fp32 buffer) instead of streaming the whole weight each time."""


FAKE_QUANTIZE_CHUNK_ACCELERATOR = 1 << 24
"""The same on other devices: large (few kernel launches), bounded for the scratch memory."""


class _CellTable:
    """Nearest-codebook decoding through a uniform grid over [-1, 1], for fake quantization.

    The grid has ``cells`` cells of width 2/cells, a power of two so that the cell index
    ``(x + 1) * cells / 2`` is off by at most one cell, and only within 2**-23 of an edge.
    It is fine enough that each cell, widened by ``_MARGIN`` on both sides, holds at most one
    decision boundary, so the number of boundaries below x (what bucketize returns, ties
    going to the lower value) is ``below[j] + (x > boundary[j])`` (boundary +inf in a cell
    without one). ``values[2j + hit]`` stores the decoded value for both outcomes.
    """

    _MARGIN = 1e-6
    _MAX_CELLS = 1 << 16

    def __init__(self, cells: int, boundary: torch.Tensor, values: torch.Tensor):
        self.cells = cells
        self.boundary = boundary
        self.values = values
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def build(cls, sorted_code: torch.Tensor, bounds: torch.Tensor) -> _CellTable:
        b64 = bounds.double()
        cells = 32
        inside = torch.ones(1, 2, dtype=torch.bool)
        while int(inside.sum(dim=1).max()) > 1:
            cells *= 2
            if cells > cls._MAX_CELLS:
                raise ValueError("codebook boundaries too close together for the cell table")
            left = torch.arange(cells + 1, dtype=torch.float64) * (2 / cells) - 1 - cls._MARGIN
            right = left + 2 / cells + 2 * cls._MARGIN
            inside = (b64[None, :] >= left[:, None]) & (b64[None, :] <= right[:, None])
        below = (b64[None, :] < left[:, None]).sum(dim=1)
        boundary = torch.where(inside.any(dim=1), (bounds[None, :] * inside).sum(dim=1), torch.tensor(math.inf))
        # a cell's lone boundary, exactly as stored in fp32 (x*1 and +0 are exact)
        last = sorted_code.numel() - 1
        values = torch.stack([sorted_code[below.clamp(max=last)], sorted_code[(below + 1).clamp(max=last)]], dim=1)
        return cls(cells, boundary.float(), values.reshape(-1).float())

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on:
            self._on[device] = (self.boundary.to(device), self.values.to(device))
        return self._on[device]

    def fake_quantize_blocks(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        """Write ``code[nearest] * absmax`` of every full block (rows of ``blocks``) to ``out``;
        the scaling is bnb's full-block one, ``x * (1 / absmax)`` clamped to [-1, 1]."""
        boundary, values = self._tables(blocks.device)
        rows, size = blocks.shape
        elements = FAKE_QUANTIZE_CHUNK if blocks.device.type == "cpu" else FAKE_QUANTIZE_CHUNK_ACCELERATOR
        step = max(1, elements // size)
        chunk = min(step, rows)
        scaled = blocks.new_empty(chunk, size)
        work = blocks.new_empty(chunk, size)
        index = torch.empty(chunk * size, dtype=torch.int32, device=blocks.device)
        looked_up = blocks.new_empty(chunk * size)
        half = self.cells / 2
        with one_cpu_thread(blocks.device):
            for start in range(0, rows, step):
                part = blocks[start : start + step]
                c = part.shape[0]
                s, w, j, t = scaled[:c], work[:c], index[: c * size], looked_up[: c * size]
                absmax = torch.amax(torch.abs(part, out=s), dim=-1, keepdim=True)
                torch.mul(part, 1.0 / absmax.clamp(min=_TINY), out=s).clamp_(-1, 1)
                torch.add(s, 1, out=w).mul_(half)
                j.copy_(w.view(-1)).clamp_(0, self.cells)  # floor (w >= 0); the clamp only catches NaN
                torch.index_select(boundary, 0, j, out=t)
                torch.gt(s, t.view(c, size), out=w)  # 1.0 where x lies above its cell's boundary
                w.view(-1).add_(j, alpha=2)
                j.copy_(w.view(-1))
                torch.index_select(values, 0, j, out=t)
                torch.mul(t.view(c, size), absmax, out=out[start : start + c])


# --------------------------------------------------------------------------- families


class CodebookQuantizer(Quantizer):
    """Block-wise absmax + nearest codebook value: nf4, fp4, nf2, nf3.

    ``code`` is the decoding table (index -> value), in any order (fp4 is in bit-pattern
    order). Encoding is bitsandbytes' ``bucketize`` against the midpoints of the sorted
    table, then a remap through the sort order; a value exactly on a midpoint goes to the
    lower of its two neighbours.
    """

    def __init__(self, name: str, bits: int, code: torch.Tensor, blocksize: int):
        self.name = name
        self.bits = bits
        self.blocksize = blocksize
        self.code = code.to(torch.float32)
        # Same operations as bnb's _get_4bit_quantize_bounds. fp4's 0.0 and -0.0 tie; bnb's
        # (unstable) argsort keeps table order for them on CPU, which stable=True pins down.
        self._order = torch.argsort(self.code, stable=True)
        self._sorted = bool(torch.equal(self._order, torch.arange(self.code.numel())))
        sorted_code = self.code[self._order]
        self._bounds = (sorted_code[:-1] + sorted_code[1:]) / 2
        # Worst case distance to the decoded value, in units of absmax: half the widest
        # gap, plus float32 slack for the 1/absmax scaling and the clamp to [-1, 1].
        self._unit_error = float((sorted_code[1:] - sorted_code[:-1]).max()) / 2 + 1e-6
        self._cells = _CellTable.build(sorted_code, self._bounds)

    def _encode(self, scaled: torch.Tensor) -> torch.Tensor:
        idx = torch.bucketize(scaled, self._bounds.to(scaled.device), out_int32=True)
        if not self._sorted:
            idx = self._order.to(scaled.device)[idx]
        return idx.to(torch.uint8)

    @property
    def zero_code(self) -> int:
        """Code that 0.0 encodes to: bitsandbytes' pad nibble for odd element counts."""
        return int(self._encode(torch.zeros(1))[0])

    def quantize(self, weight: torch.Tensor) -> Quantized:
        flat = weight.reshape(-1).float()
        scaled, absmax = _blockwise_absmax(flat, self.blocksize)
        return Quantized(self._encode(scaled).reshape(weight.shape), absmax, weight.shape)

    def dequantize(self, q: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # fp32 code[idx] * absmax, then one cast: the same numbers as bnb's reference
        # kernel and its CPU C kernels (checked in tests for fp32, bf16 and fp16 output).
        n = q.codes.numel()
        values = self.code.to(q.codes.device)[q.codes.reshape(-1).long()]
        out = values * _per_element(q.scales.float(), n, self.blocksize)
        return out.reshape(q.shape).to(dtype)

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """``dequantize(quantize(weight))`` bit for bit, without materialising the codes.

        The per-layer fit quantizes the whole weight every iteration, where bucketize and a
        separate decode pass would cost about as much as the low-rank solve (6× this on CPU).
        Each value comes from the cell table instead: two table look-ups and one comparison
        per element, the same ``x > midpoint`` decision as bucketize, in cache-sized chunks.
        """
        flat = weight.reshape(-1).float()
        n = flat.numel()
        full = n - n % self.blocksize
        out = torch.empty(n, dtype=torch.float32, device=flat.device)
        if full:
            self._cells.fake_quantize_blocks(
                flat[:full].view(-1, self.blocksize), out[:full].view(-1, self.blocksize)
            )
        if full < n:  # the partial block divides by its clamped absmax (bnb does, see _blockwise_absmax)
            tail = flat[full:]
            am = tail.abs().max().clamp(min=_TINY)
            out[full:] = self.code.to(flat.device)[self._encode(torch.clamp(tail / am, -1, 1)).long()] * am
        return out.view(weight.shape)

    def error_bound(self, weight: torch.Tensor) -> torch.Tensor:
        """``absmax_of_block * (widest_gap / 2 + 1e-6)`` per element."""
        flat = weight.reshape(-1).float()
        _, absmax = _blockwise_absmax(flat, self.blocksize)
        return (_per_element(absmax, flat.numel(), self.blocksize) * self._unit_error).reshape(weight.shape)


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
        step = _per_element(self._step(q.scales.float()), n, self.blocksize)
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
        return _per_element(bound, n, self.blocksize).reshape(weight.shape)


# --------------------------------------------------------------------------- factory

_FIXED_BITS = {"nf4": 4, "fp4": 4, "int8": 8, "nf2": 2, "nf3": 3}


def get_quantizer(quant: str, bits: int, blocksize: int = 64) -> Quantizer:
    """Build the quantizer for ``quant``/``bits``/``blocksize``; ``InvalidOptions`` if they don't fit.

    ``blocksize`` is ignored by ``int8`` (row-wise). Any ``blocksize >= 1`` is accepted here;
    bitsandbytes itself only serialises nf4/fp4 with power-of-two block sizes 32..4096.
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise InvalidOptions(f"bits must be an integer, got {bits!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise InvalidOptions(f"blocksize must be an integer >= 1, got {blocksize!r}")
    if quant in _FIXED_BITS:
        if bits != _FIXED_BITS[quant]:
            raise InvalidOptions(f"quant={quant} is a {_FIXED_BITS[quant]}-bit format, got bits={bits}")
    elif quant == "int":
        if not 2 <= bits <= 8:
            raise InvalidOptions(f"quant=int takes bits 2..8, got bits={bits}")
        return UniformIntQuantizer(bits, blocksize)
    else:
        raise InvalidOptions(f"unknown quant {quant!r}; expected one of nf4, fp4, int8, int, nf2, nf3")

    if quant == "nf4":
        return CodebookQuantizer("nf4", 4, NF4_CODE, blocksize)
    if quant == "fp4":
        return CodebookQuantizer("fp4", 4, FP4_CODE, blocksize)
    if quant == "int8":
        return Int8RowwiseQuantizer()
    return CodebookQuantizer(quant, bits, normal_float_code(bits), blocksize)
