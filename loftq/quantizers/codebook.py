"""Block-wise absmax plus a codebook: the engine the 4-bit (nf4, fp4) and normal-float (nf2, nf3) formats share.

Each format is a table of values in [-1, 1] (loftq/quantizers/bnb4bit.py, normal_float.py);
the scaling, encoding and decoding here replicate bitsandbytes' reference kernels operation by
operation, so the codes and scales are bit-identical to what bitsandbytes would store.
"""

from __future__ import annotations

import math

import torch

from loftq.quantizers.base import TINY, Quantized, Quantizer, per_element
from loftq.threads import one_cpu_thread


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
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=TINY).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=TINY)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    return scaled, absmax


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
                torch.mul(part, 1.0 / absmax.clamp(min=TINY), out=s).clamp_(-1, 1)
                torch.add(s, 1, out=w).mul_(half)
                j.copy_(w.view(-1)).clamp_(0, self.cells)  # floor (w >= 0); the clamp only catches NaN
                torch.index_select(boundary, 0, j, out=t)
                torch.gt(s, t.view(c, size), out=w)  # 1.0 where x lies above its cell's boundary
                w.view(-1).add_(j, alpha=2)
                j.copy_(w.view(-1))
                torch.index_select(values, 0, j, out=t)
                torch.mul(t.view(c, size), absmax, out=out[start : start + c])


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
        out = values * per_element(q.scales.float(), n, self.blocksize)
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
            am = tail.abs().max().clamp(min=TINY)
            out[full:] = self.code.to(flat.device)[self._encode(torch.clamp(tail / am, -1, 1)).long()] * am
        return out.view(weight.shape)

    def error_bound(self, weight: torch.Tensor) -> torch.Tensor:
        """``absmax_of_block * (widest_gap / 2 + 1e-6)`` per element."""
        flat = weight.reshape(-1).float()
        _, absmax = _blockwise_absmax(flat, self.blocksize)
        return (per_element(absmax, flat.numel(), self.blocksize) * self._unit_error).reshape(weight.shape)

