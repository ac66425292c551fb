"""Typed, validated settings of one conversion.

The same model is used by the CLI, the Python API and (later) the job service, so a
setting means the same thing and is checked the same way everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from loftq.quantizers.registry import BITS_HELP, QUANT_HELP, QUANTIZERS
from loftq.target_regex import compile_target_regex

QuantName = Literal[tuple(QUANTIZERS)]  # type: ignore[valid-type]  # the registry's names, an enum in the JSON schema
SvdMethod = Literal["exact", "randomized"]
Objective = Literal["weight", "activation", "activation-diag"]
BackboneFormat = Literal["dequantized", "bnb-4bit"]
Propagation = Literal["full-precision", "initialised"]
Refine = Literal["none", "block", "model", "block+model"]
RefineTarget = Literal["model", "block"]
DeviceName = str  # "auto", "cpu", "cuda", "cuda:1", ...

ALL_LINEAR = "all-linear"
STORED = {"stored": True}
"""Validation context of a record read back from storage (a job in the service's store): the
checks added after it was written must not make it unreadable; whoever runs it validates it
afresh (worker/runner.py)."""


def stored(info: ValidationInfo) -> bool:
    """Whether this validation reads a stored record (``STORED``) rather than a new request."""
    return bool(info.context and info.context.get("stored"))


@dataclass(frozen=True)
class CalibrationNeed:
    """Why a conversion needs calibration text, in parts, so each front end names the option its own way
    (a CLI flag, a field of the job request) without parsing a sentence."""

    field: str
    """The option asking for the text, as a path in ConvertOptions: "objective", "refine" or "calibration.evaluate"."""
    value: str | None
    """Its value as set (``'activation'``, ``'block'``); None for a switch (evaluate)."""
    message: str
    """What it does with the text, e.g. "refines the adapters on calibration text"."""


class CalibrationOptions(BaseModel):
    """How calibration text is turned into activations, and what is measured with it.

    Used only when a conversion is given calibration data (``objective`` activation or
    activation-diag, or ``evaluate``). Decoders get ``samples`` windows of ``seq_len`` tokens
    cut from the concatenated documents; encoders get one document per sequence, truncated
    to ``seq_len``. The held-out sequences are drawn first and never used for fitting.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    samples: int = Field(64, ge=1, le=4096, description="Calibration sequences (N).")
    seq_len: int = Field(512, ge=8, le=32768, description="Tokens per sequence (L); capped at the model's maximum length.")
    eval_samples: int = Field(16, ge=0, le=4096, description="Held-out sequences for evaluate (not used for fitting).")
    seed: int = Field(0, ge=0, lt=2**63, description="Seed of the sampling of sequences (0 ≤ seed < 2^63, what torch's generator takes).")
    batch_size: int = Field(8, ge=1, le=1024, description="Sequences per forward pass through a block.")
    propagation: Propagation = Field(
        "initialised",
        description=(
            "What block k+1 is calibrated on: 'initialised' feeds it the outputs of the already initialised "
            "blocks (Q + scaling·B·A), so later layers adapt to earlier layers' quantization; 'full-precision' "
            "feeds it the original model's activations."
        ),
    )
    evaluate: bool = Field(
        False,
        description="Measure held-out perplexity (decoders) and output similarity of the full-precision, plainly quantized and initialised models.",
    )

    @model_validator(mode="after")
    def _evaluate_needs_held_out(self) -> CalibrationOptions:
        if self.evaluate and self.eval_samples == 0:
            raise ValueError("evaluate needs held-out sequences: eval_samples must be at least 1")
        return self


class RefineOptions(BaseModel):
    """How the closed-form adapters are refined on the calibration data (``ConvertOptions.refine``).

    Block stage: each block's adapters (A, B of its targets; Q stays what is stored) take
    ``steps`` Adam steps so that the block's output on its propagated calibration inputs
    matches the full-precision one (``target``); they are kept only if that beats the
    closed-form adapters on the ``holdout`` share of the calibration sequences, which the steps
    never see. Model stage: ``model_steps`` steps on the whole initialised model, minimising the
    KL divergence of its next-token distribution to the full-precision model's (decoders) or the
    error of its final hidden states (encoders). Defaults are measured in bench/README.md.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    steps: int = Field(20, ge=1, le=100_000, description="Block stage: Adam steps per block.")
    lr: float = Field(0.01, gt=0, le=1, description="Block stage: relative learning rate (each tensor moves by about lr × its RMS per step).")
    batch_size: int = Field(2, ge=1, le=1024, description="Block stage: calibration sequences per step.")
    holdout: float = Field(
        0.125,
        gt=0,
        lt=1,
        description=(
            "Block stage: share of the calibration sequences held out of the steps (at least one); a block keeps "
            "its refined adapters only if their output error on these is lower than the closed-form adapters'."
        ),
    )
    target: RefineTarget = Field(
        "block",
        description=(
            "Block stage: what a block's output should match. 'block': the full-precision block's output on the same "
            "(propagated) inputs, computed while the second moments are collected; 'model': the full-precision model's "
            "hidden states after that block, so the block also learns to undo upstream quantization error (one more "
            "forward pass per block and a second copy of the stream)."
        ),
    )
    model_steps: int = Field(20, ge=1, le=100_000, description="Model stage: Adam steps over the whole model.")
    model_lr: float = Field(0.003, gt=0, le=1, description="Model stage: relative learning rate (as lr).")
    model_batch_size: int = Field(4, ge=1, le=1024, description="Model stage: calibration sequences per step.")


class ConvertOptions(BaseModel):
    """Everything that decides the numbers in a LoftQ checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    quant: QuantName = Field("nf4", description=f"Quantizer family: {QUANT_HELP}.")
    bits: int = Field(4, ge=2, le=8, description=f"Bits per weight, implied by a fixed-width quantizer: {BITS_HELP}.")
    blocksize: int = Field(64, ge=16, le=4096, description="Elements per absmax block (block-wise quantizers).")
    rank: int = Field(16, ge=1, le=1 << 16, description="LoRA rank r (at most the smaller side of every target layer).")
    lora_alpha: float = Field(None, gt=0, description="LoRA alpha (default: r); scaling = alpha/r (alpha/sqrt(r) with rslora).")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r).")
    iters: int = Field(1, ge=1, le=100, description="LoftQ alternating iterations T.")
    svd: SvdMethod = Field("randomized", description="Low-rank solver: exact SVD or randomized SVD.")
    svd_oversample: int = Field(
        16,
        ge=0,
        le=1024,
        description=(
            "Randomized SVD: columns beyond the rank in each block Krylov block; blocks narrower than 64 columns are "
            "widened to 64 where the Krylov space still fits in the matrix (a thinner block saves little time)."
        ),
    )
    svd_power_iters: int = Field(
        8, ge=0, le=64, description="Randomized SVD: depth of the block Krylov space (products with A·Aᵀ); at most 64."
    )
    seed: int = Field(
        0, ge=0, lt=2**63, description="Seed of the randomized solver (results are reproducible; 0 ≤ seed < 2^63, what torch's generator takes)."
    )
    objective: Objective = Field(
        "weight",
        description=(
            "What the per-layer fit minimises: 'weight': ‖W − Q − B·A‖ (plain LoftQ); 'activation': the error in the "
            "metric of the layer's calibration inputs, ‖(W − Q − B·A)·H^½‖ with H = XᵀX/n; 'activation-diag': the same "
            "with only diag(H) in the fit (no whitening matrix; the reported output error of calibrated conversions still uses the full H)."
        ),
    )
    damping: float = Field(
        0.01,
        ge=0,
        le=10,
        description="Activation objectives: H + damping·mean(diag H)·I is used, so rarely-seen input directions still count and H is invertible.",
    )
    calibration: CalibrationOptions = Field(
        default_factory=CalibrationOptions, description="Calibration and evaluation settings (used only with calibration data)."
    )
    refine: Refine = Field(
        "none",
        description=(
            "Refinement of the closed-form adapters on the calibration data (needs calibration data): 'block' fits "
            "each block's adapters to the full-precision block outputs, 'model' trains all adapters against the "
            "full-precision model's outputs, 'block+model' both in turn; settings in refinement."
        ),
    )
    refinement: RefineOptions = Field(
        default_factory=RefineOptions, description="Refinement settings (used only when refine is not 'none')."
    )
    target_modules: str | list[str] = Field(
        ALL_LINEAR,
        description=(
            "'all-linear', a list of module-name suffixes (e.g. q_proj), or a regex matched in full against module names "
            "(RE2 syntax, at most 1000 characters: no backreferences or lookaround)."
        ),
    )
    backbone_format: BackboneFormat = Field(
        "dequantized",
        description="'dequantized': Q in the source dtype (load with BitsAndBytesConfig); 'bnb-4bit': bitsandbytes 4-bit serialization.",
    )
    device: DeviceName = Field("auto", description="Compute device: auto (cuda if available), cpu, cuda, cuda:N.")

    @field_validator("device")
    @classmethod
    def _device_the_engine_runs_on(cls, value: str, info: ValidationInfo) -> str:
        """Refused here, before a job is queued: any other torch device (meta, mps, xpu) fails
        inside the conversion. Whether cuda:N exists is the worker's to say (invalid_options)."""
        if stored(info):
            return value
        index = value.removeprefix("cuda:")
        if value not in ("auto", "cpu", "cuda") and not (index != value and index.isascii() and index.isdigit() and len(index) <= 4):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value[:40]!r}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _defaults_from_other_fields(cls, data: object) -> object:
        """A null lora_alpha is the default (r); bits left out are the fixed-width quantizer's
        own (int8 means 8), so only bits that were given can contradict the quantizer."""
        if not isinstance(data, dict):
            return data
        if "lora_alpha" in data and data["lora_alpha"] is None:
            data = {key: value for key, value in data.items() if key != "lora_alpha"}
        if data.get("bits") is None:
            quant = data.get("quant", "nf4")
            data = {key: value for key, value in data.items() if key != "bits"}
            spec = QUANTIZERS.get(quant) if isinstance(quant, str) else None
            if spec is not None and spec.fixed_bits is not None:
                data["bits"] = spec.fixed_bits
        return data

    @model_validator(mode="after")
    def _alpha_defaults_to_rank(self) -> ConvertOptions:
        """After validation, so a rank sent as 8.0 or "8" gives alpha 8 and a bad rank is
        reported as itself, not as an invalid lora_alpha."""
        if self.lora_alpha is None:
            object.__setattr__(self, "lora_alpha", float(self.rank))  # frozen: set once, while validating
        return self

    @field_validator("target_modules")
    @classmethod
    def _non_empty_targets(cls, value: str | list[str], info: ValidationInfo) -> str | list[str]:
        if stored(info):
            return value
        if isinstance(value, list):
            if not value or any(not name.strip() for name in value):
                raise ValueError("target_modules list must hold non-empty module names")
        elif not value.strip():
            raise ValueError("target_modules must not be empty")
        elif value != ALL_LINEAR:
            # Refused here, before a job is queued, rather than when the model is read; RE2
            # (loftq/target_regex.py) so that no pattern can backtrack for minutes on a worker.
            compile_target_regex(value)
        return value

    @model_validator(mode="after")
    def _bits_match_quant(self) -> ConvertOptions:
        spec = QUANTIZERS[self.quant]
        problem = spec.bits_problem(self.bits)
        if problem is not None:
            raise ValueError(problem)
        if self.backbone_format == "bnb-4bit" and not spec.bnb_4bit:
            packable = " or ".join(name for name, spec in QUANTIZERS.items() if spec.bnb_4bit)
            raise ValueError(f"backbone_format='bnb-4bit' needs quant {packable}")
        return self

    @property
    def calibration_need(self) -> CalibrationNeed | None:
        """Why these options need calibration text (None when they do not): the one place the rule is written."""
        if self.objective != "weight":
            return CalibrationNeed("objective", self.objective, "fits each layer in the metric of its calibration inputs")
        if self.refine != "none":
            return CalibrationNeed("refine", self.refine, "refines the adapters on calibration text")
        if self.calibration.evaluate:
            return CalibrationNeed("calibration.evaluate", None, "measures the model on held-out calibration text")
        return None

    @property
    def calibration_reason(self) -> str | None:
        """``calibration_need`` as one sentence naming the option by its own name: "refine='block' refines ..."."""
        need = self.calibration_need
        if need is None:
            return None
        name = need.field.rsplit(".", 1)[-1]
        return f"{name}{'' if need.value is None else f'={need.value!r}'} {need.message}"

    @property
    def refines_blocks(self) -> bool:
        return self.refine in ("block", "block+model")

    @property
    def refines_model(self) -> bool:
        return self.refine in ("model", "block+model")

    @property
    def scaling(self) -> float:
        """The factor PEFT applies to B·A at run time."""
        return self.lora_alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)
