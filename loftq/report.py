"""What a conversion reports: per-layer results, progress events and the closing summary."""

from __future__ import annotations

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
    error_quant: float  # relative Frobenius error of plain quantization
    error: float  # relative Frobenius error of Q + scaling·B·A, as loaded
    iter_errors: list[float]
    best_iter: int
    seconds: float

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerReport:
        return cls(**{**data, "shape": tuple(data["shape"])})


@dataclass
class ProgressEvent:
    """Sent after each layer (``stage='layer'``) and at shard and run boundaries."""

    stage: str  # "start", "layer", "shard", "finalize", "done"
    layers_done: int
    layers_total: int
    shards_done: int
    shards_total: int
    layer: LayerReport | None = None
    shard: str | None = None
    bytes_read: int = 0  # of this shard's input, on "shard" events
    bytes_written: int = 0  # of this shard's output, on "shard" events
    skipped: bool = False  # the shard was already finished by an earlier run


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
    layers: list[LayerReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(layers: list[LayerReport], **extra: Any) -> Summary:
    return Summary(
        layers=len(layers),
        mean_error_quant=fmean(layer.error_quant for layer in layers) if layers else 0.0,
        mean_error=fmean(layer.error for layer in layers) if layers else 0.0,
        **extra,
    )
