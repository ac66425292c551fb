"""Orchestration of one conversion: plan, convert shard by shard, then write the small files.

Order matters for the "never looks complete" promise: ``manifest.json`` is removed first
and written last, so a directory with a manifest is always a finished checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import resource
import tempfile
import time
from dataclasses import dataclass
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path

import torch

from loftq.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, lora_keys
from loftq.backbone import Backbone
from loftq.calibrated import CalibratedConversion, CalibrationResult
from loftq.checkpoint import INDEX_NAME, SourceCheckpoint, discover
from loftq.errors import CorruptCheckpoint, InvalidOptions
from loftq.journal import Journal
from loftq.options import ConvertOptions
from loftq.quantizers import get_quantizer
from loftq.report import LayerReport, ProgressEvent, Report, summarize
from loftq.safetensors_io import ShardWriter, read_header, read_tensor, sha256_file
from loftq.plot import PLOT_NAME, write_layer_plot
from loftq.pipeline import Background, Prefetch
from loftq.shard import LayerFitter, ShardResult, convert_shard, fit_concurrency, weight_space_fitter
from loftq.storage import MANIFEST_NAME, Destination, Source
from loftq.targets import ModelLayout, resolve_layout

REPORT_NAME = "loftq_report.json"
REPORT_FORMAT_VERSION = 3  # 2: objective and output errors per layer, calibration, evaluation; 3: refinement

ProgressCallback = Callable[[ProgressEvent], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InvalidOptions(f"unknown device {name!r}") from exc
    if device.type not in ("cpu", "cuda"):  # e.g. a worker's LOFTQ_DEVICE, which ConvertOptions did not see
        raise InvalidOptions(f"device {name!r}: the engine runs on auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidOptions(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InvalidOptions(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("loftq-service", "torch", "transformers", "safetensors", "bitsandbytes"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


class _Outputs:
    """Publishes output files and remembers their size and sha256 for the manifest."""

    def __init__(self, destination: Destination) -> None:
        self.destination = destination
        self.files: dict[str, dict] = {}

    def add(self, name: str, size: int, sha256: str) -> None:
        self.files[name] = {"path": name, "size": size, "sha256": sha256}

    def publish(self, name: str, sha256: str | None = None) -> None:
        path = self.destination.staging_path(name)
        sha256 = sha256 or sha256_file(path)
        self.add(name, path.stat().st_size, sha256)
        self.destination.publish(name, sha256)

    def write_json(self, name: str, data: object) -> None:
        self.destination.staging_path(name).write_text(json.dumps(data, indent=2) + "\n")
        self.publish(name)


def _checkpoint_keys(source: Source, checkpoint: SourceCheckpoint) -> set[str]:
    if checkpoint.index is not None:
        return set(checkpoint.index["weight_map"])
    with source.open_local(checkpoint.shards[0]) as path:
        return set(read_header(path).tensors)


def _read_json(source: Source, name: str) -> dict:
    """A JSON object from the source; anything else is the checkpoint's fault, not ours."""
    with source.open_local(name) as path:
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CorruptCheckpoint(f"invalid JSON: {exc}", path=name) from exc
    if not isinstance(value, dict):
        raise CorruptCheckpoint(f"a JSON {type(value).__name__}, not an object", path=name)
    return value


def plan(source: Source, options: ConvertOptions) -> tuple[SourceCheckpoint, dict, ModelLayout]:
    """Everything that can be checked before any output is written."""
    files = source.list_files()
    index_text = None
    if INDEX_NAME in files:
        with source.open_local(INDEX_NAME) as path:
            try:
                index_text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise CorruptCheckpoint(f"invalid index: {exc}", path=INDEX_NAME) from exc
    checkpoint = discover(files, index_text)
    config = _read_json(source, "config.json")
    layout = resolve_layout(config, _checkpoint_keys(source, checkpoint), options)
    too_small = [t.module for t in layout.targets.values() if options.rank > min(t.shape)]
    if too_small:
        raise InvalidOptions(f"rank {options.rank} exceeds the smaller dimension of {too_small[:3]} ({len(too_small)} layers)")
    return checkpoint, config, layout


def convert(
    source: Source,
    destination: Destination,
    options: ConvertOptions | None = None,
    *,
    calibration_data: str | Path | None = None,
    on_progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    trust_parts: bool = False,
) -> Report:
    """Turn ``source`` into a LoftQ checkpoint at ``destination`` and return the report.

    ``calibration_data`` (a local .txt/.jsonl file or a directory of them) makes it a
    calibrated conversion (loftq.calibrated): the activation objectives and ``evaluate``
    need it; with ``objective='weight'`` it only adds the output errors and evaluation.

    Shards already finished in the destination's journal (an interrupted run, or
    :func:`convert_part` calls) are reused after their input is re-hashed; ``trust_parts``
    skips that re-read, for the merge step of a job whose parts were just written from the
    same source (a scaled-out service job).

    Raises a :class:`loftq.errors.LoftQError` subclass for bad input or cancellation; the
    destination then holds no ``manifest.json``.
    """
    options = options or ConvertOptions()
    if calibration_data is None and (reason := options.calibration_reason) is not None:
        raise InvalidOptions(f"{reason}: it needs calibration data")
    with tempfile.TemporaryDirectory(prefix="loftq-") as scratch:
        return _convert(
            source,
            destination,
            options,
            None if calibration_data is None else Path(calibration_data),
            Path(scratch),
            on_progress or (lambda event: None),
            should_stop or (lambda: False),
            trust_parts,
        )


def convert_part(
    source: Source,
    destination: Destination,
    options: ConvertOptions,
    shards: Sequence[str],
    *,
    on_progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[LayerReport]:
    """Convert only ``shards`` into ``destination`` and record them in its journal.

    One part of a conversion spread over several workers: output shard i depends on input
    shard i alone, so parts run anywhere in any order, and a final :func:`convert` on the
    same destination (``trust_parts=True``) reuses them and writes the adapters, index,
    report and manifest. The artifacts are byte-identical to a single run's. Weight-space
    only: a calibrated conversion streams the whole model block by block, in one process.
    """
    if options.calibration_reason is not None:
        raise InvalidOptions("a calibrated conversion cannot be split into parts: it runs the model block by block in one process")
    checkpoint, _, layout = plan(source, options)
    unknown = sorted(set(shards) - set(checkpoint.shards))
    if unknown:
        raise InvalidOptions(f"not shards of this checkpoint: {unknown[:3]}")
    device = resolve_device(options.device)
    backbone = Backbone(options, get_quantizer(options.quant, options.bits, options.blocksize))
    destination.remove(MANIFEST_NAME)
    emit = on_progress or (lambda event: None)
    layers: list[LayerReport] = []
    total = sum(1 for t in layout.targets.values() if _shard_of(checkpoint, t.key) in shards)
    journal = Journal(destination, options.model_dump_json(exclude={"device"}))
    shard_loop = _ShardLoop(source, checkpoint, destination, journal, layout, backbone)

    def progress(stage: str, **fields: object) -> None:
        emit(ProgressEvent(stage, len(layers), total, shard_loop.done, len(shards), **fields))

    stop = should_stop or (lambda: False)
    shard_loop.run(list(shards), weight_space_fitter(backbone, device), layers, stop, progress, concurrency=fit_concurrency(device))
    return layers


def _shard_of(checkpoint: SourceCheckpoint, key: str) -> str:
    if checkpoint.index is None:
        return checkpoint.shards[0]
    return checkpoint.index["weight_map"][key]


@dataclass
class _OpenedShard:
    name: str
    path: Path | None  # None: reused from the journal without opening the input
    record: dict | None  # the journal's record when the shard is finished already
    bytes_read: int
    stack: contextlib.ExitStack  # keeps a downloaded input alive until it is converted


class _ShardLoop:
    """Converts shards in order while the next shard is opened (downloaded, or checked
    against the journal) and the previous one is published (uploaded) on other threads."""

    def __init__(
        self, source: Source, checkpoint: SourceCheckpoint, destination: Destination, journal: Journal, layout: ModelLayout, backbone: Backbone
    ) -> None:
        self.source, self.destination, self.journal = source, destination, journal
        self.layout, self.backbone = layout, backbone
        self.indexed: dict[str, set[str]] = {}  # shard -> the tensors the index says it holds
        for name, shard in (checkpoint.index or {}).get("weight_map", {}).items():
            self.indexed.setdefault(shard, set()).add(name)
        self.outputs = _Outputs(destination)
        self.shard_tensors: dict[str, dict[str, int]] = {}
        self.done = 0
        self.resumed = 0

    def _open(self, shards: list[str], trust: bool) -> Iterator[_OpenedShard]:
        for shard in shards:
            record = self.journal.finished(shard, None) if trust else None
            if record is not None:
                yield _OpenedShard(shard, None, record, 0, contextlib.ExitStack())
                continue
            stack = contextlib.ExitStack()
            try:
                path = stack.enter_context(self.source.open_local(shard))
                record = self.journal.finished(shard, lambda: sha256_file(path))
            except BaseException:
                stack.close()
                raise
            yield _OpenedShard(shard, path, record, path.stat().st_size, stack)

    def run(
        self,
        shards: list[str],
        fitter: LayerFitter,
        layers: list[LayerReport],
        stop: Callable[[], bool],
        progress: Callable[..., None],
        *,
        trust: bool = False,
        layer_events: bool = True,
        concurrency: int = 1,
    ) -> None:
        """``progress(stage, **fields)`` is called per layer (``layer_events``) and per shard;
        ``self.done`` counts the finished shards (their upload may still be running)."""
        opened = Prefetch(self._open(shards, trust), depth=1, name="open shards", discard=lambda item: item.stack.close())
        with opened, Background(depth=1, name="publish shards") as publisher:
            for item in opened:
                with item.stack:
                    record = item.record
                    if record is None:
                        assert item.path is not None
                        self._check_index(item.name, item.path)

                        def on_layer(layer: LayerReport, shard: str = item.name) -> None:
                            layers.append(layer)
                            if layer_events:
                                progress("layer", layer=layer, shard=shard)

                        result = convert_shard(
                            item.path,
                            self.destination.staging_path(item.name),
                            item.name,
                            self.layout,
                            self.backbone,
                            fitter,
                            on_layer=on_layer,
                            should_stop=stop,
                            concurrency=concurrency,
                        )
                self.done += 1
                if record is not None:
                    layers.extend(record["layers"])
                    self.shard_tensors[item.name] = record["tensors"]
                    self.outputs.add(item.name, record["size"], record["sha256"])
                    self.resumed += 1
                    progress("shard", shard=item.name, skipped=True, bytes_read=item.bytes_read, bytes_written=record["size"])
                    continue
                self.shard_tensors[item.name] = result.tensors
                publisher.submit(lambda shard=item.name, result=result: self._publish(shard, result))
                progress("shard", shard=item.name, bytes_read=item.bytes_read, bytes_written=result.size)
            publisher.join()

    def _check_index(self, shard: str, path: Path) -> None:
        """The layout was planned from the index alone: names it lists that the shard lacks
        (an index padded to back a config's layers) would otherwise be skipped silently."""
        missing = sorted(self.indexed.get(shard, set()) - set(read_header(path).tensors))
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise CorruptCheckpoint(f"the index maps {missing[0]}{more} to {shard}, which does not hold it", path=INDEX_NAME)

    def _publish(self, shard: str, result: ShardResult) -> None:
        self.outputs.publish(shard, result.sha256)
        self.journal.record(shard, result.source_sha256, result.sha256, result.size, result.tensors, result.layers, result.adapters)


def _convert(
    source: Source,
    destination: Destination,
    options: ConvertOptions,
    calibration_data: Path | None,
    scratch: Path,
    emit: ProgressCallback,
    stop: Callable[[], bool],
    trust_parts: bool,
) -> Report:
    started = time.perf_counter()
    device = resolve_device(options.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    checkpoint, config, layout = plan(source, options)
    backbone = Backbone(options, get_quantizer(options.quant, options.bits, options.blocksize))
    calibrated = None
    if calibration_data is not None:  # fails on an unsupported architecture before any output
        calibrated = CalibratedConversion(source, checkpoint, config, layout, backbone, device, scratch / "fits")
    aux_dir = scratch / "aux"  # the tokenizer is read from here
    for name in checkpoint.aux_files:
        with source.open_local(name) as path:
            copy = aux_dir / name
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(path.read_bytes())

    total = len(layout.targets)
    layers: list[LayerReport] = []
    shards_total = len(checkpoint.shards)
    shard_loop: _ShardLoop | None = None

    def progress(stage: str, **fields: object) -> None:
        emit(ProgressEvent(stage, len(layers), total, 0 if shard_loop is None else shard_loop.done, shards_total, **fields))

    progress("start")
    binding = options.model_dump_json(exclude={"device"})
    calibration: CalibrationResult | None = None
    if calibrated is not None:
        data = calibrated.load_data(calibration_data, aux_dir)
        binding += f"\ncalibration data {data.sha256}"
        fitted: list[LayerReport] = []
        blocks = [0, 0]

        def on_block(done: int, blocks_total: int) -> None:
            blocks[:] = [done, blocks_total]
            emit(ProgressEvent("calibration", len(fitted), total, 0, shards_total, blocks_done=done, blocks_total=blocks_total))

        def on_fitted(layer: LayerReport) -> None:
            fitted.append(layer)
            emit(ProgressEvent("calibration", len(fitted), total, 0, shards_total, layer=layer, blocks_done=blocks[0], blocks_total=blocks[1]))

        (scratch / "fits").mkdir()
        calibration = calibrated.run(data, on_layer=on_fitted, on_block=on_block, should_stop=stop)
        fitter, concurrency = calibration.fits, 1  # read back from scratch: nothing to compute
    else:
        fitter, concurrency = weight_space_fitter(backbone, device), fit_concurrency(device)

    journal = Journal(destination, binding)
    shard_loop = _ShardLoop(source, checkpoint, destination, journal, layout, backbone)
    outputs = shard_loop.outputs
    destination.remove(MANIFEST_NAME)
    for name in checkpoint.aux_files:
        if name == "config.json":
            data_json = backbone.config_update(json.loads((aux_dir / name).read_text()), layout)
            destination.staging_path(name).write_text(json.dumps(data_json, indent=2) + "\n")
        else:
            destination.staging_path(name).write_bytes((aux_dir / name).read_bytes())
        outputs.publish(name)

    # calibrated layers were reported while they were fitted
    shard_loop.run(
        checkpoint.shards, fitter, layers, stop, progress, trust=trust_parts, layer_events=calibrated is None, concurrency=concurrency
    )

    progress("finalize")
    if checkpoint.index is not None:
        outputs.write_json(INDEX_NAME, _output_index(checkpoint, shard_loop.shard_tensors))
    _write_adapters(journal, layers, options.rank, outputs)
    outputs.write_json(ADAPTER_CONFIG, adapter_config(options, layout, source.name))

    peak_device = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    position = {key: i for i, key in enumerate(layout.targets)}  # the model's own module order
    layers.sort(key=lambda layer: position.get(layer.key, len(position)))
    report = Report(
        format_version=REPORT_FORMAT_VERSION,
        source=source.name,
        architecture=layout.architecture,
        options=options.model_dump(mode="json"),
        scaling=options.scaling,
        device=str(device),
        versions=_versions(),
        summary=summarize(
            layers,
            seconds=time.perf_counter() - started,
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            peak_device_mb=peak_device,
            shards=shards_total,
            shards_resumed=shard_loop.resumed,
            evaluation=None if calibration is None else calibration.evaluation,
        ),
        layers=layers,
        calibration=None if calibration is None else calibration.calibration,
        refinement=None if calibration is None else calibration.refinement,
        warnings=[] if calibration is None else calibration.warnings,
    )
    try:  # a plot is a convenience: a failure to draw it must not fail the conversion
        write_layer_plot(report.to_dict(), destination.staging_path(PLOT_NAME))
    except Exception as exc:  # noqa: BLE001 - matplotlib fails in many ways (fonts, cache dirs)
        report.warnings.append(f"the per-layer plot could not be drawn: {exc}")
    else:  # a drawn plot is an artifact like any other: failing to store it fails the job
        outputs.publish(PLOT_NAME)
    outputs.write_json(REPORT_NAME, report.to_dict())
    manifest = {"files": sorted(outputs.files.values(), key=lambda f: f["path"])}
    destination.staging_path(MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    destination.publish(MANIFEST_NAME)
    journal.clear()
    progress("done")
    return report


def _output_index(checkpoint: SourceCheckpoint, shard_tensors: dict[str, dict[str, int]]) -> dict:
    """Same shards and names as the source; new entries of packed weights map to their shard."""
    weight_map = {name: shard for shard, tensors in shard_tensors.items() for name in tensors}
    total_size = sum(size for tensors in shard_tensors.values() for size in tensors.values())
    metadata = {**(checkpoint.index or {}).get("metadata", {}), "total_size": total_size}
    return {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}


def _write_adapters(journal: Journal, layers: list[LayerReport], rank: int, outputs: _Outputs) -> None:
    """Merge the per-shard adapter files into one, a tensor at a time, reading each once.

    The header is planned from the layer reports (lora_A is r×in, lora_B out×r, fp32), so
    every per-shard file is fetched a single time even from object storage."""
    entries = []
    for layer in layers:
        key_a, key_b = lora_keys(layer.module)
        rows, cols = layer.shape
        entries += [(key_a, "F32", (rank, cols)), (key_b, "F32", (rows, rank))]
    by_shard: dict[str, list[LayerReport]] = {}
    for layer in layers:
        by_shard.setdefault(layer.shard, []).append(layer)
    path = journal.destination.staging_path(ADAPTER_WEIGHTS)
    with ShardWriter(path, entries, {"format": "pt"}) as writer:
        for shard, shard_layers in by_shard.items():
            with journal.destination.open_local(journal.adapters_name(shard)) as shard_path:
                header = read_header(shard_path)
                for layer in shard_layers:
                    for key in lora_keys(layer.module):
                        writer.write(key, read_tensor(shard_path, header.tensors[key]))
        sha256 = writer.close()
    outputs.publish(ADAPTER_WEIGHTS, sha256)


def convert_directory(source: str | Path, output: str | Path, options: ConvertOptions | None = None, **kwargs) -> Report:
    """Convenience wrapper for local directories."""
    from loftq.storage import LocalDestination, LocalSource

    return convert(LocalSource(source), LocalDestination(output), options, **kwargs)



