"""Orchestration of one conversion: plan, fit, convert shard by shard, then finalize.

Order matters for the "never looks complete" promise: the manifest (``MANIFEST_NAME``) is
removed first and written last, so a directory with a manifest is always a finished checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import resource
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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
from loftq.pipeline import Background, Prefetch
from loftq.plot import PLOT_NAME, write_layer_plot
from loftq.quantizers.registry import get_quantizer
from loftq.report import LayerReport, ProgressEvent, Report, summarize
from loftq.safetensors_io import ShardWriter, read_header, read_tensor
from loftq.shard import LayerFitter, ShardResult, convert_shard, fit_concurrency, weight_space_fitter
from loftq.storage import MANIFEST_NAME, REPORT_NAME, Destination, Source, sha256_file
from loftq.targets import ModelLayout, resolve_layout

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

    def write_manifest(self) -> None:
        """Last: every published file with its size and sha256, which makes the output a checkpoint."""
        manifest = {"files": sorted(self.files.values(), key=lambda f: f["path"])}
        self.destination.staging_path(MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        self.destination.publish(MANIFEST_NAME)


def _options_binding(options: ConvertOptions) -> str:
    """What the journal binds a finished shard to: the options that decide its numbers (not the device),
    the same for a whole conversion and for its parts (convert_part)."""
    return options.model_dump_json(exclude={"device"})


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
    destination then holds no manifest (``MANIFEST_NAME``).
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


@dataclass(frozen=True)
class _Plan:
    """What a conversion works from, all of it known before any output is written."""

    source: Source
    options: ConvertOptions
    device: torch.device
    checkpoint: SourceCheckpoint
    layout: ModelLayout
    backbone: Backbone
    calibrated: CalibratedConversion | None
    aux_dir: Path  # local copies of the config, tokenizer and other small files


@dataclass(frozen=True)
class _Fitting:
    """Where the shard loop gets each target's fit from, and what the journal binds finished shards to."""

    fitter: LayerFitter
    concurrency: int
    binding: str
    calibration: CalibrationResult | None = None


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
    """Plan, fit, write the shards, finalize: the steps below, in that order."""
    started = time.perf_counter()
    planned = _make_plan(source, options, calibration_data is not None, scratch)
    progress = _Progress(emit, len(planned.layout.targets), len(planned.checkpoint.shards))
    progress("start")
    fitting = _fit(planned, calibration_data, scratch, progress, stop)
    shard_loop = _write_shards(planned, destination, fitting, progress, stop, trust_parts)
    progress("finalize")
    report = _finalize(planned, shard_loop, progress.layers, fitting.calibration, started)
    progress("done")
    return report


def _make_plan(source: Source, options: ConvertOptions, calibrated: bool, scratch: Path) -> _Plan:
    """Everything that can fail before any output is written (the layout, the quantizer, an
    architecture a calibrated conversion cannot stream), and local copies of the small files."""
    device = resolve_device(options.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    checkpoint, config, layout = plan(source, options)
    backbone = Backbone(options, get_quantizer(options.quant, options.bits, options.blocksize))
    calibrated_conversion = None
    if calibrated:  # fails on an unsupported architecture before any output
        calibrated_conversion = CalibratedConversion(source, checkpoint, config, layout, backbone, device, scratch / "fits")
    aux_dir = scratch / "aux"  # the tokenizer is read from here
    for name in checkpoint.aux_files:
        with source.open_local(name) as path:
            copy = aux_dir / name
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(path.read_bytes())
    return _Plan(source, options, device, checkpoint, layout, backbone, calibrated_conversion, aux_dir)


def _fit(planned: _Plan, calibration_data: Path | None, scratch: Path, progress: _Progress, stop: Callable[[], bool]) -> _Fitting:
    """Weight space: each layer is fitted as its shard streams past. Calibrated: every layer is
    fitted first, block by block on the calibration text, and read back from scratch while the
    shards are written; the journal is then bound to that text too."""
    binding = _options_binding(planned.options)
    if planned.calibrated is None:
        return _Fitting(weight_space_fitter(planned.backbone, planned.device), fit_concurrency(planned.device), binding)
    data = planned.calibrated.load_data(calibration_data, planned.aux_dir)
    fitted = 0
    blocks = (0, 0)

    def on_block(done: int, blocks_total: int) -> None:
        nonlocal blocks
        blocks = (done, blocks_total)
        progress("calibration", fitted, blocks_done=done, blocks_total=blocks_total)

    def on_fitted(layer: LayerReport) -> None:
        nonlocal fitted
        fitted += 1
        progress("calibration", fitted, layer=layer, blocks_done=blocks[0], blocks_total=blocks[1])

    (scratch / "fits").mkdir()
    calibration = planned.calibrated.run(data, on_layer=on_fitted, on_block=on_block, should_stop=stop)
    return _Fitting(calibration.fits, 1, f"{binding}\ncalibration data {data.sha256}", calibration)


def _write_shards(
    planned: _Plan, destination: Destination, fitting: _Fitting, progress: _Progress, stop: Callable[[], bool], trust_parts: bool
) -> _ShardLoop:
    """The small files (config.json with the bnb quantization_config when packed), then every
    weight shard, each reused from the journal when an earlier run or a part finished it."""
    journal = Journal(destination, fitting.binding)
    shard_loop = _ShardLoop(planned.source, planned.checkpoint, destination, journal, planned.layout, planned.backbone)
    destination.remove(MANIFEST_NAME)
    for name in planned.checkpoint.aux_files:
        if name == "config.json":
            config = planned.backbone.config_update(json.loads((planned.aux_dir / name).read_text()), planned.layout)
            destination.staging_path(name).write_text(json.dumps(config, indent=2) + "\n")
        else:
            destination.staging_path(name).write_bytes((planned.aux_dir / name).read_bytes())
        shard_loop.outputs.publish(name)
    shard_loop.run(
        planned.checkpoint.shards,
        fitting.fitter,
        progress,
        stop,
        trust=trust_parts,
        layer_events=fitting.calibration is None,  # calibrated layers were reported while they were fitted
        concurrency=fitting.concurrency,
    )
    return shard_loop


def _finalize(
    planned: _Plan, shard_loop: _ShardLoop, layers: list[LayerReport], calibration: CalibrationResult | None, started: float
) -> Report:
    """The files that make the shards a checkpoint: index, adapters, report and plot, the manifest last."""
    outputs = shard_loop.outputs
    if planned.checkpoint.index is not None:
        outputs.write_json(INDEX_NAME, _output_index(planned.checkpoint, shard_loop.shard_tensors))
    _write_adapters(shard_loop.journal, layers, planned.options.rank, outputs)
    outputs.write_json(ADAPTER_CONFIG, adapter_config(planned.options, planned.layout, planned.source.name))
    report = _report(planned, layers, calibration, shard_loop.resumed, started)
    try:  # a plot is a convenience: a failure to draw it must not fail the conversion
        write_layer_plot(report.to_dict(), outputs.destination.staging_path(PLOT_NAME))
    except Exception as exc:  # noqa: BLE001 - matplotlib fails in many ways (fonts, cache dirs)
        report.warnings.append(f"the per-layer plot could not be drawn: {exc}")
    else:  # a drawn plot is an artifact like any other: failing to store it fails the job
        outputs.publish(PLOT_NAME)
    outputs.write_json(REPORT_NAME, report.to_dict())
    outputs.write_manifest()
    shard_loop.journal.clear()
    return report


def _report(
    planned: _Plan, layers: list[LayerReport], calibration: CalibrationResult | None, shards_resumed: int, started: float
) -> Report:
    """The report, its layers sorted in place into the model's own module order."""
    device = planned.device
    peak_device = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    position = {key: i for i, key in enumerate(planned.layout.targets)}
    layers.sort(key=lambda layer: position.get(layer.key, len(position)))
    return Report(
        format_version=REPORT_FORMAT_VERSION,
        source=planned.source.name,
        architecture=planned.layout.architecture,
        options=planned.options.model_dump(mode="json"),
        scaling=planned.options.scaling,
        device=str(device),
        versions=_versions(),
        summary=summarize(
            layers,
            seconds=time.perf_counter() - started,
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            peak_device_mb=peak_device,
            shards=len(planned.checkpoint.shards),
            shards_resumed=shards_resumed,
            evaluation=None if calibration is None else calibration.evaluation,
        ),
        layers=layers,
        calibration=None if calibration is None else calibration.calibration,
        refinement=None if calibration is None else calibration.refinement,
        warnings=[] if calibration is None else calibration.warnings,
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
    if options.calibration_need is not None:
        raise InvalidOptions("a calibrated conversion cannot be split into parts: it runs the model block by block in one process")
    checkpoint, _, layout = plan(source, options)
    unknown = sorted(set(shards) - set(checkpoint.shards))
    if unknown:
        raise InvalidOptions(f"not shards of this checkpoint: {unknown[:3]}")
    device = resolve_device(options.device)
    backbone = Backbone(options, get_quantizer(options.quant, options.bits, options.blocksize))
    destination.remove(MANIFEST_NAME)
    total = sum(1 for t in layout.targets.values() if _shard_of(checkpoint, t.key) in shards)
    progress = _Progress(on_progress or (lambda event: None), total, len(shards))
    shard_loop = _ShardLoop(source, checkpoint, destination, Journal(destination, _options_binding(options)), layout, backbone)
    fitter = weight_space_fitter(backbone, device)
    shard_loop.run(list(shards), fitter, progress, should_stop or (lambda: False), concurrency=fit_concurrency(device))
    return progress.layers


def _shard_of(checkpoint: SourceCheckpoint, key: str) -> str:
    if checkpoint.index is None:
        return checkpoint.shards[0]
    return checkpoint.index["weight_map"][key]


class _Progress:
    """Counts the layers and shards done and reports them as :class:`ProgressEvent`s."""

    def __init__(self, emit: ProgressCallback, layers_total: int, shards_total: int) -> None:
        self.emit = emit
        self.layers_total, self.shards_total = layers_total, shards_total
        self.layers: list[LayerReport] = []  # converted or resumed, in the order they finished
        self.shards_done = 0  # converted or resumed (the upload may still be running)

    def __call__(self, stage: str, layers_done: int | None = None, **fields: object) -> None:
        """Report ``stage``; ``layers_done`` counts layers not in ``layers`` yet (fitted on calibration data)."""
        done = len(self.layers) if layers_done is None else layers_done
        self.emit(ProgressEvent(stage, done, self.layers_total, self.shards_done, self.shards_total, **fields))


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
        progress: _Progress,
        stop: Callable[[], bool],
        *,
        trust: bool = False,
        layer_events: bool = True,
        concurrency: int = 1,
    ) -> None:
        """Convert ``shards`` into ``progress.layers``, reporting each layer (``layer_events``) and shard."""
        opened = Prefetch(self._open(shards, trust), depth=1, name="open shards", discard=lambda item: item.stack.close())
        with opened, Background(depth=1, name="publish shards") as publisher:
            for item in opened:
                with item.stack:
                    record = item.record
                    if record is None:
                        assert item.path is not None
                        self._check_index(item.name, item.path)

                        def on_layer(layer: LayerReport, shard: str = item.name) -> None:
                            progress.layers.append(layer)
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
                progress.shards_done += 1
                if record is not None:
                    progress.layers.extend(record["layers"])
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



