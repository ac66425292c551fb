"""The quantizers there are, as data: the one table options, CLI and converter read.

Torch-free, so ``loftq.options`` validates a request without torch (the job API imports it).
Each entry names the function that builds its torch implementation, ``"module:function"``
called with ``(bits, blocksize)``; the module is imported on first use. Adding a quantizer is
one entry here, plus its module when it is a new family.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from loftq.errors import InvalidOptions

if TYPE_CHECKING:
    from loftq.quantizers.base import Quantizer


@dataclass(frozen=True)
class QuantizerSpec:
    """What is known about a quantizer before torch is imported."""

    name: str
    bits: tuple[int, ...]
    """The widths it takes; a fixed-width format has one, which bits left out default to."""
    builder: str
    """``"module:function"`` returning the torch implementation for ``(bits, blocksize)``."""
    note: str = ""
    """Shown after the name in help texts, e.g. ``int8 (row-wise)``."""
    bnb_reload: Literal["source", "float16"] | None = None
    """What a bitsandbytes loader quantizes again when it loads the dequantized backbone: the
    weight in the checkpoint's dtype (4-bit), a float16 copy of it (``Int8Params``), or nothing
    (None: a fake-quantized format, loaded as the stored tensor itself). The adapters are fitted
    to what that loader rebuilds."""
    bnb_4bit: bool = False
    """Storable as ``backbone_format='bnb-4bit'`` (bitsandbytes' packed 4-bit serialization)."""

    @property
    def fixed_bits(self) -> int | None:
        return self.bits[0] if len(self.bits) == 1 else None

    @property
    def widths(self) -> str:
        """``4``, or ``2..8`` for a quantizer of several widths."""
        return str(self.bits[0]) if len(self.bits) == 1 else f"{self.bits[0]}..{self.bits[-1]}"

    @property
    def label(self) -> str:
        return f"{self.name} ({self.note})" if self.note else self.name

    def bits_problem(self, bits: int) -> str | None:
        """Why ``bits`` does not fit this quantizer, or None."""
        if bits in self.bits:
            return None
        if self.fixed_bits is not None:
            return f"quant={self.name} is a {self.fixed_bits}-bit format, got bits={bits}"
        return f"quant={self.name} takes bits {self.widths}, got bits={bits}"

    def build(self, bits: int, blocksize: int) -> Quantizer:
        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)(bits, blocksize)


QUANTIZERS: dict[str, QuantizerSpec] = {
    spec.name: spec
    for spec in (
        QuantizerSpec("nf4", (4,), "loftq.quantizers.bnb4bit:nf4", bnb_reload="source", bnb_4bit=True),
        QuantizerSpec("fp4", (4,), "loftq.quantizers.bnb4bit:fp4", bnb_reload="source", bnb_4bit=True),
        QuantizerSpec("int8", (8,), "loftq.quantizers.int8:int8_rowwise", note="row-wise", bnb_reload="float16"),
        QuantizerSpec("int", tuple(range(2, 9)), "loftq.quantizers.uniform:uniform_int", note="uniform block-wise"),
        QuantizerSpec("nf2", (2,), "loftq.quantizers.normal_float:normal_float"),
        QuantizerSpec("nf3", (3,), "loftq.quantizers.normal_float:normal_float"),
    )
}
"""Every quantizer by name, in the order help texts and the options' schema list them."""

QUANT_HELP = ", ".join(spec.label for spec in QUANTIZERS.values())
"""``nf4, fp4, int8 (row-wise), ...``: the quantizers as help texts list them."""

BITS_HELP = ", ".join(f"{spec.name} {spec.widths}" for spec in QUANTIZERS.values())
"""``nf4 4, ..., int 2..8, ...``: the widths each quantizer takes."""


def get_quantizer(quant: str, bits: int, blocksize: int = 64) -> Quantizer:
    """Build the quantizer for ``quant``/``bits``/``blocksize``; ``InvalidOptions`` if they don't fit.

    ``blocksize`` is ignored by ``int8`` (row-wise). Any ``blocksize >= 1`` is accepted here;
    bitsandbytes itself only serialises nf4/fp4 with power-of-two block sizes 32..4096.
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise InvalidOptions(f"bits must be an integer, got {bits!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise InvalidOptions(f"blocksize must be an integer >= 1, got {blocksize!r}")
    spec = QUANTIZERS.get(quant)
    if spec is None:
        raise InvalidOptions(f"unknown quant {quant!r}; expected one of {', '.join(QUANTIZERS)}")
    problem = spec.bits_problem(bits)
    if problem is not None:
        raise InvalidOptions(problem)
    return spec.build(bits, blocksize)
