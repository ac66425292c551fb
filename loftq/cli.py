"""The ``loftq`` command line: ``loftq convert SRC OUT`` and ``loftq inspect OUT``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from loftq.errors import InvalidCalibrationData, InvalidOptions, LoftQError
from loftq.options import CalibrationNeed, CalibrationOptions, ConvertOptions, RefineOptions
from loftq.plot import PLOT_NAME, model_order
from loftq.quantizers.registry import BITS_HELP, QUANT_HELP
from loftq.report import LayerReport, ProgressEvent
from loftq.storage import MANIFEST_NAME, REPORT_NAME, sha256_file

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Turn Hugging Face checkpoints into LoftQ checkpoints.")
console = Console(stderr=True)
EXIT_BAD_INPUT = 2

# CLI flag -> CalibrationOptions field; the flags carry a prefix where the bare name would be ambiguous.
CALIBRATION_FLAGS = {
    "calib_samples": "samples",
    "calib_seq_len": "seq_len",
    "eval_samples": "eval_samples",
    "calib_seed": "seed",
    "calib_batch_size": "batch_size",
    "propagation": "propagation",
    "evaluate": "evaluate",
}
# CLI flag -> RefineOptions field; prefixed so they read as refinement settings next to the calibration ones.
REFINE_FLAGS = {
    "refine_steps": "steps",
    "refine_lr": "lr",
    "refine_batch_size": "batch_size",
    "refine_holdout": "holdout",
    "refine_target": "target",
    "model_refine_steps": "model_steps",
    "model_refine_lr": "model_lr",
    "model_refine_batch_size": "model_batch_size",
}
# ConvertOptions field holding a nested settings model -> the flags that set its fields.
NESTED_FLAGS = {"calibration": CALIBRATION_FLAGS, "refinement": REFINE_FLAGS}
# ConvertOptions field path -> the flag that sets it, so a validation error names what the user typed.
_FLAG_OF = {
    "quant": "--quant",
    "bits": "--bits",
    "blocksize": "--blocksize",
    "rank": "--rank",
    "lora_alpha": "--alpha",
    "iters": "--iters",
    "svd": "--svd",
    "svd_oversample": "--oversample",
    "svd_power_iters": "--power-iters",
    "target_modules": "--target",
    "backbone_format": "--backbone-format",
    "objective": "--objective",
    "damping": "--damping",
    "refine": "--refine",
    **{f"{group}.{field}": "--" + flag.replace("_", "-") for group, flags in NESTED_FLAGS.items() for flag, field in flags.items()},
}
_METRIC_SHORT = {"weight": "weight err", "activation": "output err", "activation-diag": "diag-H err"}


def _default(field: str, model: type[BaseModel] = ConvertOptions) -> str:
    """The model's default, for flags whose unset value must stay None (so only given flags reach the options)."""
    return str(model.model_fields[field].default)


def _calib_default(field: str) -> str:
    return _default(field, CalibrationOptions)


def _refine_default(field: str) -> str:
    return _default(field, RefineOptions)


def _fail(code: str, message: str) -> typer.Exit:
    console.print(f"[bold red]error[/] {escape(f'[{code}]')} {escape(message)}", highlight=False)
    return typer.Exit(EXIT_BAD_INPUT)


def _options_from_flags(
    *,
    quant: str | None = None,
    bits: int | None = None,
    blocksize: int | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    rslora: bool | None = None,
    iters: int | None = None,
    svd: str | None = None,
    oversample: int | None = None,
    power_iters: int | None = None,
    seed: int | None = None,
    target: list[str] | None = None,
    target_regex: str | None = None,
    backbone_format: str | None = None,
    device: str | None = None,
    objective: str | None = None,
    damping: float | None = None,
    refine: str | None = None,
    **nested: Any,
) -> ConvertOptions:
    """Turn ``convert``'s flags into :class:`ConvertOptions`; ``None`` means "not given", so the model's default holds.

    ``nested`` takes the flags of :data:`NESTED_FLAGS` (``calib_samples=``, ``refine_steps=``, ...).
    Raises :class:`InvalidOptions` with every problem, each named by field and flag.
    """
    unknown = set(nested) - {flag for flags in NESTED_FLAGS.values() for flag in flags}
    if unknown:
        raise TypeError(f"unknown flags: {sorted(unknown)}")
    if target and target_regex:
        raise InvalidOptions("use --target or --target-regex, not both")
    given = {
        "quant": quant,
        "bits": bits,
        "blocksize": blocksize,
        "rank": rank,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "iters": iters,
        "svd": svd,
        "svd_oversample": oversample,
        "svd_power_iters": power_iters,
        "seed": seed,
        "target_modules": list(target) if target else target_regex,
        "backbone_format": backbone_format,
        "device": device,
        "objective": objective,
        "damping": damping,
        "refine": refine,
        **{
            group: {field: nested[flag] for flag, field in flags.items() if nested.get(flag) is not None} or None
            for group, flags in NESTED_FLAGS.items()
        },
    }
    try:
        return ConvertOptions(**{name: value for name, value in given.items() if value is not None})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            path = ".".join(map(str, error["loc"])) or "options"
            flag = _FLAG_OF.get(path)
            problems.append(f"{path}{f' ({flag})' if flag else ''}: {error['msg']}")
        raise InvalidOptions("; ".join(problems)) from None


def _as_flags(need: CalibrationNeed) -> str:
    """``options.calibration_need`` in the words the user typed: ``--refine block refines ...``."""
    return f"{_FLAG_OF[need.field]}{'' if need.value is None else f' {need.value}'} {need.message}"


def _check_calibration_data(calibration_data: Path | None, options: ConvertOptions) -> str | None:
    """Fail before torch is loaded on what is wrong in the flags alone; return a note for a no-op combination.

    Whether the options need text is ``options.calibration_need``'s to say (the rule is written once).
    The text itself (formats, enough tokens) is checked by the converter, which reads it.
    """
    need = options.calibration_need
    if calibration_data is None:
        if need is not None:
            raise InvalidOptions(f"{_as_flags(need)}: give --calibration-data PATH")
        return None
    if not calibration_data.exists():
        raise InvalidCalibrationData(f"{calibration_data}: no such file or directory")
    if not (calibration_data.is_file() or calibration_data.is_dir()):
        raise InvalidCalibrationData(f"{calibration_data}: neither a file nor a directory")
    if need is None:
        return (
            "--objective is weight: the calibration text only measures each layer's output error, it does not change the fit; "
            "add --objective activation (or activation-diag) to fit the layers' outputs, or --refine block to refine the adapters on it"
        )
    return None


def _layer_progress(layer: LayerReport) -> str:
    """One layer's result in its objective's metric: mixing metrics on one line would compare apples and pears."""
    metric = _METRIC_SHORT.get(layer.objective, f"{layer.objective} err")
    return f"{layer.module}  {metric} {layer.objective_error_quant:.4f}→{layer.objective_error:.4f}"


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="Checkpoint directory (config.json + *.safetensors).")],
    out: Annotated[Path, typer.Argument(help="Output directory; an interrupted run into the same directory resumes.")],
    quant: Annotated[str, typer.Option(help=f"{QUANT_HELP}.")] = "nf4",
    bits: Annotated[Optional[int], typer.Option(help=f"Bits per weight, implied by a fixed-width quantizer: {BITS_HELP}.")] = None,
    blocksize: Annotated[int, typer.Option(help="Elements per absmax block.")] = 64,
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank r.")] = 16,
    alpha: Annotated[Optional[float], typer.Option(help="lora_alpha (default: r). Any value is exact: scaling is folded into A and B.")] = None,
    rslora: Annotated[bool, typer.Option(help="Rank-stabilised scaling alpha/sqrt(r).")] = False,
    iters: Annotated[int, typer.Option("--iters", "-t", help="LoftQ alternating iterations T (best iterate kept).")] = 1,
    svd: Annotated[str, typer.Option(help="Low-rank solver: randomized (fast) or exact.")] = "randomized",
    oversample: Annotated[int, typer.Option(help="Randomized SVD: columns beyond the rank in each Krylov block.")] = 16,
    power_iters: Annotated[int, typer.Option(help="Randomized SVD: depth of the block Krylov space.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the randomized solver.")] = 0,
    target: Annotated[Optional[list[str]], typer.Option(help="Module name or suffix to target (repeatable), e.g. --target q_proj --target v_proj.")] = None,
    target_regex: Annotated[Optional[str], typer.Option(help="Regex matched in full against module names (RE2 syntax: linear time, no lookaround or backreferences).")] = None,
    backbone_format: Annotated[str, typer.Option(help="dequantized (Q in the source dtype) or bnb-4bit (packed, loads without a quantization config).")] = "dequantized",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    calibration_data: Annotated[
        Optional[Path],
        typer.Option(help="Calibration text: a .txt/.jsonl file or a directory of them. Needed by --objective activation|activation-diag, --refine and --evaluate."),
    ] = None,
    objective: Annotated[
        Optional[str],
        typer.Option(help="What each layer's fit minimises: weight (plain LoftQ, ‖W−Q−BA‖), activation (output error ‖(W−Q−BA)·H^½‖ on the calibration inputs), activation-diag (the same with diag H only).", show_default=_default("objective")),
    ] = None,
    damping: Annotated[Optional[float], typer.Option(help="Activation objectives: H + damping·mean(diag H)·I.", show_default=_default("damping"))] = None,
    calib_samples: Annotated[Optional[int], typer.Option(help="Calibration sequences used for fitting.", show_default=_calib_default("samples"))] = None,
    calib_seq_len: Annotated[Optional[int], typer.Option(help="Tokens per calibration sequence, capped at the model's maximum.", show_default=_calib_default("seq_len"))] = None,
    eval_samples: Annotated[Optional[int], typer.Option(help="Held-out sequences for --evaluate, never used for fitting.", show_default=_calib_default("eval_samples"))] = None,
    calib_seed: Annotated[Optional[int], typer.Option(help="Seed of the sampling of calibration sequences.", show_default=_calib_default("seed"))] = None,
    calib_batch_size: Annotated[Optional[int], typer.Option(help="Sequences per forward pass through a block.", show_default=_calib_default("batch_size"))] = None,
    propagation: Annotated[
        Optional[str],
        typer.Option(help="Inputs of block k+1: initialised (outputs of the already converted blocks) or full-precision (the original model's).", show_default=_calib_default("propagation")),
    ] = None,
    evaluate: Annotated[
        Optional[bool],
        typer.Option("--evaluate/--no-evaluate", help="Measure held-out perplexity and output cosine of the full-precision, quantized and initialised models.", show_default="no-evaluate"),
    ] = None,
    refine: Annotated[
        Optional[str],
        typer.Option(
            help="Refine the closed-form adapters on the calibration text (needs --calibration-data): none, block (each block's adapters fitted to the full-precision block outputs, kept only if better on held-out sequences), model (all adapters against the full-precision model's outputs) or block+model.",
            show_default=_default("refine"),
        ),
    ] = None,
    refine_steps: Annotated[Optional[int], typer.Option(help="Block refinement: Adam steps per block.", show_default=_refine_default("steps"))] = None,
    refine_lr: Annotated[Optional[float], typer.Option(help="Block refinement: relative learning rate (each tensor moves by about lr × its RMS per step).", show_default=_refine_default("lr"))] = None,
    refine_batch_size: Annotated[Optional[int], typer.Option(help="Block refinement: calibration sequences per step.", show_default=_refine_default("batch_size"))] = None,
    refine_holdout: Annotated[
        Optional[float],
        typer.Option(help="Block refinement: share of the calibration sequences held out of the steps, on which a block's refined adapters must beat the closed form.", show_default=_refine_default("holdout")),
    ] = None,
    refine_target: Annotated[
        Optional[str],
        typer.Option(help="Block refinement: match the full-precision block on the same inputs (block) or the full-precision model's hidden states (model: one more pass per block).", show_default=_refine_default("target")),
    ] = None,
    model_refine_steps: Annotated[Optional[int], typer.Option(help="Model refinement: Adam steps over the whole model.", show_default=_refine_default("model_steps"))] = None,
    model_refine_lr: Annotated[Optional[float], typer.Option(help="Model refinement: relative learning rate.", show_default=_refine_default("model_lr"))] = None,
    model_refine_batch_size: Annotated[Optional[int], typer.Option(help="Model refinement: calibration sequences per step.", show_default=_refine_default("model_batch_size"))] = None,
) -> None:
    """Convert SRC into a LoftQ checkpoint in OUT (backbone + loftq_init/ adapter + report + manifest).

    Targets default to all-linear (every Linear/Conv1D except the output head). With
    --calibration-data and --objective activation, each layer is fitted to its outputs on
    that text rather than to its weights; --refine then refines the adapters on it.
    """
    try:
        options = _options_from_flags(
            quant=quant,
            bits=bits,
            blocksize=blocksize,
            rank=rank,
            alpha=alpha,
            rslora=rslora,
            iters=iters,
            svd=svd,
            oversample=oversample,
            power_iters=power_iters,
            seed=seed,
            target=target,
            target_regex=target_regex,
            backbone_format=backbone_format,
            device=device,
            objective=objective,
            damping=damping,
            calib_samples=calib_samples,
            calib_seq_len=calib_seq_len,
            eval_samples=eval_samples,
            calib_seed=calib_seed,
            calib_batch_size=calib_batch_size,
            propagation=propagation,
            evaluate=evaluate,
            refine=refine,
            refine_steps=refine_steps,
            refine_lr=refine_lr,
            refine_batch_size=refine_batch_size,
            refine_holdout=refine_holdout,
            refine_target=refine_target,
            model_refine_steps=model_refine_steps,
            model_refine_lr=model_refine_lr,
            model_refine_batch_size=model_refine_batch_size,
        )
        note = _check_calibration_data(calibration_data, options)
    except LoftQError as exc:
        raise _fail(exc.code, str(exc)) from None
    if note:
        console.print(f"[yellow]note[/] {escape(note)}", highlight=False)

    from loftq.converter import convert_directory  # torch: only once the flags are known to be usable

    extra: dict[str, Any] = {"calibration_data": calibration_data} if calibration_data is not None else {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[layer]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("layers", total=None, layer="")
        blocks: dict[str, Any] = {}  # the "blocks" line, added by the first calibration event

        def on_progress(event: ProgressEvent) -> None:
            progress.update(task, total=event.layers_total, completed=event.layers_done)
            if event.stage == "calibration" and event.blocks_total:
                if "task" not in blocks:
                    blocks["task"] = progress.add_task("blocks", total=event.blocks_total, layer="calibration: activations through each block")
                progress.update(blocks["task"], total=event.blocks_total, completed=event.blocks_done)
            if event.layer is not None:
                progress.update(task, layer=_layer_progress(event.layer))
            elif event.stage == "shard":
                progress.update(task, description=f"shard {event.shards_done}/{event.shards_total}")

        try:
            report = convert_directory(src, out, options, on_progress=on_progress, **extra)
        except LoftQError as exc:
            raise _fail(exc.code, str(exc)) from None
    _print_summary(report.to_dict(), out)


def _output_errors(layer: dict[str, Any]) -> tuple[float, float] | None:
    """A layer's output error ‖(W−·)·H^½‖/‖W·H^½‖ (full, damped H) before and after the adapters, if it was measured.

    Calibrated conversions record it whatever the objective; with objective "activation" it is the objective's own metric.
    """
    if layer.get("output_error") is not None and layer.get("output_error_quant") is not None:
        return layer["output_error_quant"], layer["output_error"]
    if layer.get("objective") == "activation":
        return layer["objective_error_quant"], layer["objective_error"]
    return None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _print_summary(report: dict, out: Path, output: Console | None = None) -> None:
    """The closing table of ``convert`` and the head of ``inspect``; reads older reports too (fields added later may be absent)."""
    summary = report["summary"]
    options = report["options"]
    objective = summary.get("objective") or options.get("objective") or "weight"
    table = Table(title=f"LoftQ checkpoint: {out}", show_header=False)
    table.add_row("architecture", report["architecture"])
    settings = f"{options['quant']} r={options['rank']} alpha={options['lora_alpha']} T={options['iters']} svd={options['svd']}"
    if objective != "weight":
        settings += f" objective={objective} damping={options.get('damping')}"
    if options.get("refine", "none") != "none":
        settings += f" refine={options['refine']}"
    table.add_row("settings", settings)
    calibration = report.get("calibration")
    if calibration:
        table.add_row(
            "calibration",
            f"{calibration['sequences']} sequences {'×' if calibration['packed'] else 'of ≤'} {calibration['seq_len']} tokens "
            f"({calibration['tokens']} tokens from {calibration['documents']} documents, "
            f"{'packed' if calibration['packed'] else 'one document per sequence'}), "
            f"{calibration['blocks']} blocks, propagation {calibration['propagation']}, sha256 {calibration['sha256'][:12]}…",
        )
    table.add_row("layers", str(summary["layers"]))
    table.add_row("mean error, quantized only", f"{summary['mean_error_quant']:.5f}")
    table.add_row("mean error, with adapters", f"{summary['mean_error']:.5f}")
    if objective not in ("weight", "activation"):  # activation-diag (or mixed): its own metric, then the full-H output error
        table.add_row(f"mean {objective} error, quantized only", f"{summary['mean_objective_error_quant']:.5f}")
        table.add_row(f"mean {objective} error, with adapters", f"{summary['mean_objective_error']:.5f}")
    outputs = [pair for pair in map(_output_errors, report.get("layers", [])) if pair is not None]
    if outputs:
        label = f"mean output error ({objective})" if objective != "weight" else "mean output error (measured)"
        table.add_row(f"{label}, quantized only", f"{_mean([quant for quant, _ in outputs]):.5f}")
        table.add_row(f"{label}, with adapters", f"{_mean([after for _, after in outputs]):.5f}")
    elif objective == "activation":  # a report without its layers
        table.add_row("mean output error (activation), quantized only", f"{summary['mean_objective_error_quant']:.5f}")
        table.add_row("mean output error (activation), with adapters", f"{summary['mean_objective_error']:.5f}")
    for warning in report.get("warnings") or []:
        table.add_row("warning", f"[yellow]{escape(warning)}[/]")
    warned = sum(1 for layer in report.get("layers", []) if layer.get("warnings"))
    if warned:
        table.add_row("layers with warnings", f"{warned} (loftq inspect --layers lists them)")
    evaluation = summary.get("evaluation")
    if evaluation:
        table.add_row("held-out evaluation", f"{evaluation['sequences']} sequences, {evaluation['tokens']} tokens")
        has_perplexity = evaluation.get("perplexity_full_precision") is not None
        if has_perplexity:
            table.add_row("held-out perplexity, full precision", f"{evaluation['perplexity_full_precision']:.4f}")
            table.add_row("held-out perplexity, quantized only", f"{evaluation['perplexity_quantized']:.4f}")
            table.add_row("held-out perplexity, with adapters", f"{evaluation['perplexity_initialised']:.4f}")
        if evaluation.get("gap_recovered") is not None:
            basis = "perplexity" if has_perplexity else "1 − cosine"
            table.add_row("gap recovered by the adapters", f"{100 * evaluation['gap_recovered']:.1f} % (of the {basis} gap)")
        table.add_row("mean cosine to full precision, quantized only", f"{evaluation['cosine_quantized']:.5f}")
        table.add_row("mean cosine to full precision, with adapters", f"{evaluation['cosine_initialised']:.5f}")
    if report.get("refinement"):
        for label, value in _refinement_rows(report["refinement"]):
            table.add_row(label, value)
    table.add_row("time", f"{summary['seconds']:.1f} s on {report['device']}")
    memory = f"{summary['peak_rss_mb']:.0f} MB RSS"
    if summary.get("peak_device_mb") is not None:
        memory += f", {summary['peak_device_mb']:.0f} MB on device"
    table.add_row("peak memory", memory)
    if summary["shards_resumed"]:
        table.add_row("resumed shards", f"{summary['shards_resumed']} of {summary['shards']}")
    if (out / PLOT_NAME).is_file():
        table.add_row("layer plot", str(out / PLOT_NAME))
    (output or Console()).print(table)


def _refinement_rows(refinement: dict[str, Any]) -> list[tuple[str, str]]:
    """What refinement bought: blocks that kept their refined adapters, their mean held-out gain and the time;
    the model stage's held-out loss before and after. Reads the derived figures ``Report.to_dict`` adds."""
    blocks = refinement.get("blocks") or []
    text = str(refinement.get("mode", "?"))
    if blocks:
        accepted = refinement.get("blocks_accepted", sum(bool(block.get("accepted")) for block in blocks))
        text += f": {accepted}/{len(blocks)} blocks accepted"
        gain = refinement.get("mean_block_gain")
        if gain is not None:
            text += f", mean held-out gain {100 * gain:.1f} %"
    text += f", {refinement.get('seconds', 0.0):.1f} s"
    if refinement.get("heldout_sequences"):
        text += f" ({refinement['heldout_sequences']} held-out sequences)"
    rows = [("refinement", text)]
    model = refinement.get("model")
    if model:
        rows.append((
            "model refinement",
            f"held-out {model['loss']} {model['heldout_before']:.5g} → {model['heldout_after']:.5g}, "
            f"{'accepted' if model['accepted'] else 'rejected'}, {model['steps']} steps, {model['seconds']:.1f} s",
        ))
    return rows


def _layers_table(layers: list[dict[str, Any]]) -> Table:
    """Every layer's errors, in the model's order (``loftq.plot.model_order``, as the plot draws them);
    extra metrics, blocks and warnings only get columns when some layer has them."""
    layers = [layers[i] for i in model_order(layers)]
    with_diag = any(layer.get("objective") == "activation-diag" for layer in layers)
    with_output = any(_output_errors(layer) is not None for layer in layers)
    with_block = any(layer.get("block") is not None for layer in layers)
    with_warnings = any(layer.get("warnings") for layer in layers)
    columns = ["layer", "shape"] + (["block"] if with_block else []) + ["quantized", "with adapters"]
    if with_diag:
        columns += ["diag-H err, quantized", "diag-H err, with adapters"]
    if with_output:
        columns += ["output err, quantized", "output err, with adapters"]
    columns += ["best iter", "seconds"] + (["warnings"] if with_warnings else [])
    table = Table(*columns)
    for layer in layers:
        row = [layer["module"], "×".join(map(str, layer["shape"]))]
        if with_block:
            row.append("" if layer.get("block") is None else str(layer["block"]))
        row += [f"{layer['error_quant']:.5f}", f"{layer['error']:.5f}"]
        if with_diag:
            diag = layer.get("objective") == "activation-diag"
            row += [f"{layer['objective_error_quant']:.5f}", f"{layer['objective_error']:.5f}"] if diag else ["", ""]
        if with_output:
            pair = _output_errors(layer)
            row += [f"{pair[0]:.5f}", f"{pair[1]:.5f}"] if pair else ["", ""]
        row += [str(layer["best_iter"]), f"{layer['seconds']:.2f}"]
        if with_warnings:
            row.append("; ".join(layer.get("warnings") or []))
        table.add_row(*map(escape, row))
    return table


@app.command()
def inspect(
    out: Annotated[Path, typer.Argument(help="A LoftQ checkpoint directory.")],
    layers: Annotated[bool, typer.Option(help="Also list every layer's errors.")] = False,
    verify: Annotated[bool, typer.Option(help=f"Check every file's size and sha256 against {MANIFEST_NAME}.")] = False,
) -> None:
    """Print a LoftQ checkpoint's report; optionally verify its files."""
    report_path, manifest_path = out / REPORT_NAME, out / MANIFEST_NAME
    if not manifest_path.is_file():
        raise _fail("incomplete_checkpoint", f"{out}: no {MANIFEST_NAME}, so this is not a finished LoftQ checkpoint")
    report = json.loads(report_path.read_text())
    _print_summary(report, out)
    if layers:
        Console().print(_layers_table(report["layers"]))
    if verify:
        bad = []
        for entry in json.loads(manifest_path.read_text())["files"]:
            path = out / entry["path"]
            if not path.is_file() or path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
                bad.append(entry["path"])
        if bad:
            raise _fail("checksum_mismatch", f"{len(bad)} file(s) differ from {MANIFEST_NAME}: {', '.join(bad[:5])}")
        Console().print(f"[green]all files match {MANIFEST_NAME}[/]")


if __name__ == "__main__":
    app()
