"""The ``loftq`` command line: ``loftq convert SRC OUT`` and ``loftq inspect OUT``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from loftq.errors import LoftQError
from loftq.options import ALL_LINEAR, ConvertOptions
from loftq.report import ProgressEvent

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Turn Hugging Face checkpoints into LoftQ checkpoints.")
console = Console(stderr=True)
EXIT_BAD_INPUT = 2


def _fail(code: str, message: str) -> typer.Exit:
    console.print(f"[bold red]error[/] {escape(f'[{code}]')} {escape(message)}", highlight=False)
    return typer.Exit(EXIT_BAD_INPUT)


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="Checkpoint directory (config.json + *.safetensors).")],
    out: Annotated[Path, typer.Argument(help="Output directory; an interrupted run into the same directory resumes.")],
    quant: Annotated[str, typer.Option(help="nf4, fp4, int8 (row-wise), int (uniform block-wise), nf2, nf3.")] = "nf4",
    bits: Annotated[Optional[int], typer.Option(help="Bits per weight; implied by nf4/fp4/int8/nf2/nf3, 2..8 for int.")] = None,
    blocksize: Annotated[int, typer.Option(help="Elements per absmax block.")] = 64,
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank r.")] = 16,
    alpha: Annotated[Optional[float], typer.Option(help="lora_alpha (default: r). Any value is exact: scaling is folded into A and B.")] = None,
    rslora: Annotated[bool, typer.Option(help="Rank-stabilised scaling alpha/sqrt(r).")] = False,
    iters: Annotated[int, typer.Option("--iters", "-t", help="LoftQ alternating iterations T (best iterate kept).")] = 1,
    svd: Annotated[str, typer.Option(help="Low-rank solver: randomized (fast) or exact.")] = "randomized",
    oversample: Annotated[int, typer.Option(help="Randomized SVD: extra sketch columns.")] = 32,
    power_iters: Annotated[int, typer.Option(help="Randomized SVD: power iterations.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the randomized solver.")] = 0,
    target: Annotated[Optional[list[str]], typer.Option(help="Module name or suffix to target (repeatable), e.g. --target q_proj --target v_proj.")] = None,
    target_regex: Annotated[Optional[str], typer.Option(help="Regex matched in full against module names.")] = None,
    backbone_format: Annotated[str, typer.Option(help="dequantized (Q in the source dtype) or bnb-4bit (packed, loads without a quantization config).")] = "dequantized",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Convert SRC into a LoftQ checkpoint in OUT (backbone + loftq_init/ adapter + report + manifest).

    Targets default to all-linear (every Linear/Conv1D except the output head).
    """
    from loftq.converter import convert_directory

    if target and target_regex:
        raise _fail("invalid_options", "use --target or --target-regex, not both")
    fixed_bits = {"nf4": 4, "fp4": 4, "int8": 8, "nf2": 2, "nf3": 3}
    try:
        options = ConvertOptions(
            quant=quant,
            bits=bits if bits is not None else fixed_bits.get(quant, 4),
            blocksize=blocksize,
            rank=rank,
            lora_alpha=alpha,
            use_rslora=rslora,
            iters=iters,
            svd=svd,
            svd_oversample=oversample,
            svd_power_iters=power_iters,
            seed=seed,
            target_modules=list(target) if target else (target_regex or ALL_LINEAR),
            backbone_format=backbone_format,
            device=device,
        )
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
        raise _fail("invalid_options", details) from None

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

        def on_progress(event: ProgressEvent) -> None:
            progress.update(task, total=event.layers_total, completed=event.layers_done)
            if event.layer is not None:
                progress.update(task, layer=f"{event.layer.module}  err {event.layer.error_quant:.4f}→{event.layer.error:.4f}")
            elif event.stage == "shard":
                progress.update(task, description=f"shard {event.shards_done}/{event.shards_total}")

        try:
            report = convert_directory(src, out, options, on_progress=on_progress)
        except LoftQError as exc:
            raise _fail(exc.code, str(exc)) from None
    _print_summary(report.to_dict(), out)


def _print_summary(report: dict, out: Path) -> None:
    summary = report["summary"]
    table = Table(title=f"LoftQ checkpoint: {out}", show_header=False)
    table.add_row("architecture", report["architecture"])
    options = report["options"]
    table.add_row("settings", f"{options['quant']} r={options['rank']} alpha={options['lora_alpha']} T={options['iters']} svd={options['svd']}")
    table.add_row("layers", str(summary["layers"]))
    table.add_row("mean error, quantized only", f"{summary['mean_error_quant']:.5f}")
    table.add_row("mean error, with adapters", f"{summary['mean_error']:.5f}")
    table.add_row("time", f"{summary['seconds']:.1f} s on {report['device']}")
    memory = f"{summary['peak_rss_mb']:.0f} MB RSS"
    if summary.get("peak_device_mb") is not None:
        memory += f", {summary['peak_device_mb']:.0f} MB on device"
    table.add_row("peak memory", memory)
    if summary["shards_resumed"]:
        table.add_row("resumed shards", f"{summary['shards_resumed']} of {summary['shards']}")
    Console().print(table)


@app.command()
def inspect(
    out: Annotated[Path, typer.Argument(help="A LoftQ checkpoint directory.")],
    layers: Annotated[bool, typer.Option(help="Also list every layer's errors.")] = False,
    verify: Annotated[bool, typer.Option(help="Check every file's size and sha256 against manifest.json.")] = False,
) -> None:
    """Print a LoftQ checkpoint's report; optionally verify its files."""
    from loftq.safetensors_io import sha256_file

    report_path, manifest_path = out / "loftq_report.json", out / "manifest.json"
    if not manifest_path.is_file():
        raise _fail("incomplete_checkpoint", f"{out}: no manifest.json, so this is not a finished LoftQ checkpoint")
    report = json.loads(report_path.read_text())
    _print_summary(report, out)
    if layers:
        table = Table("layer", "shape", "quantized", "with adapters", "best iter", "seconds")
        for layer in report["layers"]:
            table.add_row(layer["module"], "×".join(map(str, layer["shape"])), f"{layer['error_quant']:.5f}", f"{layer['error']:.5f}", str(layer["best_iter"]), f"{layer['seconds']:.2f}")
        Console().print(table)
    if verify:
        bad = []
        for entry in json.loads(manifest_path.read_text())["files"]:
            path = out / entry["path"]
            if not path.is_file() or path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
                bad.append(entry["path"])
        if bad:
            raise _fail("checksum_mismatch", f"{len(bad)} file(s) differ from manifest.json: {', '.join(bad[:5])}")
        Console().print("[green]all files match manifest.json[/]")


if __name__ == "__main__":
    app()
