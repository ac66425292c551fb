"""Does LoftQ beat QLoRA after fine-tuning? LoRA fine-tuning from each initialisation, side by side.

The decoder of bench/decoder.py (``trained_decoder``: trained on the ``pretrain`` split of
bench/corpus.py, cached) is converted with the engine (CPU, NF4 unless ``--quant``, rank 16,
lora_alpha 16) into the starting points compared:

* ``qlora``: the backbone of an ``objective=weight, iters=1`` conversion, which is exactly the
  plain quant(W), with PEFT's default LoRA init (A Kaiming-uniform from the seed, B = 0): the
  model starts as the plainly quantized one. The conversion's own adapters are not used.
* ``loftq``: weight-space LoftQ, ``objective=weight, iters=5``, its backbone and adapters.
* ``activation``: ``objective=activation, iters=1``, calibrated on the ``calibration`` split.
* ``refined``: the same plus ``refine="block"`` (skipped, with a message, when the engine has no
  block refinement).
* ``lora-fp`` (reference, not a quantized method, only with ``--methods``): the full-precision
  decoder with PEFT's default LoRA init, what the others try to approach.

Each starting point is loaded the documented way on CPU (the dequantized backbone as a plain
fp32 model, frozen; ``PeftModel.from_pretrained(..., subfolder="loftq_init", is_trainable=True)``)
and LoRA-fine-tuned for ``--steps`` AdamW steps (linear warm-up over 10 % of the steps, cosine
decay) on batches of windows drawn at random from the ``finetune`` split. A seed fixes the data
order (the same for every method, so methods are compared pair-wise per seed) and QLoRA's A.
Training loss is recorded every step; the held-out loss on fixed windows of the ``heldout``
split at step 0 (right after the initialisation), every ``--eval-every`` steps and at the end.

    python bench/finetune.py [--steps 60] [--seeds 2] [--lr 1e-3] [--batch 4] [--methods qlora loftq ... lora-fp]
                             [--workdir DIR] [--json FILE] [--png FILE] [--from-json FILE]

Outputs: the table (stdout), every curve and figure in ``--json``, the curves in ``--png``
(mean over seeds, shaded min–max). The decoder and the conversions are cached in ``--workdir``
(keyed by their settings), so a second run only fine-tunes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import fmean, pstdev

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _path in (str(BENCH), str(ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

METHODS = {
    "qlora": {"label": "QLoRA (plain quant, B = 0)", "options": {"objective": "weight", "iters": 1}, "fresh": True},
    "loftq": {"label": "LoftQ weight, T = 5", "options": {"objective": "weight", "iters": 5}},
    "activation": {"label": "LoftQ activation, T = 1", "options": {"objective": "activation", "iters": 1}},
    "refined": {"label": "activation + refine block", "options": {"objective": "activation", "iters": 1, "refine": "block"}},
    "lora-fp": {"label": "LoRA on full precision (reference)", "options": None, "fresh": True},
}
DEFAULTS = {"steps": 60, "seeds": 2, "lr": 1e-3, "batch": 4, "seq_len": 128, "eval_every": 15, "eval_windows": 32,
            "rank": 16, "lora_alpha": 16.0, "quant": "nf4", "calib_samples": 128}
DEFAULT_METHODS = ["qlora", "loftq", "activation", "refined"]
BASELINE = "qlora"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- conversions


def refine_available() -> str | None:
    """None when ConvertOptions takes refine="block", else why not."""
    from loftq.options import ConvertOptions

    try:
        ConvertOptions(refine="block")
    except Exception as exc:  # pydantic's ValidationError: no such field yet
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None


def convert(method: str, model_dir: Path, workdir: Path, calibration: Path, args) -> tuple[Path | None, dict]:
    """Convert (or reuse) the starting point of ``method``; (checkpoint dir, figures). The dir is
    None when the method cannot run here (figures then hold ``skipped``)."""
    spec = METHODS[method]
    if spec["options"] is None:
        return model_dir, {"source": str(model_dir)}
    from loftq.converter import convert_directory
    from loftq.options import CalibrationOptions, ConvertOptions

    settings = dict(spec["options"])
    if "refine" in settings:
        missing = refine_available()
        if missing:
            return None, {"skipped": f"the engine has no refine option ({missing})"}
    calibrated = settings["objective"] != "weight"
    options = ConvertOptions(
        quant=args.quant, rank=args.rank, lora_alpha=args.lora_alpha, device="cpu", **settings,
        calibration=CalibrationOptions(samples=args.calib_samples, seq_len=args.seq_len, eval_samples=0),
    )
    key = hashlib.sha256(json.dumps({"model": model_dir.name, "options": options.model_dump(mode="json"),
                                     "calibration": calibrated and hashlib.sha256(calibration.read_bytes()).hexdigest()},
                                    sort_keys=True).encode()).hexdigest()[:12]
    out = workdir / f"{method}-{key}"
    report_path = out / "loftq_report.json"
    if (out / "manifest.json").is_file() and report_path.is_file():
        log(f"[convert] {method}: reusing {out}")
        return out, {**_figures(json.loads(report_path.read_text())), "dir": str(out), "reused": True}
    shutil.rmtree(out, ignore_errors=True)
    log(f"[convert] {method}: {settings} {args.quant} r {args.rank} ...")
    started = time.perf_counter()
    try:
        report = convert_directory(model_dir, out, options, calibration_data=calibration if calibrated else None)
    except Exception as exc:
        if "refine" not in settings:
            raise
        shutil.rmtree(out, ignore_errors=True)
        log(f"[convert] {method}: SKIPPED, the block refinement failed: {type(exc).__name__}: {exc}")
        return None, {"skipped": f"conversion failed: {type(exc).__name__}: {exc}"}
    figures = {**_figures(report.to_dict()), "dir": str(out), "reused": False, "seconds": time.perf_counter() - started}
    log(f"[convert] {method}: {figures['seconds']:.1f} s; mean weight error {figures['mean_error_quant']:.4f} -> "
        f"{figures['mean_error']:.4f}" + (f", output error {figures['mean_output_error_quant']:.4f} -> "
                                          f"{figures['mean_output_error']:.4f}" if figures.get("mean_output_error") else ""))
    return out, figures


def _figures(report: dict) -> dict:
    summary = report["summary"]
    figures = {key: summary.get(key) for key in ("mean_error_quant", "mean_error", "mean_output_error_quant",
                                                 "mean_output_error", "seconds")}
    refinement = report.get("refinement")
    if refinement:
        figures["refinement"] = {key: refinement.get(key) for key in ("mode", "blocks_accepted", "mean_block_gain", "seconds")}
    return figures


# --------------------------------------------------------------------------- fine-tuning


def load_start(method: str, checkpoint: Path, seed: int):
    """The PEFT model a run starts from: frozen fp32 backbone, trainable LoRA adapters."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32, local_files_only=True)
    base.requires_grad_(False)
    if METHODS[method].get("fresh"):
        if method == "lora-fp":  # no conversion: the same LoRA layout as the converted ones
            config = LoraConfig(r=RUN["rank"], lora_alpha=RUN["lora_alpha"], lora_dropout=0.0,
                                target_modules=RUN["target_modules"], task_type="CAUSAL_LM")
        else:
            config = LoraConfig.from_pretrained(str(checkpoint / "loftq_init"))
            config.init_lora_weights = True  # PEFT's default: A Kaiming-uniform, B = 0
        torch.manual_seed(10_000 + seed)
        model = get_peft_model(base, config)
    else:
        model = PeftModel.from_pretrained(base, str(checkpoint), subfolder="loftq_init", is_trainable=True)
    return model


RUN: dict = {}
"""LoRA layout shared by every method (set from the first converted checkpoint)."""


def finetune(method: str, checkpoint: Path, seed: int, stream, bos, heldout, args) -> dict:
    import torch

    from decoder import mean_loss, random_windows

    torch.manual_seed(seed)
    model = load_start(method, checkpoint, seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    heldout_curve = [[0, mean_loss(model, heldout)]]
    train_curve: list[float] = []
    model.train()
    for step in range(1, args.steps + 1):
        x = random_windows(stream, bos, args.seq_len, args.batch, generator)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_curve.append(float(loss.detach()))
        if step % args.eval_every == 0 or step == args.steps:
            heldout_curve.append([step, mean_loss(model, heldout)])
            log(f"[finetune] {method} seed {seed}: step {step}/{args.steps}  train {fmean(train_curve[-args.eval_every:]):.3f}"
                f"  held-out {heldout_curve[-1][1]:.4f}  ({time.perf_counter() - started:.0f} s)")
    return {"seed": seed, "train_loss": train_curve, "heldout_loss": heldout_curve,
            "seconds": time.perf_counter() - started, "trainable_parameters": sum(p.numel() for p in trainable)}


# --------------------------------------------------------------------------- summary, table, plot


def summarise(results: dict) -> dict:
    runs = results["runs"]
    base = {run["seed"]: run for run in runs.get(BASELINE, [])}
    summary = {}
    for method, method_runs in runs.items():
        start = [run["heldout_loss"][0][1] for run in method_runs]
        end = [run["heldout_loss"][-1][1] for run in method_runs]
        entry = {"start_mean": fmean(start), "end_mean": fmean(end), "end_std": pstdev(end) if len(end) > 1 else 0.0,
                 "end_min": min(end), "end_max": max(end), "end_ppl": math.exp(fmean(end)), "seeds": len(end),
                 "seconds_per_run": fmean(run["seconds"] for run in method_runs)}
        paired = [(run["heldout_loss"][-1][1] - base[run["seed"]]["heldout_loss"][-1][1],
                   run["heldout_loss"][0][1] - base[run["seed"]]["heldout_loss"][0][1])
                  for run in method_runs if run["seed"] in base]
        if paired and method != BASELINE:
            ends = [p[0] for p in paired]
            entry.update({"delta_end_mean": fmean(ends), "delta_end_std": pstdev(ends) if len(ends) > 1 else 0.0,
                          "delta_start_mean": fmean(p[1] for p in paired),
                          "wins": sum(d < 0 for d in ends), "pairs": len(ends)})
        summary[method] = entry
    return summary


def table(results: dict) -> str:
    summary = results["summary"]
    lines = ["| method | held-out loss, step 0 | held-out loss, end (mean ± std) | end ppl | Δ vs QLoRA, step 0 | "
             "Δ vs QLoRA, end (paired mean ± std) | better than QLoRA | fine-tune s/run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method in results["methods"]:
        if method not in summary:
            lines.append(f"| {METHODS[method]['label']} | skipped | – | – | – | – | – | – |")
            continue
        s = summary[method]
        if "delta_end_mean" in s:
            delta0, delta = f"{s['delta_start_mean']:+.4f}", f"{s['delta_end_mean']:+.4f} ± {s['delta_end_std']:.4f}"
            wins = f"{s['wins']}/{s['pairs']} seeds"
        else:
            delta0 = delta = wins = "–"
        lines.append(f"| {METHODS[method]['label']} | {s['start_mean']:.4f} | {s['end_mean']:.4f} ± {s['end_std']:.4f} | "
                     f"{s['end_ppl']:.2f} | {delta0} | {delta} | {wins} | {s['seconds_per_run']:.0f} |")
    return "\n".join(lines)


def print_results(results: dict) -> None:
    dec = results["decoder"]
    a = results["settings"]
    print(f"\ndecoder: {dec['parameters']:,} parameters, held-out ppl {dec['heldout_ppl']:.2f} (loss "
          f"{math.log(dec['heldout_ppl']):.4f}) on all {dec['heldout_windows']} held-out windows; this bench's "
          f"{a['eval_windows']} fixed windows: full precision {results['reference']['fp_heldout_loss']:.4f}")
    print(f"{a['quant'].upper()}, r {a['rank']}, lora_alpha {a['lora_alpha']:g}; {a['steps']} steps × {a['batch']} windows × "
          f"{a['seq_len']} tokens, AdamW lr {a['lr']:g}, {len(a['seed_list'])} seeds; "
          f"total {results['seconds']:.0f} s ({results.get('seconds_preparing', 0):.0f} s decoder, data and conversions, "
          f"{results.get('seconds_finetuning', 0):.0f} s fine-tuning; torch threads {results['machine']['torch_threads']})")
    for method, conv in results["conversions"].items():
        if "skipped" in conv:
            print(f"  {method}: SKIPPED: {conv['skipped']}")
        elif conv.get("mean_error") is not None:
            extra = ""
            if conv.get("mean_output_error") is not None:
                extra = f", output error {conv['mean_output_error_quant']:.4f} -> {conv['mean_output_error']:.4f}"
            if conv.get("refinement"):
                r = conv["refinement"]
                extra += f", refinement: {r['blocks_accepted']} blocks accepted, mean gain {r['mean_block_gain']}"
            print(f"  {method}: weight error {conv['mean_error_quant']:.4f} -> {conv['mean_error']:.4f}{extra}"
                  f" (conversion {conv.get('seconds', 0):.1f} s{', cached' if conv.get('reused') else ''})")
    print()
    print(table(results))


def plot(results: dict, path: Path) -> None:
    """Three panels: training loss (moving average), held-out loss, and held-out loss minus
    QLoRA's of the same seed (the paired difference the table reports); mean over seeds, shaded
    min–max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    a = results["settings"]
    runs_by_method = results["runs"]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(18, 5))
    smooth = max(1, a["steps"] // 15)
    base = {run["seed"]: run for run in runs_by_method.get(BASELINE, [])}
    for index, (method, runs) in enumerate(runs_by_method.items()):
        color = f"C{index}"
        label = METHODS[method]["label"]
        kernel = np.ones(smooth) / smooth
        train = np.array([np.convolve(run["train_loss"], kernel, mode="valid") for run in runs])
        steps = np.arange(smooth, smooth + train.shape[1])
        left.plot(steps, train.mean(0), color=color, label=label)
        left.fill_between(steps, train.min(0), train.max(0), color=color, alpha=0.12)
        at = [step for step, _ in runs[0]["heldout_loss"]]
        held = np.array([[loss for _, loss in run["heldout_loss"]] for run in runs])
        middle.plot(at, held.mean(0), color=color, marker="o", markersize=3, label=label)
        middle.fill_between(at, held.min(0), held.max(0), color=color, alpha=0.15)
        paired = [run for run in runs if run["seed"] in base]
        if paired:
            delta = np.array([[loss - ref for (_, loss), (_, ref) in zip(run["heldout_loss"], base[run["seed"]]["heldout_loss"])]
                              for run in paired])
            right.plot(at, delta.mean(0), color=color, marker="o", markersize=3, label=label)
            right.fill_between(at, delta.min(0), delta.max(0), color=color, alpha=0.15)
    fp = results["reference"]["fp_heldout_loss"]
    middle.axhline(fp, color="black", linestyle="--", linewidth=1, label="full precision, no fine-tuning")
    left.set(title=f"training loss (moving average of {smooth} steps)", xlabel="step", ylabel="loss")
    middle.set(title=f"held-out loss ({a['eval_windows']} fixed windows)", xlabel="step", ylabel="loss")
    right.set(title="held-out loss − QLoRA's, same seed (below 0: better)", xlabel="step", ylabel="Δ loss")
    for axis in (left, middle, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(f"LoRA fine-tuning from each initialisation: {a['quant'].upper()}, r {a['rank']}, {a['steps']} steps × "
                 f"{a['batch']} windows, lr {a['lr']:g}; mean over {len(a['seed_list'])} seeds, shaded min–max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="fine-tuning steps per run")
    parser.add_argument("--seeds", type=int, default=DEFAULTS["seeds"], help="seeds 0..N-1 (data order, QLoRA's A)")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="AdamW peak learning rate")
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="windows per step")
    parser.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"], help="tokens per window")
    parser.add_argument("--eval-every", type=int, default=DEFAULTS["eval_every"], help="steps between held-out evaluations")
    parser.add_argument("--eval-windows", type=int, default=DEFAULTS["eval_windows"], help="fixed held-out windows")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS,
                        help=f"default: {' '.join(DEFAULT_METHODS)} (add lora-fp for the full-precision reference)")
    parser.add_argument("--quant", default=DEFAULTS["quant"], help="quantizer of the conversions (nf4, nf3, nf2, ...)")
    parser.add_argument("--rank", type=int, default=DEFAULTS["rank"])
    parser.add_argument("--lora-alpha", type=float, default=DEFAULTS["lora_alpha"])
    parser.add_argument("--calib-samples", type=int, default=DEFAULTS["calib_samples"],
                        help="calibration windows of the activation conversions")
    parser.add_argument("--decoder-steps", type=int, default=None, help="training steps of the decoder (its default if left out)")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "loftq-bench-finetune",
                        help="cache of the decoder and the conversions (kept between runs)")
    parser.add_argument("--json", type=Path, help="write every curve and figure here")
    parser.add_argument("--png", type=Path, help="write the curves here")
    parser.add_argument("--from-json", type=Path, help="only print the table (and --png) of an earlier --json")
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        print_results(results)
        if args.png:
            plot(results, args.png)
        return 0
    if args.eval_every < 1 or args.steps < 1 or args.seeds < 1:
        parser.error("--steps, --seeds and --eval-every must be at least 1")

    import torch
    import transformers
    from transformers import AutoTokenizer, LlamaForCausalLM

    import corpus
    from decoder import leading_bos, mean_loss, packed_windows, token_stream, trained_decoder

    started = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    log(f"workdir: {args.workdir}")
    decoder_kwargs = {} if args.decoder_steps is None else {"steps": args.decoder_steps}
    model_dir = trained_decoder(args.workdir / "decoders", **decoder_kwargs)
    decoder_training = json.loads((model_dir / "training.json").read_text())
    positions = decoder_training["settings"]["shape"]["max_position_embeddings"]
    if args.seq_len > positions:
        parser.error(f"--seq-len {args.seq_len} is above the decoder's {positions} positions")
    data_dir = args.workdir / "corpus"
    calibration = corpus.write_split("calibration", data_dir / "calibration.jsonl")

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    parts = corpus.splits()
    stream = token_stream(tokenizer, parts["finetune"])
    bos = leading_bos(tokenizer)
    heldout = packed_windows(tokenizer, parts["heldout"], args.seq_len, args.eval_windows)
    fp_model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    fp_loss = mean_loss(fp_model, heldout)
    del fp_model
    log(f"[data] finetune {stream.numel():,} tokens; {heldout.shape[0]} held-out windows; full precision held-out "
        f"loss {fp_loss:.4f}")

    conversions, checkpoints = {}, {}
    for method in args.methods:
        checkpoint, figures = convert(method, model_dir, args.workdir / "conversions", calibration, args)
        conversions[method] = figures
        if checkpoint is None:
            log(f"[convert] {method}: SKIPPED: {figures['skipped']}")
            continue
        checkpoints[method] = checkpoint
        if checkpoint != model_dir and not RUN:
            config = json.loads((checkpoint / "loftq_init" / "adapter_config.json").read_text())
            RUN.update(rank=config["r"], lora_alpha=config["lora_alpha"], target_modules=config["target_modules"])
    if "lora-fp" in checkpoints and not RUN:
        RUN.update(rank=args.rank, lora_alpha=args.lora_alpha, target_modules="all-linear")

    prepared = time.perf_counter()
    seeds = list(range(args.seeds))
    runs: dict[str, list[dict]] = {method: [] for method in checkpoints}
    for seed in seeds:  # seeds outermost: an interrupted run still has every method for the first seeds
        for method, checkpoint in checkpoints.items():
            runs[method].append(finetune(method, checkpoint, seed, stream, bos, heldout, args))

    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()},
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("workdir", "json", "png", "from_json")},
                     "seed_list": seeds},
        "methods": args.methods,
        "corpus": corpus.fingerprint(),
        "decoder": {k: v for k, v in decoder_training.items() if k != "curve"} | {"dir": str(model_dir)},
        "reference": {"fp_heldout_loss": fp_loss},
        "conversions": conversions,
        "runs": runs,
        "seconds": time.perf_counter() - started,
        "seconds_finetuning": time.perf_counter() - prepared,
        "seconds_preparing": prepared - started,  # decoder (unless cached), data, conversions (unless cached)
    }
    results["summary"] = summarise(results)
    print_results(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
        print(f"\nresults written to {args.json}")
    if args.png:
        plot(results, args.png)
        print(f"curves written to {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
