"""Peak-memory benchmark: does converting a checkpoint really stream tensor by tensor?

For each size, a random fp32 Llama-shaped checkpoint is written to disk (one shard in
memory at a time), then converted with the default options in a fresh subprocess, so each
conversion's peak RSS is its own. The claim holds when peak RSS minus the child's baseline
(after all imports) stays under 1 GiB and does not grow with the model.

    python bench/memory.py [--sizes-gb 2 4] [--shard-mb 256] [--workdir DIR] [--keep]

``--calibrated`` measures a calibrated conversion instead (objective activation with
evaluation, on BPE-tokenised calibration text; the checkpoint gets the tokenizer files). It
holds one block's fp32 weights (or the outer part: embeddings, final norm and head) plus the
calibration activations, so the claim is a bound built from those sizes (see ``calibrated_bound``):

    python bench/memory.py --calibrated [--sizes-gb 1] [--calib-samples 16] [--calib-seq-len 128]

Sizes are in GiB (2**30 bytes), memory in MiB (2**20 bytes). Exit code 0 on PASS, 1 on FAIL.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

LIMIT_MB = 1024
MAX_GROWTH = 1.25
DEFAULT_DATA = ROOT / "tests" / "data" / "calibration.txt"
# Calibrated mode's bound: (largest of one block's / the outer part's fp32 weights) × WEIGHT_FACTOR
# + activations × ACTIVATION_FACTOR + SLACK_MB (reasoning in bench/README.md).
WEIGHT_FACTOR = 3
ACTIVATION_FACTOR = 4
SLACK_MB = 300
DIMS = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32000}

Spec = list[tuple[str, tuple[int, ...]]]


# --------------------------------------------------------------------------- checkpoint


def llama_tensors(layers: int, dims: dict = DIMS) -> Spec:
    """LlamaForCausalLM's parameters, in state_dict (and so save_pretrained) order."""
    h, i, v = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"]
    spec: Spec = [("model.embed_tokens.weight", (v, h))]
    for n in range(layers):
        p = f"model.layers.{n}"
        spec += [(f"{p}.self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        spec += [(f"{p}.mlp.gate_proj.weight", (i, h)), (f"{p}.mlp.up_proj.weight", (i, h))]
        spec += [(f"{p}.mlp.down_proj.weight", (h, i))]
        spec += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,))]
    return spec + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def llama_config(layers: int) -> dict:
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=layers, **DIMS).to_dict()
    # transformers >= 5 reads "dtype"; older versions and other tools read "torch_dtype".
    return {**config, "architectures": ["LlamaForCausalLM"], "torch_dtype": "float32", "dtype": "float32"}


def check_against_transformers(config: dict, spec: Spec) -> None:
    """Fail loudly if the hand-written names/shapes drift from the real architecture."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    real = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if real != dict(spec):
        raise SystemExit(f"benchmark spec drifted from LlamaForCausalLM: {sorted(set(real) ^ dict(spec).keys())[:5]}")


def layers_for(size_bytes: float) -> int:
    """Fewest layers whose fp32 parameters reach ``size_bytes``."""
    fixed = sum(math.prod(s) for _, s in llama_tensors(0))
    per_layer = sum(math.prod(s) for _, s in llama_tensors(1)) - fixed
    return max(1, math.ceil((size_bytes / 4 - fixed) / per_layer))


def plan_shards(spec: Spec, shard_bytes: int, itemsize: int = 4) -> list[Spec]:
    """Greedy grouping in order; a tensor bigger than the limit gets a shard of its own."""
    shards: list[Spec] = [[]]
    used = 0
    for name, shape in spec:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    return shards


def write_checkpoint(directory: Path, size_gb: float, shard_mb: int, seed: int = 0, *, layers: int | None = None) -> tuple[int, int]:
    """Random fp32 Llama checkpoint of ``size_gb`` (or of ``layers`` decoder blocks); only one
    shard's tensors are ever in memory.

    Returns (layers, shards).
    """
    import torch
    from safetensors.torch import save_file

    layers = layers if layers is not None else layers_for(size_gb * 2**30)
    spec = llama_tensors(layers)
    config = llama_config(layers)
    check_against_transformers(config, spec)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generator = torch.Generator().manual_seed(seed)
    shards = plan_shards(spec, shard_mb * 2**20)
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: torch.randn(shape, generator=generator).mul_(0.02) for name, shape in shard}
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        del tensors
        weight_map.update((name, file) for name, _ in shard)
    total = sum(math.prod(s) * 4 for _, s in spec)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return layers, len(shards)


# --------------------------------------------------------------------------- child


def dir_bytes(directory: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def child(source: str, output: str, calibrated: str | None = None) -> None:
    """One conversion, measured against this process's RSS after every import is done.

    ``calibrated``: JSON of ``{"options": CalibrationOptions fields, "data": path}`` for a
    calibrated conversion (objective activation); None for the default conversion."""
    import resource
    import threading
    import time

    import psutil
    import torch
    import transformers

    from loftq.converter import convert_directory
    from loftq.options import CalibrationOptions, ConvertOptions
    from loftq.report import ProgressEvent

    # Llama's modelling module is imported lazily; build a tiny one so it is in the baseline.
    tiny = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=4, vocab_size=128)
    with torch.device("meta"):
        transformers.LlamaForCausalLM(tiny)
    options = ConvertOptions(device="cpu")
    kwargs: dict = {}
    if calibrated is not None:
        spec = json.loads(calibrated)
        options = ConvertOptions(device="cpu", objective="activation", calibration=CalibrationOptions(**spec["options"]))
        kwargs["calibration_data"] = spec["data"]
        # What the calibrated path imports besides (tokenizers, accelerate's empty-weights
        # context, the engine's calibration modules), so that the baseline holds it too.
        import accelerate  # noqa: F401
        from transformers import (
            AutoTokenizer,  # noqa: F401
            PreTrainedTokenizerFast,  # noqa: F401
        )

        import loftq.calibrated  # noqa: F401

    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.02):
            peak = max(peak, process.memory_info().rss)

    marks: dict[str, float] = {}

    def on_progress(event: ProgressEvent) -> None:
        now = time.perf_counter() - started
        rss = process.memory_info().rss / 2**20
        if event.stage == "shard":
            marks.setdefault("first_shard", now)
            print(f"  shard {event.shards_done}/{event.shards_total}  layers {event.layers_done}/{event.layers_total}"
                  f"  rss {rss:.0f} MB  peak so far {peak / 2**20:.0f} MB  {now:.0f} s", file=sys.stderr, flush=True)
        elif event.stage == "calibration" and event.layer is None:
            marks[f"block_{event.blocks_done}"] = now
            print(f"  calibration: blocks {event.blocks_done}/{event.blocks_total}  rss {rss:.0f} MB"
                  f"  peak so far {peak / 2**20:.0f} MB  {now:.0f} s", file=sys.stderr, flush=True)
        elif event.stage in ("start", "finalize", "done"):
            marks[event.stage] = now

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    report = convert_directory(source, output, options, on_progress=on_progress, **kwargs)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    peak = max(peak, process.memory_info().rss)

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    bytes_in, bytes_out = dir_bytes(source), dir_bytes(output)
    mb = 2**20
    # ru_maxrss is the kernel's exact high-water mark; the sampler can miss spikes under 20 ms.
    top = max(peak, maxrss)
    print(json.dumps({
        "baseline_mb": baseline / mb,
        "peak_mb": top / mb,
        "sampled_peak_mb": peak / mb,
        "peak_minus_baseline_mb": (top - baseline) / mb,
        "ru_maxrss_mb": maxrss / mb,
        "seconds": seconds,
        "layers": report.summary.layers,
        "mean_error_quant": report.summary.mean_error_quant,
        "mean_error": report.summary.mean_error,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "mb_per_s": bytes_in / mb / seconds,
        "marks_s": marks,
        "evaluation": None if report.summary.evaluation is None else vars(report.summary.evaluation),
        "calibration": None if report.calibration is None else vars(report.calibration),
        "warnings": report.warnings,
    }))


# --------------------------------------------------------------------------- parent


def measure(source: Path, output: Path, calibrated: dict | None = None) -> dict:
    """Run ``child`` in a fresh interpreter and parse its JSON line."""
    extra = [] if calibrated is None else ["--child-calibrated", json.dumps(calibrated)]
    result = subprocess.run([sys.executable, __file__, "--child", str(source), str(output), *extra],
                            stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- calibrated mode


def add_tokenizer(directory: Path, data: Path) -> int:
    """Train the byte-level BPE tokenizer of bench/calibration.py on ``data`` and save it into the
    checkpoint (calibration tokenises with the checkpoint's own tokenizer). Returns its size."""
    spec = importlib.util.spec_from_file_location("bench_calibration", ROOT / "bench" / "calibration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build_tokenizer(data, directory)
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(str(directory), local_files_only=True))
    if size > DIMS["vocab_size"]:
        raise SystemExit(f"the tokenizer has {size} entries, more than the checkpoint's vocab_size {DIMS['vocab_size']}")
    return size


def calibrated_bound(layers: int, samples: int, seq_len: int, eval_samples: int) -> dict:
    """The figures the calibrated peak is compared with, in MiB.

    Activations are fp32 hidden states, samples × seq_len × hidden × 4 bytes per stream. The
    calibration set is held as up to 2 streams at once (a block's inputs and its outputs); the
    held-out set as up to 4 (the full-precision, plainly quantized and initialised states, plus
    one of them as it is replaced by the block's output).
    """
    mb = 2**20
    hidden = DIMS["hidden_size"]
    outer = sum(math.prod(s) for _, s in llama_tensors(0)) * 4
    block = sum(math.prod(s) for _, s in llama_tensors(1)) * 4 - outer
    per_sequence = seq_len * hidden * 4
    calibration_streams, held_out_streams = 2, 4 if eval_samples else 0
    activations = per_sequence * (samples * calibration_streams + eval_samples * held_out_streams)
    largest = max(block, outer)
    bound = largest * WEIGHT_FACTOR + activations * ACTIVATION_FACTOR + SLACK_MB * mb
    return {
        "block_weights_mb": block / mb,
        "outer_weights_mb": outer / mb,
        "stream_mb": samples * per_sequence / mb,
        "held_out_stream_mb": eval_samples * per_sequence / mb,
        "calibration_streams": calibration_streams,
        "held_out_streams": held_out_streams,
        "activations_mb": activations / mb,
        "bound_mb": bound / mb,
        "layers": layers,
    }


def run_calibrated(args: argparse.Namespace, workdir: Path) -> int:
    calibration = {"samples": args.calib_samples, "seq_len": args.calib_seq_len, "eval_samples": args.calib_eval_samples,
                   "batch_size": args.calib_batch_size, "evaluate": args.calib_eval_samples > 0}
    spec = {"options": calibration, "data": str(args.data)}
    rows = []
    for size in sorted(args.sizes_gb):
        source, output = workdir / f"llama-{size:g}gb", workdir / f"llama-{size:g}gb-loftq"
        print(f"[{size:g} GB] writing checkpoint ...", flush=True)
        layers, shards = write_checkpoint(source, size, args.shard_mb)
        vocab = add_tokenizer(source, args.data)
        print(f"[{size:g} GB] {layers} decoder layers, {shards} shards, BPE tokenizer of {vocab} entries; "
              f"calibrated conversion ({json.dumps(calibration)}) ...", flush=True)
        row = {"size_gb": size, "shards": shards, "decoder_layers": layers,
               **calibrated_bound(layers, args.calib_samples, args.calib_seq_len, args.calib_eval_samples),
               **measure(source, output, spec)}
        print(f"[{size:g} GB] {json.dumps(row)}", flush=True)
        rows.append(row)
        if not args.keep:
            shutil.rmtree(source)
            shutil.rmtree(output)

    ok = True
    for r in rows:
        print()
        cal = r["calibration"] or {}
        print(f"{r['size_gb']:g} GB: {r['decoder_layers']} blocks, {r['shards']} shards, {r['layers']} LoRA layers; "
              f"{cal.get('sequences')} calibration sequences × {cal.get('seq_len')} tokens "
              f"(+ {args.calib_eval_samples} held out), objective activation, propagation {cal.get('propagation')}")
        print(f"  one block's fp32 weights            {r['block_weights_mb']:9.1f} MB")
        print(f"  outer part (embeddings, norm, head) {r['outer_weights_mb']:9.1f} MB")
        print(f"  calibration activations             {r['activations_mb']:9.1f} MB  "
              f"({r['stream_mb']:.1f} MB per stream × {r['calibration_streams']}"
              f" + held out {r['held_out_stream_mb']:.1f} MB × {r['held_out_streams']})")
        print(f"  bound: max(block, outer) × {WEIGHT_FACTOR} + activations × {ACTIVATION_FACTOR} + {SLACK_MB}"
              f" = {r['bound_mb']:9.1f} MB")
        print(f"  baseline {r['baseline_mb']:.0f} MB, peak {r['peak_mb']:.0f} MB, "
              f"measured peak − baseline           {r['peak_minus_baseline_mb']:9.1f} MB")
        marks = r["marks_s"]
        blocks = r["decoder_layers"]
        print(f"  time {r['seconds']:.0f} s: tokenise+capture {marks['block_0'] - marks['start']:.0f} s, "
              f"blocks {marks[f'block_{blocks}'] - marks['block_0']:.0f} s, "
              f"head+shards {marks['finalize'] - marks[f'block_{blocks}']:.0f} s, finalize {marks['done'] - marks['finalize']:.0f} s")
        for warning in r["warnings"]:
            print(f"  engine warning: {warning}")
        passed = r["peak_minus_baseline_mb"] < r["bound_mb"]
        ok = ok and passed
        print(f"  {'PASS' if passed else 'FAIL'}: peak − baseline {r['peak_minus_baseline_mb']:.0f} MB "
              f"{'<' if passed else '>='} bound {r['bound_mb']:.0f} MB")
    if args.keep:
        print(f"data kept in {workdir}")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-gb", type=float, nargs="+", help="model sizes in GiB of fp32 weights (default: 2 4; "
                        "calibrated: 1)")
    parser.add_argument("--shard-mb", type=int, default=256, help="largest shard in MiB")
    parser.add_argument("--workdir", type=Path, help="where to write checkpoints (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints and outputs")
    parser.add_argument("--calibrated", action="store_true",
                        help="measure a calibrated conversion (objective activation, evaluate) against its bound")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="calibrated: calibration text (.txt/.jsonl)")
    parser.add_argument("--calib-samples", type=int, default=16, help="calibrated: calibration sequences")
    parser.add_argument("--calib-seq-len", type=int, default=128, help="calibrated: tokens per sequence")
    parser.add_argument("--calib-eval-samples", type=int, default=4, help="calibrated: held-out sequences (0: no evaluate)")
    parser.add_argument("--calib-batch-size", type=int, default=8, help="calibrated: sequences per forward pass")
    parser.add_argument("--child", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--child-calibrated", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, calibrated=args.child_calibrated)
        return 0
    if args.sizes_gb is None:
        args.sizes_gb = [1] if args.calibrated else [2, 4]

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="loftq-bench-memory-"))
    print(f"workdir: {workdir}", flush=True)
    if args.calibrated:
        try:
            return run_calibrated(args, workdir)
        finally:
            if not args.keep and args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    try:
        for size in sorted(args.sizes_gb):
            source, output = workdir / f"llama-{size:g}gb", workdir / f"llama-{size:g}gb-loftq"
            print(f"[{size:g} GB] writing checkpoint ...", flush=True)
            layers, shards = write_checkpoint(source, size, args.shard_mb)
            print(f"[{size:g} GB] {layers} decoder layers, {shards} shards; converting ...", flush=True)
            row = {"size_gb": size, "shards": shards, "decoder_layers": layers, **measure(source, output)}
            print(f"[{size:g} GB] {json.dumps(row)}", flush=True)
            rows.append(row)
            if not args.keep:
                shutil.rmtree(source)
                shutil.rmtree(output)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"{'size GB':>8} {'shards':>6} {'blocks':>6} {'layers':>6} {'seconds':>8} {'MB/s':>6} {'baseline MB':>11} "
          f"{'peak MB':>8} {'peak-base MB':>12} {'err quant':>9} {'err LoftQ':>9}")
    for r in rows:
        print(f"{r['size_gb']:>8g} {r['shards']:>6} {r['decoder_layers']:>6} {r['layers']:>6} {r['seconds']:>8.1f} {r['mb_per_s']:>6.1f} "
              f"{r['baseline_mb']:>11.0f} {r['peak_mb']:>8.0f} {r['peak_minus_baseline_mb']:>12.0f} "
              f"{r['mean_error_quant']:>9.4f} {r['mean_error']:>9.4f}")
    growth = rows[-1]["peak_minus_baseline_mb"] / rows[0]["peak_minus_baseline_mb"]
    print(f"growth of peak-baseline, {rows[-1]['size_gb']:g} GB vs {rows[0]['size_gb']:g} GB: {growth:.3f}")
    ok = all(r["peak_minus_baseline_mb"] < LIMIT_MB for r in rows) and growth < MAX_GROWTH
    print(f"{'PASS' if ok else 'FAIL'}: peak-baseline < {LIMIT_MB} MB at every size and growth < {MAX_GROWTH}")
    if args.keep:
        print(f"data kept in {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
