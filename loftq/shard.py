"""Convert one safetensors shard: stream tensors in, fit each target, stream tensors out.

A few tensors are in memory at a time (the one being fitted, one read ahead, one being
written); non-target tensors are copied as raw bytes, so they are byte-identical to the source.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from loftq.adapter import lora_keys
from loftq.algorithm import LayerFit, fit_layer
from loftq.backbone import Backbone
from loftq.errors import Cancelled, CorruptCheckpoint, UnsupportedCheckpoint
from loftq.report import LayerReport
from loftq.memory import release_freed_memory
from loftq.pipeline import Background, Prefetch
from loftq.safetensors_io import (
    DTYPES,
    SafetensorsHeader,
    ShardWriter,
    TensorInfo,
    iter_tensor_bytes,
    read_header,
    read_tensor,
    tensor_bytes,
)
from loftq.targets import ModelLayout, Target

_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


@dataclass
class ShardResult:
    source_sha256: str  # of the input file, hashed while it was read
    sha256: str
    size: int
    tensors: dict[str, int]  # output tensor name -> bytes, for the index
    layers: list[LayerReport]
    adapters: dict[str, torch.Tensor]  # PEFT key -> fp32 CPU tensor


def _check_target(header: SafetensorsHeader, target: Target) -> None:
    info = header.tensors[target.key]
    expected = target.shape[::-1] if target.fan_in_fan_out else target.shape
    if info.dtype not in _FLOAT_DTYPES:
        raise UnsupportedCheckpoint(
            f"target weight {target.key} has dtype {info.dtype}; LoftQ needs a floating-point checkpoint", path=header.path
        )
    if tuple(info.shape) != tuple(expected):
        raise CorruptCheckpoint(
            f"tensor {target.key} has shape {list(info.shape)} but config.json implies {list(expected)}", path=header.path
        )


def _hashed(chunks: Iterator[memoryview], hasher: Background, digest: hashlib._Hash) -> Iterator[bytes]:
    for chunk in chunks:
        piece = bytes(chunk)  # the reader reuses its buffer; the hasher runs later
        hasher.submit(lambda piece=piece: digest.update(piece))
        yield piece


def shard_targets(header: SafetensorsHeader, layout: ModelLayout) -> list[Target]:
    """The shard's targets, after every linear weight in it (targets and copied ones) was
    checked against the shape config.json gives it."""
    for name, info in header.tensors.items():
        expected = layout.weight_shapes.get(name)
        if expected is not None and name not in layout.targets and tuple(info.shape) != tuple(expected):
            raise CorruptCheckpoint(
                f"tensor {name} has shape {list(info.shape)} but config.json implies {list(expected)}", path=header.path
            )
    targets = [layout.targets[name] for name in header.tensors if name in layout.targets]
    for target in targets:
        _check_target(header, target)
    return targets


@dataclass
class FittedLayer:
    """What a shard writer needs of one target: its stored tensors and adapters."""

    stored: list[tuple[str, torch.Tensor]]  # backbone tensors, in ``Backbone.entries`` order
    lora_a: torch.Tensor  # fp32 CPU, r×in
    lora_b: torch.Tensor  # fp32 CPU, out×r
    report: LayerReport


LayerFitter = Callable[[TensorInfo, Target, torch.Tensor, str], FittedLayer]
"""(tensor info, target, source tensor as read, shard name) -> the fitted layer."""


def layer_report(target: Target, fit: LayerFit, *, shard: str, seconds: float, **extra: object) -> LayerReport:
    return LayerReport(
        module=target.module,
        key=target.key,
        shard=shard,
        shape=target.shape,
        fan_in_fan_out=target.fan_in_fan_out,
        error_quant=fit.error_quant,
        error=fit.weight_error,
        iter_errors=fit.iter_errors,
        best_iter=fit.best_iter,
        seconds=seconds,
        objective=fit.objective,
        objective_error_quant=fit.objective_error_quant,
        objective_error=fit.error,
        warnings=list(fit.warnings),
        **extra,
    )


def weight_space_fitter(backbone: Backbone, device: torch.device) -> LayerFitter:
    """Plain LoftQ: each layer is fitted from its weight alone, as it streams past.

    The stored tensors are cast to the stored dtype on the fit's device before they are
    copied to the host, so a GPU fit moves the bf16 backbone, not an fp32 one."""

    def fit(info: TensorInfo, target: Target, tensor: torch.Tensor, shard: str) -> FittedLayer:
        started = time.perf_counter()
        weight = tensor.to(device)
        weight = weight.T if target.fan_in_fan_out else weight
        result = fit_layer(
            weight,
            backbone.quantizer.fake_quantize,
            backbone.options,
            as_loaded=lambda q: backbone.as_loaded(q, info.torch_dtype),
        )
        stored = [(name, t.cpu()) for name, t in backbone.tensors(info, target, result.q)]
        lora_a, lora_b = result.lora_a.cpu(), result.lora_b.cpu()
        report = layer_report(target, result, shard=shard, seconds=time.perf_counter() - started)
        return FittedLayer(stored, lora_a, lora_b, report)

    return fit


CUDA_CONCURRENT_FITS = 4
"""Layers fitted at once on a GPU, each on its own CUDA stream. One fit is a chain of small,
latency-bound kernels (thin QRs, a small eigendecomposition, skinny products) that leave most
of the GPU idle; four in flight keep it busy (bench/gpu.py). Each fit is seeded on its own,
so the output does not depend on this number."""


def fit_concurrency(device: torch.device) -> int:
    """On CPU one fit already uses every core (torch's intra-op threads)."""
    return CUDA_CONCURRENT_FITS if device.type == "cuda" else 1


def _load_cuda_linalg() -> None:
    """torch loads its CUDA linear-algebra backends lazily, and that first load is not
    thread-safe ("lazy wrapper should be called at most once" when two fits start together):
    load them once here, before any fit thread runs."""
    small = torch.eye(4, device="cuda", dtype=torch.float64)
    torch.linalg.qr(small.float())
    torch.linalg.eigh(small)
    torch.linalg.svd(small.float())
    torch.linalg.cholesky(small)
    torch.cuda.synchronize()


class _OnOwnStreams:
    """Runs fits on a thread pool, each thread on its own CUDA stream, finished (synchronised)
    before its result is handed back, so other threads can use the tensors right away."""

    def __init__(self, fitter: LayerFitter, workers: int) -> None:
        self.fitter = fitter
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fit")
        self.local = threading.local()
        if torch.cuda.is_available():
            _load_cuda_linalg()

    def _fit(self, *args: object) -> FittedLayer:
        if not torch.cuda.is_available():
            return self.fitter(*args)  # type: ignore[arg-type]
        stream = getattr(self.local, "stream", None)
        if stream is None:
            stream = self.local.stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            fitted = self.fitter(*args)  # type: ignore[arg-type]
        stream.synchronize()
        return fitted

    def submit(self, *args: object) -> Future[FittedLayer]:
        return self.pool.submit(self._fit, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def convert_shard(
    in_path: Path,
    out_path: Path,
    shard: str,
    layout: ModelLayout,
    backbone: Backbone,
    fitter: LayerFitter,
    *,
    on_layer: Callable[[LayerReport], None],
    should_stop: Callable[[], bool],
    concurrency: int = 1,
) -> ShardResult:
    """Three stages overlap (loftq.pipeline): a reader thread loads the next target weight
    while the current one is fitted (``concurrency`` fits at once, on GPU), and a writer
    thread writes finished tensors and copies the others. The writer works in file order and
    hands every input tensor, as it passes, to a hashing thread: with the header that hashes
    the whole input without a second read (tensors are contiguous and cover the file;
    read_header checks)."""
    header = read_header(in_path)
    targets = shard_targets(header, layout)
    entries = [e for info in header.tensors.values() for e in backbone.entries(info, layout.targets.get(info.name))]
    layers: list[LayerReport] = []
    adapters: dict[str, torch.Tensor] = {}
    with open(in_path, "rb") as handle:
        source_hash = hashlib.sha256(handle.read(header.data_start))

    def copy(info: TensorInfo) -> None:
        writer.copy(info.name, _hashed(iter_tensor_bytes(in_path, info), hasher, source_hash))

    def write(source: torch.Tensor, stored: list[tuple[str, torch.Tensor]]) -> None:
        hasher.submit(lambda: source_hash.update(tensor_bytes(source)))
        for name, tensor in stored:
            writer.write(name, tensor)

    reads = ((target, read_tensor(in_path, header.tensors[target.key])) for target in targets)
    parallel = _OnOwnStreams(fitter, concurrency) if concurrency > 1 else None
    # File order, with up to ``concurrency`` fits in flight: ("copy", info) or ("fit", info, target, tensor, result).
    pending: deque[tuple] = deque()

    def finish_head() -> None:
        entry = pending.popleft()
        if entry[0] == "copy":
            behind.submit(lambda info=entry[1]: copy(info))
            return
        _, info, target, tensor, result = entry
        fitted = result.result() if isinstance(result, Future) else result
        behind.submit(lambda: write(tensor, fitted.stored))
        key_a, key_b = lora_keys(target.module)
        adapters[key_a], adapters[key_b] = fitted.lora_a, fitted.lora_b
        layers.append(fitted.report)
        on_layer(fitted.report)

    with ShardWriter(out_path, entries, header.metadata) as writer:
        try:
            # The writer feeds the hasher, so it is closed first (contexts exit in reverse):
            # on a failure it drains its last calls into a hasher that still runs.
            with (
                Prefetch(reads, depth=1, name=f"read {shard}") as ahead,
                Background(depth=4, name=f"hash {shard}") as hasher,
                Background(depth=1, name=f"write {shard}") as behind,
            ):
                loaded = iter(ahead)
                for info in header.tensors.values():
                    target = layout.targets.get(info.name)
                    if target is None:  # copied as raw bytes, a piece at a time
                        pending.append(("copy", info))
                    else:
                        if should_stop():
                            raise Cancelled("conversion cancelled")
                        _, tensor = next(loaded)
                        args = (info, target, tensor, shard)
                        result = parallel.submit(*args) if parallel else fitter(*args)
                        pending.append(("fit", info, target, tensor, result))
                        del tensor, result
                    while pending and (pending[0][0] == "copy" or sum(e[0] == "fit" for e in pending) >= concurrency):
                        finish_head()
                        release_freed_memory()
                while pending:
                    finish_head()
                behind.join()
                hasher.join()
        finally:
            if parallel is not None:
                parallel.close()
        sha256 = writer.close()
    return ShardResult(
        source_sha256=source_hash.hexdigest(),
        sha256=sha256,
        size=out_path.stat().st_size,
        tensors={name: math.prod(shape) * DTYPES[dtype].itemsize for name, dtype, shape in entries},
        layers=layers,
        adapters=adapters,
    )
