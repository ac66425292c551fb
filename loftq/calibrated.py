"""Calibrated LoftQ: fit each block's adapters in the metric of the activations it really sees.

Runs before the shards are written (converter.py). Block by block: load the block's weights,
run the calibration batch through it while the second moment H = XᵀX/n of every target
layer's inputs is accumulated, fit the targets, then hand the next block either the
initialised block's outputs or the full-precision ones (``CalibrationOptions.propagation``).
Held-out sequences, when ``evaluate`` is set, go through three versions of every block (full
precision, plain quantization, initialised) in the same pass, so evaluation costs no second
read of the weights.

The fitted layers are kept on local scratch disk, one safetensors file per block, in the form
the shard writer stores them; the second phase streams the shards as the weight-space
conversion does and takes each target's tensors from there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from loftq.adapter import lora_keys
from loftq.algorithm import fit_layer
from loftq.backbone import Backbone
from loftq.blockwise import BlockInputs, StreamedModel, TensorReader
from loftq.calibration_data import CalibrationSet, load_calibration
from loftq.checkpoint import SourceCheckpoint
from loftq.errors import Cancelled, UnsupportedArchitecture
from loftq.memory import release_freed_memory
from loftq.options import ConvertOptions
from loftq.report import Calibration, Evaluation, LayerReport
from loftq.safetensors_io import TensorInfo
from loftq.shard import FittedLayer, layer_report
from loftq.storage import Source
from loftq.targets import ModelLayout, Target
from loftq.whitening import Whitening, accumulate_hessian, whitening_for


class _SecondMoments:
    """Accumulates H for target layers through forward hooks.

    Layers fed the very same input tensor (q/k/v, gate/up) share one accumulator: the same
    H, computed once and stored once (for a 7B block this halves the memory of the H's).
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.mask: torch.Tensor | None = None  # the current batch's token mask (B×L)
        self._group: dict[str, str] = {}  # module key -> key of the accumulator it shares
        self._sums: dict[str, tuple[torch.Tensor | None, int]] = {}
        self._batch_inputs: list[tuple[torch.Tensor, str]] = []  # inputs seen in this batch, kept alive
        self._handles = [m.register_forward_hook(self._hook(key)) for key, m in modules.items()]

    def new_batch(self, mask: torch.Tensor) -> None:
        """An all-real mask (every decoder window) is dropped: selecting rows by it would copy
        each layer's input and sync the device, once per hooked layer."""
        self.mask = None if bool(mask.all()) else mask.bool()
        self._batch_inputs = []

    def _hook(self, key: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            x = args[0]
            leader = self._group.get(key)
            if leader is None:  # first batch: group by input identity (held, so no address is reused)
                leader = next((k for seen, k in self._batch_inputs if seen is x), key)
                self._batch_inputs.append((x, key))
                self._group[key] = leader
            if leader != key:
                return
            mask = self.mask
            if mask is not None and x.shape[:-1] == mask.shape:
                x = x[mask.to(x.device)]
            h, count = self._sums.get(key, (None, 0))
            self._sums[key] = accumulate_hessian(h, x, count)

        return hook

    def get(self, key: str) -> torch.Tensor | None:
        h, _ = self._sums.get(self._group.get(key, key), (None, 0))
        return h

    def remove(self) -> None:
        """Detach the hooks and drop the inputs held for grouping (with a single batch they
        would otherwise stay alive through every fit of the block)."""
        for handle in self._handles:
            handle.remove()
        self._batch_inputs = []
        self.mask = None


@dataclass
class _Stream:
    """Hidden states of one dataset, batch by batch, with what each block is passed besides."""

    hidden: list[torch.Tensor]
    inputs: list[list[BlockInputs]]  # [batch][block]
    ids: list[torch.Tensor]
    masks: list[torch.Tensor]

    def run(
        self,
        model: StreamedModel,
        block: int,
        hidden: list[torch.Tensor] | None = None,
        moments: _SecondMoments | None = None,
        keep: bool = True,
    ) -> list[torch.Tensor]:
        """The block's outputs batch by batch (none kept with ``keep=False``: a pass run only
        for the second moments does not hold a second copy of the stream)."""
        outputs = []
        for b, h in enumerate(hidden if hidden is not None else self.hidden):
            if moments is not None:
                moments.new_batch(self.masks[b])
            out = model.run_block(block, h, self.inputs[b][block])
            if keep:
                outputs.append(out)
        return outputs


@dataclass
class CalibratedFits:
    """The fitted targets on scratch disk, served to the shard writer."""

    scratch: Path
    files: dict[str, Path] = field(default_factory=dict)  # target key -> scratch file
    stored_names: dict[str, list[str]] = field(default_factory=dict)
    reports: dict[str, LayerReport] = field(default_factory=dict)

    def add(self, target: Target, stored: list[tuple[str, torch.Tensor]], lora_a: torch.Tensor, lora_b: torch.Tensor, report: LayerReport) -> None:
        """Written as soon as the layer is fitted, so a block's fits are never all in memory."""
        path = self.scratch / f"{len(self.files):06d}.safetensors"
        tensors = {n: t.contiguous() for n, t in stored}
        key_a, key_b = lora_keys(target.module)
        tensors[key_a], tensors[key_b] = lora_a, lora_b
        save_file(tensors, str(path))
        self.files[target.key] = path
        self.stored_names[target.key] = [n for n, _ in stored]
        self.reports[target.key] = report

    def __call__(self, info: TensorInfo, target: Target, tensor: torch.Tensor, shard: str) -> FittedLayer:
        with safe_open(str(self.files[target.key]), framework="pt") as handle:
            stored = [(name, handle.get_tensor(name)) for name in self.stored_names[target.key]]
            key_a, key_b = lora_keys(target.module)
            lora_a, lora_b = handle.get_tensor(key_a), handle.get_tensor(key_b)
        return FittedLayer(stored, lora_a, lora_b, replace(self.reports[target.key], shard=shard))


@dataclass
class CalibrationResult:
    fits: CalibratedFits
    calibration: Calibration
    evaluation: Evaluation | None
    warnings: list[str]


class _Evaluator:
    """Three held-out streams (full precision, plain quantization, initialised)."""

    def __init__(self, stream: _Stream) -> None:
        self.stream = stream
        self.fp = self.plain = self.init = stream.hidden
        stream.hidden = []  # the three versions replace these; the stream must not keep block 0's copy

    def result(self, model: StreamedModel, nll: dict[str, tuple[float, int]]) -> Evaluation:
        cos_plain, cos_init = [], []
        for b, mask in enumerate(self.stream.masks):
            weights = mask.to(self.fp[b].device, torch.float32)[..., None]
            pooled = [(h.float() * weights).sum(1) / weights.sum(1).clamp_min(1) for h in (self.fp[b], self.plain[b], self.init[b])]
            cos_plain += torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=-1).tolist()
            cos_init += torch.nn.functional.cosine_similarity(pooled[0], pooled[2], dim=-1).tolist()
        evaluation = Evaluation(
            sequences=len(cos_plain),
            tokens=int(sum(int(m.sum()) for m in self.stream.masks)),
            cosine_quantized=sum(cos_plain) / len(cos_plain),
            cosine_initialised=sum(cos_init) / len(cos_init),
        )
        if model.has_loss:
            ppl = {name: math.exp(total / max(tokens, 1)) for name, (total, tokens) in nll.items()}
            evaluation.perplexity_full_precision = ppl["fp"]
            evaluation.perplexity_quantized = ppl["plain"]
            evaluation.perplexity_initialised = ppl["init"]
            gap = ppl["plain"] - ppl["fp"]
            evaluation.gap_recovered = (ppl["plain"] - ppl["init"]) / gap if gap > 0 else None
        else:
            gap = 1 - evaluation.cosine_quantized
            evaluation.gap_recovered = (evaluation.cosine_initialised - evaluation.cosine_quantized) / gap if gap > 0 else None
        return evaluation


class CalibratedConversion:
    """Phase one of a calibrated conversion (see the module docstring)."""

    def __init__(
        self,
        source: Source,
        checkpoint: SourceCheckpoint,
        config: dict,
        layout: ModelLayout,
        backbone: Backbone,
        device: torch.device,
        scratch: Path,
    ) -> None:
        self.options: ConvertOptions = backbone.options
        self.layout = layout
        self.backbone = backbone
        self.device = device
        self.reader = TensorReader(source, checkpoint)
        self.model = StreamedModel(config, self.reader, device)
        self.reader.close()  # shards reopen on demand; none is held while the data is loaded
        self.fits = CalibratedFits(scratch)
        self.block_targets: list[list[Target]] = [[] for _ in self.model.blocks]
        self.outer_targets: list[Target] = []
        prefix = f"{self.model.block_prefix}."
        for target in layout.targets.values():
            if target.module.startswith(prefix):
                self.block_targets[int(target.module[len(prefix) :].split(".")[0])].append(target)
            else:
                self.outer_targets.append(target)

    # -- data -----------------------------------------------------------------------------

    def load_data(self, data_path: Path, tokenizer_dir: Path) -> CalibrationSet:
        return load_calibration(
            data_path, tokenizer_dir, self.options.calibration, packed=self.model.causal, max_length=self.model.max_length
        )

    def _capture(self, sequences) -> _Stream:  # noqa: ANN001 - calibration_data.Sequences
        stream = _Stream([], [], [], [])
        for ids, mask in sequences.batches(self.options.calibration.batch_size):
            hidden, inputs = self.model.capture(ids, mask)
            stream.hidden.append(hidden)
            stream.inputs.append(inputs)
            stream.ids.append(ids)
            stream.masks.append(mask.to(self.device))
        return stream

    # -- weights --------------------------------------------------------------------------

    def _weight(self, target: Target) -> torch.Tensor:
        """The target's fp32 weight, out×in."""
        weight = self.model.model.get_parameter(f"{target.module}.weight").data
        return weight.T if target.fan_in_fan_out else weight

    def _set_weight(self, target: Target, weight: torch.Tensor) -> None:
        stored = weight.T if target.fan_in_fan_out else weight
        self.model._set(f"{target.module}.weight", nn.Parameter(stored.contiguous(), requires_grad=False))

    def _whitenings(self, h: torch.Tensor | None) -> tuple[Whitening | None, Whitening | None]:
        """(the objective's whitening, the full-H metric of the output error) for a second moment,
        factored once for all the layers that share it (q/k/v, gate/up)."""
        if h is None:
            return None, None
        cached = self._factored.get(id(h))
        if cached is None or cached[0] is not h:
            objective = whitening_for(h, self.options)
            full = objective if objective is not None and not objective.diagonal else Whitening.from_hessian(h, self.options.damping)
            cached = self._factored[id(h)] = (h, objective, full)
        return cached[1], cached[2]

    def _fit(self, target: Target, h: torch.Tensor | None, block: int | None) -> torch.Tensor:
        """Fit one target, write it to scratch and return its initialised weight (out×in),
        Q as loaded + scaling·B·A: what the model computes with after loading."""
        started = time.perf_counter()
        info = self.reader.info(target.key)
        w = self._weight(target)
        quantizer = self.backbone.quantizer
        whitening, metric = self._whitenings(h)
        if self.options.objective != "weight" and h is None:
            raise UnsupportedArchitecture(f"{target.module} received no calibration inputs; it cannot be fitted to activations")
        fit = fit_layer(
            w,
            quantizer.fake_quantize,
            self.options,
            as_loaded=lambda q: self.backbone.as_loaded(q, info.torch_dtype),
            whitening=whitening,
        )
        effective = fit.q_loaded + self.options.scaling * (fit.lora_b @ fit.lora_a)
        extra: dict[str, object] = {"block": block}
        if metric is not None and metric is whitening:  # the fit measured both in this metric already
            extra["output_error_quant"], extra["output_error"] = fit.objective_error_quant, fit.error
        elif metric is not None:  # the output error, whatever the objective, in the full metric of the inputs
            extra["output_error_quant"] = metric.error(w, quantizer.fake_quantize(w))
            extra["output_error"] = metric.error(w, effective)
        report = layer_report(target, fit, shard="", seconds=time.perf_counter() - started, **extra)
        self.fits.add(target, self.backbone.tensors(info, target, fit.q.cpu()), fit.lora_a.cpu(), fit.lora_b.cpu(), report)
        self.on_layer(report)
        return effective

    # -- the pass -------------------------------------------------------------------------

    def run(
        self,
        data: CalibrationSet,
        *,
        on_layer: Callable[[LayerReport], None],
        on_block: Callable[[int, int], None],
        should_stop: Callable[[], bool],
    ) -> CalibrationResult:
        """Phase one; the shards it opened are closed however it ends (for object storage each
        is a downloaded copy on scratch disk, which a cancelled job's traceback would keep)."""
        try:
            return self._run(data, on_layer=on_layer, on_block=on_block, should_stop=should_stop)
        finally:
            self.reader.close()

    def _run(
        self,
        data: CalibrationSet,
        *,
        on_layer: Callable[[LayerReport], None],
        on_block: Callable[[int, int], None],
        should_stop: Callable[[], bool],
    ) -> CalibrationResult:
        self.on_layer = on_layer
        model = self.model
        evaluate = self.options.calibration.evaluate and data.evaluation is not None
        initialised = self.options.calibration.propagation == "initialised"
        with model.loaded_on_use(model.outer_param_names()):  # the embeddings, not the head
            calib = self._capture(data.calibration)
            held_out = _Evaluator(self._capture(data.evaluation)) if evaluate else None
        blocks = len(model.blocks)
        on_block(0, blocks)
        for index in range(blocks):
            if should_stop():
                raise Cancelled("conversion cancelled")
            self._factored: dict[int, tuple] = {}
            with model.loaded(model.block_param_names(index)):
                targets = self.block_targets[index]
                moments = _SecondMoments({t.key: model.model.get_submodule(t.module) for t in targets})
                try:
                    fp_out = calib.run(model, index, moments=moments, keep=not initialised)
                finally:
                    moments.remove()
                if held_out is not None:
                    held_out.fp = held_out.stream.run(model, index, held_out.fp)
                    # Plain quantization depends on W alone: run it before the fits, then put the
                    # full-precision weights back (references: no copy of the block is made).
                    originals = {t.key: self._weight(t) for t in targets}
                    for target in targets:
                        self._set_weight(target, self.backbone.quantizer.fake_quantize(originals[target.key]))
                    held_out.plain = held_out.stream.run(model, index, held_out.plain)
                    for target in targets:
                        self._set_weight(target, originals[target.key])
                    del originals
                # Each initialised weight replaces the full-precision one as soon as it is fitted
                # (the second moments are already collected), so the block is held once.
                for target in targets:
                    effective = self._fit(target, moments.get(target.key), index)
                    if held_out is not None or initialised:
                        self._set_weight(target, effective)
                    del effective
                del moments
                if held_out is not None:
                    held_out.init = held_out.stream.run(model, index, held_out.init)
                calib.hidden = calib.run(model, index) if initialised else fp_out
                del fp_out
            self._factored = {}
            release_freed_memory()
            on_block(index + 1, blocks)

        evaluation = self._head(calib, held_out)
        calibration = Calibration(
            sha256=data.sha256,
            documents=data.documents,
            sequences=len(data.calibration),
            tokens=data.calibration.tokens,
            seq_len=int(data.calibration.input_ids.shape[1]),
            packed=data.packed,
            propagation=self.options.calibration.propagation,
            blocks=blocks,
        )
        return CalibrationResult(self.fits, calibration, evaluation, list(data.warnings))

    def _head(self, calib: _Stream, held_out: _Evaluator | None) -> Evaluation | None:
        """Targets after the blocks (fitted on the calibration stream's final states) and the
        held-out measurements, through the model's own head."""
        model = self.model
        if not self.outer_targets and held_out is None:
            return None
        with model.loaded_on_use(model.outer_param_names()) as ensure:  # the head, not the embeddings
            self._factored = {}
            plain: dict[str, torch.Tensor] = {}
            effective: dict[str, torch.Tensor] = {}
            originals: dict[str, torch.Tensor] = {}
            if self.outer_targets:
                moments = _SecondMoments({t.key: model.model.get_submodule(t.module) for t in self.outer_targets})
                try:
                    for b, hidden in enumerate(calib.hidden):
                        moments.new_batch(calib.masks[b])
                        model.run_head(hidden, calib.ids[b], calib.masks[b])
                finally:
                    moments.remove()
                ensure([f"{t.module}.weight" for t in self.outer_targets])
                for target in self.outer_targets:
                    originals[target.key] = self._weight(target).clone()
                    plain[target.key] = self.backbone.quantizer.fake_quantize(originals[target.key])
                    effective[target.key] = self._fit(target, moments.get(target.key), None)
            if held_out is None:
                return None
            nll: dict[str, tuple[float, int]] = {}
            for name, hidden, weights in (("fp", held_out.fp, originals), ("plain", held_out.plain, plain), ("init", held_out.init, effective)):
                for target in self.outer_targets:
                    self._set_weight(target, weights[target.key])
                total, tokens = 0.0, 0
                for b, h in enumerate(hidden):
                    batch_total, batch_tokens = model.run_head(h, held_out.stream.ids[b], held_out.stream.masks[b])
                    total, tokens = total + batch_total, tokens + batch_tokens
                nll[name] = (total, tokens)
            return held_out.result(model, nll)
