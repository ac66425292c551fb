"""Refinement benchmark: how much of the quantization's perplexity gap each initialisation closes.

On the corpus decoder of bench/decoder.py (trained on the ``pretrain`` split of bench/corpus.py),
or any decoder directory given with ``--model``, side by side in one run, for every quantizer and rank asked for:

* ``plain``: the quantized backbone without adapters (the backbone of a weight-space T=1
  conversion is exactly quant(W));
* ``weight``: weight-space LoftQ (``--weight-iters``, T=5 by default);
* ``activation``: the closed-form activation objective, T=1;
* ``block``: the same plus block refinement (``refine=block``, default settings);
* ``block+model``: plus the model stage (``refine=block+model``).

Every conversion is calibrated on the ``calibration`` split and evaluated on the ``heldout``
split, text that neither the decoder's training nor any fit saw: each produced checkpoint is
loaded the documented way (transformers + PEFT, fp32) and its perplexity measured on fixed
windows. "gap closed" is (ppl_plain − ppl) / (ppl_plain − ppl_fp). Wall times are of the
conversion alone (load, calibrate, fit, write), measured in the same run, and "× act." is the
time relative to the activation row of the same quantizer and rank.

    python bench/refine.py [--quants nf4 nf3 nf2] [--ranks 16 64] [--workdir DIR] [--json FILE]
                           [--calib-samples 128] [--methods ...] [--from-json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
for _path in (str(BENCH), str(BENCH.parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

METHODS = ["plain", "weight", "activation", "block", "block+model"]
SEQ_LEN = 128


def _options(method: str, quant: str, bits: int | None, rank: int, weight_iters: int, samples: int):
    from loftq.options import CalibrationOptions, ConvertOptions

    common = {"quant": quant, "rank": rank, "device": "cpu", **({"bits": bits} if bits else {})}
    if method in ("plain", "weight"):
        return ConvertOptions(**common, iters=1 if method == "plain" else weight_iters), False
    refine = {"activation": "none", "block": "block", "block+model": "block+model"}[method]
    calibration = CalibrationOptions(samples=samples, seq_len=SEQ_LEN, eval_samples=0)
    return ConvertOptions(**common, objective="activation", refine=refine, calibration=calibration), True


def _perplexity(directory: Path, windows, adapter: bool) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from decoder import mean_loss

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(directory / "loftq_init")).eval()
    return math.exp(mean_loss(model, windows))


def run(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import corpus
    from decoder import mean_loss, packed_windows, trained_decoder
    from loftq.converter import convert_directory

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    source = args.model or trained_decoder(work)
    calibration = corpus.write_split("calibration", work / "calibration.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    windows = packed_windows(tokenizer, corpus.splits()["heldout"], SEQ_LEN)
    fp = math.exp(mean_loss(AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval(), windows))
    print(f"[refine] decoder {source.name}: held-out ppl {fp:.3f} on {windows.shape[0]} windows of {SEQ_LEN}", file=sys.stderr, flush=True)
    rows = []
    for quant in args.quants:
        name, _, bits = quant.partition(":")  # "int:3"
        for rank in args.ranks:
            for method in args.methods:
                options, calibrated = _options(method, name, int(bits) if bits else None, rank, args.weight_iters, args.calib_samples)
                out = work / f"out-{name}{bits}-{rank}-{method}"
                shutil.rmtree(out, ignore_errors=True)
                started = time.perf_counter()
                report = convert_directory(source, out, options, calibration_data=calibration if calibrated else None)
                seconds = time.perf_counter() - started
                ppl = _perplexity(out, windows, adapter=method != "plain")
                refinement = report.refinement
                row = {"quant": quant, "rank": rank, "method": method, "ppl": ppl, "seconds": seconds,
                       "blocks_accepted": None if refinement is None else refinement.blocks_accepted,
                       "blocks": None if refinement is None else len(refinement.blocks),
                       "mean_block_gain": None if refinement is None else refinement.mean_block_gain,
                       "model_stage": None if refinement is None or refinement.model is None else
                       {"before": refinement.model.heldout_before, "after": refinement.model.heldout_after,
                        "accepted": refinement.model.accepted, "seconds": refinement.model.seconds}}
                rows.append(row)
                print(f"[refine] {quant} r={rank} {method}: ppl {ppl:.4f} in {seconds:.1f} s", file=sys.stderr, flush=True)
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
    record = source / "training.json"
    training = json.loads(record.read_text()) if record.is_file() else {}
    return {"fp_ppl": fp, "rows": rows, "decoder": {"path": str(source), "heldout_ppl": training.get("heldout_ppl"),
                                                    "parameters": training.get("parameters"), "shape": training.get("settings", {}).get("shape")},
            "calib_samples": args.calib_samples, "seq_len": SEQ_LEN, "heldout_windows": int(windows.shape[0]),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def table(result: dict) -> str:
    fp = result["fp_ppl"]
    lines = [f"full precision: held-out ppl {fp:.4f} ({result['heldout_windows']} windows of {result['seq_len']} tokens)", "",
             "| quant | r | method | held-out ppl | gap closed | blocks kept | model stage | wall s | × act. |",
             "|---|---:|---|---:|---:|---:|---|---:|---:|"]
    groups: dict[tuple, dict[str, dict]] = {}
    for row in result["rows"]:
        groups.setdefault((row["quant"], row["rank"]), {})[row["method"]] = row
    for (quant, rank), methods in groups.items():
        plain = methods.get("plain", {}).get("ppl")
        activation = methods.get("activation", {}).get("seconds")
        for method, row in methods.items():
            gap = "–" if plain is None or plain <= fp else f"{(plain - row['ppl']) / (plain - fp):.1%}"
            kept = "–" if row["blocks"] is None else f"{row['blocks_accepted']}/{row['blocks']}"
            stage = row["model_stage"]
            model = "–" if stage is None else f"{stage['before']:.2e}→{stage['after']:.2e} {'kept' if stage['accepted'] else 'rejected'}"
            ratio = "–" if activation is None or method in ("plain", "weight") else f"{row['seconds'] / activation:.2f}"
            lines.append(f"| {quant} | {rank} | {method} | {row['ppl']:.4f} | {gap} | {kept} | {model} | {row['seconds']:.1f} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quants", nargs="+", default=["nf4", "nf3", "nf2"], help="quantizers; int:N for N-bit uniform")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--model", type=Path, help="a decoder checkpoint directory (with its tokenizer) instead of the bench decoder")
    parser.add_argument("--weight-iters", type=int, default=5)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "loftq-bench-decoders")
    parser.add_argument("--keep", action="store_true", help="keep the converted checkpoints")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--from-json", type=Path)
    args = parser.parse_args()
    result = json.loads(args.from_json.read_text()) if args.from_json else run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
