"""What a conversion reports: per-layer results, progress events and the closing summary."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from statistics import fmean
from typing import Any


@dataclass
class LayerReport:
    module: str
    key: str  # checkpoint tensor name
    shard: str
    shape: tuple[int, int]  # out×in
    fan_in_fan_out: bool
    error_quant: float  # ‖W − quant(W)‖/‖W‖: plain quantization
    error: float  # ‖W − (Q + scaling·B·A)‖/‖W‖ as loaded, whatever the objective
    iter_errors: list[float]  # every iterate's error in the objective's metric
    best_iter: int
    seconds: float
    # The objective's metric ("weight": the same numbers as error_quant/error; "activation",
    # "activation-diag": ‖(W − ·)·S‖/‖W·S‖ with S·Sᵀ the damped second moment of the inputs).
    objective: str = "weight"
    objective_error_quant: float = math.nan
    objective_error: float = math.nan
    block: int | None = None  # transformer block index (calibrated conversions)
    # Calibrated conversions, whatever the objective: ‖(W − ·)·H^½‖/‖W·H^½‖ with the full,
    # damped H of this layer's calibration inputs, for plain quantization and with adapters.
    output_error_quant: float | None = None
    output_error: float | None = None
    refined: bool = False  # block refinement replaced the closed-form adapters (errors are the refined ones)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if math.isnan(self.objective_error_quant):
            self.objective_error_quant = self.error_quant
        if math.isnan(self.objective_error):
            self.objective_error = self.error

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerReport:
        return cls(**{**data, "shape": tuple(data["shape"])})


@dataclass
class ProgressEvent:
    """Sent after each layer (``stage='layer'``) and at shard and run boundaries."""

    stage: str  # "start", "calibration", "layer", "shard", "finalize", "done"
    layers_done: int
    layers_total: int
    shards_done: int
    shards_total: int
    layer: LayerReport | None = None
    shard: str | None = None
    bytes_read: int = 0  # of this shard's input, on "shard" events
    bytes_written: int = 0  # of this shard's output, on "shard" events
    skipped: bool = False  # the shard was already finished by an earlier run
    blocks_done: int = 0  # calibrated conversions: transformer blocks fitted so far
    blocks_total: int = 0


@dataclass
class Evaluation:
    """Held-out quality of the full-precision, plainly quantized and initialised models.

    ``cosine_*`` is the mean cosine similarity, to the full-precision model, of each held-out
    sequence's mean-pooled final hidden state (the sentence embedding of encoders).
    ``perplexity_*`` is set for causal language models; ``gap_recovered`` is the share of the
    quantization's perplexity gap the adapters close: (ppl_quantized − ppl_initialised) /
    (ppl_quantized − ppl_full_precision), or, without perplexity, the same on 1 − cosine.
    """

    sequences: int
    tokens: int
    cosine_quantized: float
    cosine_initialised: float
    perplexity_full_precision: float | None = None
    perplexity_quantized: float | None = None
    perplexity_initialised: float | None = None
    gap_recovered: float | None = None


@dataclass
class Calibration:
    """What the activation statistics were computed from."""

    sha256: str  # of the calibration text as read (files in sorted order)
    documents: int
    sequences: int
    tokens: int
    seq_len: int
    packed: bool  # windows cut from concatenated documents (decoders) or one document per sequence
    propagation: str
    blocks: int


@dataclass
class BlockRefinement:
    """One block's refinement (``refine`` block): losses are the block's mean squared output
    error to the full-precision model's, relative to the mean square of that output, over the
    held-out calibration sequences (``heldout_*``) or the last steps' batches (``train_*``)."""

    block: int
    accepted: bool  # the refined adapters beat the closed-form ones on the held-out sequences
    heldout_closed_form: float
    heldout_refined: float  # of the best checkpoint of the steps
    train_first: float
    train_last: float
    steps: int
    seconds: float

    @property
    def gain(self) -> float:
        """Share of the closed-form held-out error the refinement removed (negative: worse)."""
        return 1 - self.heldout_refined / self.heldout_closed_form if self.heldout_closed_form > 0 else 0.0


@dataclass
class ModelRefinement:
    """The model stage (``refine`` model): the loss is the mean KL divergence per token of the
    initialised model's next-token distribution to the full-precision model's (decoders with a
    head), or the relative mean squared error of the final hidden states (encoders)."""

    loss: str  # "kl" or "hidden-mse"
    heldout_before: float
    heldout_after: float
    accepted: bool
    steps: int
    seconds: float
    peak_memory_mb: float


@dataclass
class Refinement:
    """What refinement did: per block, and the model stage when it ran."""

    mode: str
    blocks: list[BlockRefinement] = field(default_factory=list)
    model: ModelRefinement | None = None
    heldout_sequences: int = 0  # calibration sequences held out of the steps
    seconds: float = 0.0

    @property
    def blocks_accepted(self) -> int:
        return sum(block.accepted for block in self.blocks)

    @property
    def mean_block_gain(self) -> float | None:
        """Mean held-out gain over the blocks, counting rejected ones as 0 (they keep the closed form)."""
        return fmean([block.gain if block.accepted else 0.0 for block in self.blocks]) if self.blocks else None


@dataclass
class Summary:
    layers: int
    mean_error_quant: float
    mean_error: float
    seconds: float
    peak_rss_mb: float
    peak_device_mb: float | None
    shards: int
    shards_resumed: int
    objective: str = "weight"
    mean_objective_error_quant: float = 0.0
    mean_objective_error: float = 0.0
    mean_output_error_quant: float | None = None  # calibrated conversions
    mean_output_error: float | None = None
    evaluation: Evaluation | None = None


@dataclass
class Report:
    format_version: int
    source: str
    architecture: str
    options: dict[str, Any]
    scaling: float
    device: str
    versions: dict[str, str]
    summary: Summary
    layers: list[LayerReport] = field(default_factory=list)  # in the model's module order
    calibration: Calibration | None = None
    refinement: Refinement | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.refinement is not None:  # the derived figures too: readers of the JSON should not recompute them
            refinement = data["refinement"]
            refinement["blocks_accepted"] = self.refinement.blocks_accepted
            refinement["mean_block_gain"] = self.refinement.mean_block_gain
            for block, entry in zip(self.refinement.blocks, refinement["blocks"]):
                entry["gain"] = block.gain
        return data


def _mean(values: list[float]) -> float:
    return fmean(values) if values else 0.0


def _mean_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return fmean(known) if known and len(known) == len(values) else None


def summarize(layers: list[LayerReport], **extra: Any) -> Summary:
    objectives = {layer.objective for layer in layers}
    return Summary(
        layers=len(layers),
        mean_error_quant=_mean([layer.error_quant for layer in layers]),
        mean_error=_mean([layer.error for layer in layers]),
        objective=objectives.pop() if len(objectives) == 1 else "mixed" if objectives else "weight",
        mean_objective_error_quant=_mean([layer.objective_error_quant for layer in layers]),
        mean_objective_error=_mean([layer.objective_error for layer in layers]),
        mean_output_error_quant=_mean_or_none([layer.output_error_quant for layer in layers]),
        mean_output_error=_mean_or_none([layer.output_error for layer in layers]),
        **extra,
    )
