"""End to end on one GPU: a Llama-2-7B-shaped bf16 checkpoint, NF4, rank 64, T = 5.

One prepared run that fits a short GPU lease; every figure goes to ``--out`` (JSON) as soon as
it is measured, so a run stopped by its time limit still reports what it did.

In order (the conversion's figures come first, so a run cut short still has them):

1. **Generate** the checkpoint on local disk: random bf16 weights (std 0.02, seeded, drawn on
   the GPU), Llama-2-7B names and shapes (32 blocks, hidden 4096, MLP 11008, vocab 32000),
   5 GB shards like ``save_pretrained``'s default. Not timed as part of the conversion.
2. **I/O floor**: copy the checkpoint's bytes (read every shard, write the same bytes plus the
   adapters' size to the output disk, fsync): the time any converter needs just to read its
   input and write its output.
3. **Convert** it with ``convert_directory`` (NF4, r 64, T 5, randomized SVD, the default
   ``dequantized`` bf16 backbone) and report wall time, the fits' time (sum of per-layer
   seconds), peak GPU memory and peak RSS; the targets are ≤ 90 s and ≤ 1.5 × the I/O floor.
4. **Per layer**: one fit of each 7B shape with the exact SVD (timed once) and with the
   randomized one (best of ``--repeat``), timed with CUDA synchronisation, and the share of
   the exact fit's error reduction kept.
5. **Profile** (optional): the top operators of one 11008×4096 fit.

The checkpoint's pages are evicted from the page cache before steps 2 and 3
(bench/io_floor.py), so both read it from disk; where that is impossible both read warm and
the JSON says so.

    python bench/gpu.py --out gpu.json                       # on the GPU machine
    python bench/gpu.py --preset tiny --device cpu --out t.json   # the same steps in seconds, anywhere
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from loftq.algorithm import fit_layer  # noqa: E402
from loftq.converter import convert_directory  # noqa: E402
from loftq.options import ConvertOptions  # noqa: E402
from loftq.quantizers import get_quantizer  # noqa: E402
from loftq.safetensors_io import ShardWriter  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from io_floor import evict, io_floor  # noqa: E402
from memory import llama_tensors, plan_shards  # noqa: E402

PRESETS = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000},
    "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1000},
}
TARGET_SECONDS = 90.0
TARGET_FLOOR_RATIO = 1.5


class Figures(dict):
    """The results so far, rewritten to disk after every step."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def put(self, key: str, value: object) -> None:
        self[key] = value
        self.path.write_text(json.dumps(self, indent=2) + "\n")
        print(f"{key}: {json.dumps(value)}", flush=True)


def generate(directory: Path, dims: dict, device: torch.device, shard_bytes: int = 5 * 10**9) -> int:
    """Writes the checkpoint one tensor at a time; returns its size in bytes."""
    spec = llama_tensors(dims["num_hidden_layers"], dims)
    shards = plan_shards(spec, shard_bytes, itemsize=2)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_key_value_heads": dims["num_attention_heads"],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
        **dims,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generator = torch.Generator(device=device).manual_seed(0)
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        with ShardWriter(directory / file, [(n, "BF16", s) for n, s in shard], {"format": "pt"}) as writer:
            for name, shape in shard:
                tensor = torch.randn(shape, generator=generator, device=device).mul_(0.02)
                if name.endswith("norm.weight"):
                    tensor = torch.ones(shape, device=device)
                writer.write(name, tensor.to(torch.bfloat16).cpu())
                weight_map[name] = file
            writer.close()
    total = sum(math.prod(s) * 2 for _, s in spec)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_layer(dims: dict, device: torch.device, options: ConvertOptions, repeat: int) -> list[dict]:
    quantizer = get_quantizer("nf4", 4, 64)
    h, m = dims["hidden_size"], dims["intermediate_size"]
    rows = []
    generator = torch.Generator(device=device).manual_seed(1)
    for shape in [(h, h), (m, h), (h, m)]:
        weight = torch.randn(shape, generator=generator, device=device).mul_(0.02).to(torch.bfloat16).float()
        row: dict = {"shape": f"{shape[0]}x{shape[1]}"}
        for svd in ("randomized", "exact"):
            fit_options = options.model_copy(update={"svd": svd})
            if not rows and svd == "randomized":
                fit_layer(weight, quantizer.fake_quantize, fit_options)  # warm-up (kernels, cuSOLVER handles)
            times = []
            for _ in range(repeat if svd == "randomized" else 1):  # the exact fit takes seconds
                synchronize(device)
                started = time.perf_counter()
                fit = fit_layer(weight, quantizer.fake_quantize, fit_options)
                synchronize(device)
                times.append(time.perf_counter() - started)
            row[f"{svd}_seconds"] = min(times)
            row[f"{svd}_error"] = fit.error
            row["error_quant"] = fit.error_quant
        row["speedup"] = row["exact_seconds"] / row["randomized_seconds"]
        reduction = row["error_quant"] - row["exact_error"]
        row["kept"] = (row["error_quant"] - row["randomized_error"]) / reduction if reduction > 0 else float("nan")
        rows.append(row)
        print(row, flush=True)
    return rows


def profile_fit(dims: dict, device: torch.device, options: ConvertOptions) -> str:
    from torch.profiler import ProfilerActivity, profile

    quantizer = get_quantizer("nf4", 4, 64)
    weight = torch.randn(dims["intermediate_size"], dims["hidden_size"], device=device).mul_(0.02)
    fit_layer(weight, quantizer.fake_quantize, options)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fit_layer(weight, quantizer.fake_quantize, options)
        synchronize(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=25)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/loftq-gpu-bench"))
    parser.add_argument("--out", type=Path, default=Path("gpu_bench.json"))
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=2, help="timed repetitions of each per-layer fit (min taken)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["floor", "convert", "layers", "profile"])
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint and output")
    args = parser.parse_args()

    device = torch.device(args.device)
    dims = PRESETS[args.preset]
    options = ConvertOptions(quant="nf4", bits=4, rank=args.rank, lora_alpha=args.rank, iters=args.iters, device=str(device))
    figures = Figures(args.out)
    figures.put("setup", {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "options": options.model_dump(mode="json", include={"quant", "rank", "iters", "svd", "svd_oversample", "svd_power_iters", "backbone_format"}),
    })
    source, output = args.workdir / "source", args.workdir / "output"
    shutil.rmtree(args.workdir, ignore_errors=True)
    started = time.perf_counter()
    size = generate(source, dims, device)
    figures.put("generate", {"seconds": time.perf_counter() - started, "bytes": size, "files": len(list(source.iterdir()))})

    try:
        targets = [(n, s) for n, s in llama_tensors(dims["num_hidden_layers"], dims) if n.endswith("proj.weight")]
        adapter_bytes = sum(args.rank * (s[0] + s[1]) * 4 for _, s in targets)
        if "floor" not in args.skip:
            cold = evict(source)
            floor = io_floor(source, args.workdir / "floor", adapter_bytes)
            figures.put("io_floor", {**floor, "cold_cache": cold})
        if "convert" not in args.skip:
            cold = evict(source)
            started = time.perf_counter()
            stages: dict[str, float] = {}

            def on_progress(event) -> None:  # loftq.report.ProgressEvent: when each stage first began
                stages.setdefault(event.stage, time.perf_counter() - started)

            report = convert_directory(source, output, options, on_progress=on_progress)
            wall = time.perf_counter() - started
            fits = sum(layer.seconds for layer in report.layers)
            result = {
                "wall_seconds": wall,
                "fit_seconds_sum": fits,
                "layers": len(report.layers),
                "seconds_per_layer": fits / len(report.layers),
                "peak_device_mb": report.summary.peak_device_mb,
                "peak_rss_mb": report.summary.peak_rss_mb,
                "mean_error_quant": report.summary.mean_error_quant,
                "mean_error": report.summary.mean_error,
                "output_bytes": sum(p.stat().st_size for p in output.rglob("*") if p.is_file()),
                "cold_cache": cold,
                "stage_started_at": stages,
                "target_seconds": TARGET_SECONDS,
                "meets_seconds": wall <= TARGET_SECONDS,
            }
            if "io_floor" in figures:
                result["floor_ratio"] = wall / figures["io_floor"]["seconds"]
                result["meets_floor_ratio"] = result["floor_ratio"] <= TARGET_FLOOR_RATIO
            figures.put("convert", result)
        if "layers" not in args.skip:
            figures.put("per_layer", per_layer(dims, device, options, args.repeat))
        if "profile" not in args.skip:
            table = profile_fit(dims, device, options)
            (args.out.parent / (args.out.stem + "_profile.txt")).write_text(table)
            print(table, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
