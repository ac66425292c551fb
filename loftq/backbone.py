"""How the quantized backbone is stored, and what the documented loader rebuilds from it.

Two formats:

* ``dequantized``: every target weight is replaced by Q in the source dtype; same names,
  shapes and dtypes as the source. Loaded with ``BitsAndBytesConfig`` (nf4/fp4, block 64,
  no double quant) or in full precision.
* ``bnb-4bit``: target weights serialized the way bitsandbytes/transformers save a 4-bit
  model (packed codes + absmax + quant_map + packed quant state), with the matching
  ``quantization_config`` in config.json; ``from_pretrained`` needs no extra config.

``as_loaded`` simulates the loader so the adapters can be fitted against the matrix a user
will really get (README "Exact with bitsandbytes").
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import torch

from loftq.options import ConvertOptions
from loftq.quantizers.base import Quantizer
from loftq.quantizers.bnb4bit import pack_4bit
from loftq.quantizers.registry import QUANTIZERS
from loftq.safetensors_io import TensorInfo
from loftq.targets import ModelLayout, Target

Entry = tuple[str, str, tuple[int, ...]]  # (tensor name, safetensors dtype, shape)


@dataclass(frozen=True)
class Backbone:
    options: ConvertOptions
    quantizer: Quantizer

    @property
    def packed(self) -> bool:
        return self.options.backbone_format == "bnb-4bit"

    def as_loaded(self, q: torch.Tensor, source_dtype: torch.dtype) -> torch.Tensor:
        """The fp32 out×in matrix the documented loader rebuilds from the stored Q."""
        if self.packed:  # codes and absmax of Q are stored; bnb dequantizes to the source dtype
            return self.quantizer.dequantize(self.quantizer.quantize(q), dtype=source_dtype).float()
        stored = q.to(source_dtype)
        reload = QUANTIZERS[self.options.quant].bnb_reload
        if reload is None:  # a fake-quantized format loads as the stored tensor itself
            return stored.float()
        if reload == "float16":  # bitsandbytes' Int8Params quantizes an fp16 copy
            stored = stored.half()
        return self.quantizer.dequantize(self.quantizer.quantize(stored), dtype=source_dtype).float()

    def entries(self, info: TensorInfo, target: Target | None) -> list[Entry]:
        if target is None or not self.packed:
            return [(info.name, info.dtype, info.shape)]
        numel = math.prod(info.shape)
        state = self._quant_state(info, target)
        return [
            (info.name, "U8", ((numel + 1) // 2, 1)),
            (f"{info.name}.absmax", "F32", (math.ceil(numel / self.options.blocksize),)),
            (f"{info.name}.quant_map", "F32", (16,)),
            (f"{info.name}.quant_state.bitsandbytes__{self.options.quant}", "U8", (len(state),)),
        ]

    def tensors(self, info: TensorInfo, target: Target, q: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The stored tensors of a target weight, in ``entries`` order."""
        if not self.packed:
            stored = q.T if target.fan_in_fan_out else q
            return [(info.name, stored.to(info.torch_dtype).contiguous())]
        # transformers quantizes Conv1D weights after transposing them to out×in, and
        # restores pre-quantized ones without transposing: store the out×in codes.
        quantized = self.quantizer.quantize(q)
        state = torch.frombuffer(bytearray(self._quant_state(info, target)), dtype=torch.uint8)
        return [
            (info.name, pack_4bit(quantized.codes, pad=self.quantizer.zero_code)),
            (f"{info.name}.absmax", quantized.scales.float().cpu()),
            (f"{info.name}.quant_map", self.quantizer.code.clone()),  # nf4's or fp4's table, as bnb stores it
            (f"{info.name}.quant_state.bitsandbytes__{self.options.quant}", state),
        ]

    def _quant_state(self, info: TensorInfo, target: Target) -> bytes:
        """bitsandbytes' packed non-tensor quant state (``QuantState.as_dict(packed=True)``)."""
        shape = list(info.shape)[::-1] if target.fan_in_fan_out else list(info.shape)
        dtype = str(info.torch_dtype).removeprefix("torch.")
        state = {"quant_type": self.options.quant, "blocksize": self.options.blocksize, "dtype": dtype, "shape": shape}
        return json.dumps(state).encode("utf-8")

    def config_update(self, config: dict, layout: ModelLayout) -> dict:
        """config.json of the output: unchanged, or with the bnb quantization_config."""
        if not self.packed:
            return config
        from transformers import BitsAndBytesConfig

        targeted = {t.module for t in layout.targets.values()}
        skip = [re.escape(m) for m in layout.linear_modules if m not in targeted]
        source_dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
        quant_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.options.quant,
            bnb_4bit_use_double_quant=False,
            bnb_4bit_compute_dtype=source_dtype,
            llm_int8_skip_modules=skip,
        ).to_dict()
        return {**config, "quantization_config": quant_config}
