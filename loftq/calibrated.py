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
from loftq.algorithm import fit_layer, relative_error
from loftq.backbone import Backbone
from loftq.blockwise import HEAD_LOGITS_BYTES, BlockInputs, StreamedModel, TensorReader
from loftq.calibration_data import CalibrationSet, Sequences, load_calibration
from loftq.checkpoint import SourceCheckpoint
from loftq.errors import Cancelled, UnsupportedArchitecture
from loftq.memory import release_freed_memory
from loftq.options import ConvertOptions
from loftq.model_refine import Batch as ModelBatch
from loftq.model_refine import HeldWeight, ModelStage, check_memory, kl_pieces, memory_needed
from loftq.refine import Batch, BlockAdapters, balanced, refine_block
from loftq.report import BlockRefinement, Calibration, Evaluation, LayerReport, ModelRefinement, Refinement
from loftq.safetensors_io import TensorInfo
from loftq.shard import FittedLayer, layer_report
from loftq.storage import Source
from loftq.targets import ModelLayout, Target
from loftq.whitening import Whitening, accumulate_hessian, whitening_for

Fitted = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""A target's (Q as loaded, A, B), kept while its block is refined."""


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

    @classmethod
    def joined(cls, streams: list[_Stream]) -> _Stream:
        """One stream of all these streams' batches (the train and held-out parts of the calibration set)."""
        return cls(*([item for stream in streams for item in getattr(stream, name)] for name in ("hidden", "inputs", "ids", "masks")))

    def refinement_batches(self, model: StreamedModel, block: int, goals: list[torch.Tensor]) -> list[Batch]:
        """The stream's batches as refinement sees them: the block on its current inputs, and the
        output it should produce."""

        def run(b: int) -> Callable[[], torch.Tensor]:
            return lambda: model.block_forward(block, self.hidden[b], self.inputs[b][block])

        return [Batch(run(b), goals[b], None if bool(self.masks[b].all()) else self.masks[b]) for b in range(len(self.hidden))]


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

    def replace_adapters(self, target: Target, lora_a: torch.Tensor, lora_b: torch.Tensor, report: LayerReport) -> None:
        """A refined block's adapters take the place of the closed-form ones (the backbone is the same)."""
        path = self.files[target.key]
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - safe_open has no __iter__
        key_a, key_b = lora_keys(target.module)
        tensors[key_a], tensors[key_b] = lora_a.cpu().contiguous(), lora_b.cpu().contiguous()
        save_file(tensors, str(path))
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
    refinement: Refinement | None = None


class _Evaluator:
    """Three held-out streams (full precision, plain quantization, initialised)."""

    def __init__(self, stream: _Stream) -> None:
        self.stream = stream
        self.fp = self.plain = self.init = stream.hidden
        self.embedded: list[torch.Tensor] | None = None  # block 0's inputs, kept for the model stage's re-run
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

    def _capture(self, sequences: Sequences, batch_size: int | None = None) -> _Stream:
        stream = _Stream([], [], [], [])
        for ids, mask in sequences.batches(batch_size or self.options.calibration.batch_size):
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

    def _fit(self, target: Target, h: torch.Tensor | None, block: int | None) -> tuple[torch.Tensor, Fitted]:
        """Fit one target, write it to scratch and return its initialised weight (out×in),
        Q as loaded + scaling·B·A: what the model computes with after loading, and (Q as
        loaded, A, B)."""
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
        return effective, (fit.q_loaded, fit.lora_a, fit.lora_b)

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
        self.should_stop = should_stop
        model = self.model
        options = self.options
        evaluate = options.calibration.evaluate and data.evaluation is not None
        initialised = options.calibration.propagation == "initialised"
        warnings = list(data.warnings)
        train, holdout = self._refinement_split(data.calibration, warnings)
        refinement = Refinement(options.refine, heldout_sequences=0 if holdout is None else len(holdout)) if options.refine != "none" else None
        with model.loaded_on_use(model.outer_param_names()):  # the embeddings, not the head
            if holdout is None:
                streams = [self._capture(data.calibration)]
            else:  # steps take batches of the refinement's size; the held-out slice is only measured
                streams = [self._capture(train, options.refinement.batch_size), self._capture(holdout)]
            held_out = _Evaluator(self._capture(data.evaluation)) if evaluate else None
        model_stage = holdout is not None and options.refines_model
        block_stage = holdout is not None and options.refines_blocks
        # The full-precision model's hidden states at every block (the model stage's teacher, the
        # block stage's goal with target 'model'), carried beside the propagated streams (the
        # same tensors until the first block differs); with full-precision propagation they are the streams.
        carry = model_stage or (block_stage and options.refinement.target == "model")
        full_precision = [list(stream.hidden) for stream in streams] if carry and initialised else None
        if model_stage:
            self._check_model_stage_memory(streams, held_out)
            if held_out is not None:
                held_out.embedded = held_out.fp
            embedded = [list(stream.hidden) for stream in streams]
            self.held: dict[str, tuple[HeldWeight, torch.Tensor, torch.Tensor]] = {}
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
                    keep = not initialised or (block_stage and options.refinement.target == "block")  # that target's goal
                    fp_outs = [stream.run(model, index, moments=moments, keep=keep) for stream in streams]
                finally:
                    moments.remove()
                if full_precision is not None:
                    full_precision = [stream.run(model, index, hidden) for stream, hidden in zip(streams, full_precision)]
                goals = None
                if block_stage:
                    goals = full_precision if options.refinement.target == "model" and full_precision is not None else fp_outs
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
                fitted: dict[str, Fitted] = {}
                for target in targets:
                    effective, parts = self._fit(target, moments.get(target.key), index)
                    if goals is not None or model_stage:
                        fitted[target.key] = parts
                    if held_out is not None or initialised or goals is not None:
                        self._set_weight(target, effective)
                    del effective, parts
                if goals is not None and targets:
                    assert refinement is not None
                    refinement.blocks.append(self._refine_block(index, targets, fitted, streams, goals, moments))
                if model_stage:
                    self._hold(targets, fitted)
                del moments, fitted, goals
                if held_out is not None:
                    held_out.init = held_out.stream.run(model, index, held_out.init)
                for stream, out in zip(streams, fp_outs):
                    stream.hidden = stream.run(model, index) if initialised else out
                    del out
                del fp_outs
            self._factored = {}
            release_freed_memory()
            on_block(index + 1, blocks)

        if model_stage:
            assert refinement is not None
            teacher = full_precision or [stream.hidden for stream in streams]
            refinement.model = self._model_stage(streams, embedded, teacher, held_out)
            del embedded, teacher
        del full_precision
        evaluation = self._head(_Stream.joined(streams), held_out)
        calibration = Calibration(
            sha256=data.sha256,
            documents=data.documents,
            sequences=len(data.calibration),
            tokens=data.calibration.tokens,
            seq_len=int(data.calibration.input_ids.shape[1]),
            packed=data.packed,
            propagation=options.calibration.propagation,
            blocks=blocks,
        )
        if refinement is not None:
            refinement.seconds = sum(block.seconds for block in refinement.blocks) + (refinement.model.seconds if refinement.model else 0.0)
        return CalibrationResult(self.fits, calibration, evaluation, warnings, refinement)

    # -- refinement -----------------------------------------------------------------------

    def _refinement_split(self, sequences: Sequences, warnings: list[str]) -> tuple[Sequences, Sequences | None]:
        """(sequences the steps train on, the held-out slice) when blocks are refined; the slice
        is the last ``holdout`` share (at least one sequence; the order is already random)."""
        if self.options.refine == "none":
            return sequences, None
        n = len(sequences)
        if n < 2:
            warnings.append(
                f"refine={self.options.refine!r} needs at least 2 calibration sequences (one is held out to accept or "
                f"reject the refined adapters), got {n}; the closed-form adapters are kept"
            )
            return sequences, None
        held = min(n - 1, max(1, round(n * self.options.refinement.holdout)))
        ids, mask = sequences.input_ids, sequences.attention_mask
        return Sequences(ids[: n - held], mask[: n - held]), Sequences(ids[n - held :], mask[n - held :])

    def _refine_block(
        self,
        index: int,
        targets: list[Target],
        fitted: dict[str, Fitted],
        streams: list[_Stream],
        goals: list[list[torch.Tensor]],
        moments: _SecondMoments,
    ) -> BlockRefinement:
        """Refine the block's adapters (loftq/refine.py); accepted ones replace the closed-form
        adapters on scratch and in the layer reports. Leaves the block computing with Q + the
        kept adapters, as the fits do."""
        model = self.model
        scaling = self.options.scaling
        for target in targets:
            self._set_weight(target, fitted[target.key][0])  # Q as loaded; the hooks add the adapters
        adapters = BlockAdapters(
            {t.key: model.model.get_submodule(t.module) for t in targets},
            {key: (a, b) for key, (_, a, b) in fitted.items()},
            scaling,
        )
        train, heldout = (stream.refinement_batches(model, index, goal) for stream, goal in zip(streams, goals))
        try:
            report, refined = refine_block(
                index, adapters, train, heldout, self.options.refinement, seed=self.options.seed + index, should_stop=self.should_stop
            )
        finally:
            adapters.remove()
        if self.should_stop():
            raise Cancelled("conversion cancelled")
        for target in targets:
            q, a, b = fitted[target.key]
            if refined is not None:
                a, b = refined[target.key]
                fitted[target.key] = (q, a, b)
            effective = q + scaling * (b @ a)
            if refined is not None:
                report_ = self._refined_report(target, effective, moments.get(target.key))
                self.fits.replace_adapters(target, a, b, report_)
            self._set_weight(target, effective)
        return report

    def _refined_report(self, target: Target, effective: torch.Tensor, h: torch.Tensor | None) -> LayerReport:
        """The layer's errors with its refined adapters: W is read again (one tensor), as the
        block in memory holds the initialised weights by now."""
        stored = self.reader.read(target.key).to(self.device, torch.float32)
        w = stored.T if target.fan_in_fan_out else stored
        whitening, metric = self._whitenings(h)
        error = relative_error(w, effective)
        return replace(
            self.fits.reports[target.key],
            error=error,
            objective_error=error if whitening is None else whitening.error(w, effective),
            output_error=None if metric is None else metric.error(w, effective),
            refined=True,
        )

    # -- the model stage ------------------------------------------------------------------

    def _check_model_stage_memory(self, streams: list[_Stream], held_out: _Evaluator | None) -> None:
        """Refuse the model stage before the block pass when the whole model will not fit."""
        model = self.model
        target_names = {f"{t.module}.weight" for targets in self.block_targets for t in targets}
        target_weights = other_weights = adapter_weights = 0
        for name in model.param_names:
            numel = model.model.get_parameter(name).numel()
            if name in target_names:
                target_weights += numel
            else:
                other_weights += numel
        for targets in self.block_targets:
            for target in targets:
                out_features, in_features = target.shape
                adapter_weights += self.options.rank * (out_features + in_features)
        hidden = sum(h.numel() for stream in streams for h in stream.hidden) * 4
        if held_out is not None:
            hidden += sum(h.numel() for h in held_out.fp) * 4
        batch = max((h.numel() for h in streams[0].hidden), default=0) * 4
        blocks = len(model.blocks)
        # Streams: the propagated one, the teacher, block 0's inputs (and the evaluation's three);
        # per step: every block's input, one block's recomputed activations, the head's pieces.
        activations = 3 * hidden + batch * (blocks + 24) + 3 * HEAD_LOGITS_BYTES
        check_memory(memory_needed(target_weights, other_weights, adapter_weights, activations), self.device)

    def _hold(self, targets: list[Target], fitted: dict[str, Fitted]) -> None:
        """Keep a fitted block's Q (as codes) and final adapters for the model stage."""
        quantizer = self.backbone.quantizer
        for target in targets:
            q, a, b = fitted[target.key]
            dtype = self.reader.info(target.key).torch_dtype
            self.held[target.key] = (HeldWeight.of(q, quantizer, dtype), a, b)

    def _model_stage(
        self, streams: list[_Stream], embedded: list[list[torch.Tensor]], teacher: list[list[torch.Tensor]], held_out: _Evaluator | None
    ) -> ModelRefinement:
        """All block adapters trained together (loftq/model_refine.py). Accepted adapters replace
        the block stage's on scratch; the held-out evaluation is re-run through the final model."""
        model = self.model
        quantizer = self.backbone.quantizer
        targets = [t for block in self.block_targets for t in block]
        by_module = {t.module: t for t in targets}
        target_names = {f"{t.module}.weight" for t in targets}
        block_names = [n for i in range(len(model.blocks)) for n in model.block_param_names(i) if n not in target_names]

        def materialise(module: nn.Module, args: tuple) -> None:
            target = by_module[module._loftq_target]  # type: ignore[attr-defined]
            q = self.held[target.key][0].matrix(quantizer).to(self.device)
            module._parameters["weight"] = nn.Parameter(q.T.contiguous() if target.fan_in_fan_out else q, requires_grad=False)

        def release(module: nn.Module, args: tuple, output: object) -> None:
            module._parameters["weight"] = nn.Parameter(torch.empty(module._parameters["weight"].shape, device="meta"), requires_grad=False)

        modules = {t.key: model.model.get_submodule(t.module) for t in targets}
        handles = []
        for target in targets:
            module = modules[target.key]
            module._loftq_target = target.module  # type: ignore[attr-defined]
            handles += [module.register_forward_pre_hook(materialise), module.register_forward_hook(release)]
        adapters = BlockAdapters(modules, {key: (a, b) for key, (_, a, b) in self.held.items()}, self.options.scaling)
        outer = model.outer_param_names()
        try:
            with model.loaded(block_names), model.loaded(outer):
                batches = [
                    [
                        ModelBatch(embedded[s][b], [stream.inputs[b][i] for i in range(len(model.blocks))], stream.masks[b], teacher[s][b])
                        for b in range(len(stream.hidden))
                    ]
                    for s, stream in enumerate(streams)
                ]
                vocab = int(getattr(model.config, "vocab_size", 0) or 1)
                length = int(streams[0].ids[0].shape[1])
                head = kl_pieces(model.head_logits, max(1, HEAD_LOGITS_BYTES // (4 * vocab * length))) if model.has_loss else None
                stage = ModelStage(model.block_forward, len(model.blocks), adapters, head, self.options.refinement, self.options.seed, self.should_stop)
                report, refined = stage.run(batches[0], batches[1], self.options.refinement.batch_size)
                if refined is not None:
                    for target in targets:
                        a, b = balanced(*refined[target.key])
                        self.fits.replace_adapters(target, a, b, replace(self.fits.reports[target.key], refined=True))
                        adapters.params[target.key][0].data, adapters.params[target.key][1].data = a, b  # as stored

                    @torch.no_grad()
                    def final_states(first: list[torch.Tensor], inputs: list[list[BlockInputs]]) -> list[torch.Tensor]:
                        outputs = []
                        for b, hidden in enumerate(first):
                            for i in range(len(model.blocks)):
                                hidden = model.block_forward(i, hidden, inputs[b][i])
                            outputs.append(hidden)
                        return outputs

                    # The evaluation and the head's targets see the final model.
                    if held_out is not None and held_out.embedded is not None:
                        held_out.init = final_states(held_out.embedded, held_out.stream.inputs)
                    for stream, first in zip(streams, embedded):
                        stream.hidden = final_states(first, stream.inputs)
        finally:
            adapters.remove()
            for handle in handles:
                handle.remove()
            for module in modules.values():
                del module._loftq_target
            self.held = {}
        return report

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
                    effective[target.key] = self._fit(target, moments.get(target.key), None)[0]
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
