"""Per-layer speed: our default LoftQ fit against the reference algorithm, side by side.

The reference is the paper's algorithm as the reference implementations run it: T times,
quantize W − L·R, then a full ``torch.linalg.svd`` (fp32) of the residual truncated to rank r.
Both sides use the same NF4 quantizer (bitsandbytes-exact), so the ratio measures the
algorithm, not the quantizer. Our side is ``loftq.algorithm.fit_layer`` with the default
options (randomized SVD, best iterate kept), without the exact-reload step (fp32 storage
reloads Q unchanged).

For each layer shape, rank and T the script prints both times, the speed-up, each side's
relative error ‖W − (Q + s·B·A)‖/‖W‖ and the share of the reference's error reduction
(err_quant − err) that ours keeps. The weights are random Gaussian matrices scaled like a
trained layer (std 0.02), seeded.

    python bench/layer_speed.py                          # Llama-2-7B shapes, r 16/64, T 1/5
    python bench/layer_speed.py --shapes 4096x4096 --ranks 16 --iters 1 --repeat 1
    python bench/layer_speed.py --json out.json

A full SVD does not depend on r, so at T = 1 the reference's SVD is timed once per shape and
shared by the ranks (its truncation is free); at T > 1 the iterates differ per rank and every
SVD is timed. Exit code 0 when every row meets the targets (≥ 5× faster, ≥ 99.5 % kept).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from loftq.algorithm import fit_layer, relative_error  # noqa: E402
from loftq.options import ConvertOptions  # noqa: E402
from loftq.quantizers import get_quantizer  # noqa: E402

SPEEDUP_TARGET = 5.0
KEPT_TARGET = 0.995
LLAMA2_7B = ["4096x4096", "11008x4096", "4096x11008"]


def reference_loftq(weight: torch.Tensor, fake_quantize, rank: int, iters: int, svd_cache: dict | None = None) -> tuple[torch.Tensor, float]:
    """The reference loop; returns (Q + L·R, seconds spent in SVDs and quantization)."""
    started = time.perf_counter()
    low_rank = torch.zeros_like(weight)
    for step in range(iters):
        q = fake_quantize(weight - low_rank)
        if step == 0 and svd_cache is not None and "svd" in svd_cache:
            u, s, vh = svd_cache["svd"]
        else:
            u, s, vh = torch.linalg.svd(weight - q, full_matrices=False)
            if step == 0 and svd_cache is not None:
                svd_cache["svd"] = (u, s, vh)
                svd_cache["svd_seconds"] = time.perf_counter() - started
        low_rank = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return q + low_rank, time.perf_counter() - started


def measure(shape: str, rank: int, iters: int, repeat: int, svd_cache: dict) -> dict:
    rows, cols = map(int, shape.split("x"))
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * 31 + cols)) * 0.02
    quantizer = get_quantizer("nf4", 4)
    error_quant = relative_error(weight, quantizer.fake_quantize(weight))

    if iters == 1 and "svd" in svd_cache:  # same full SVD as an earlier rank: count its time
        approx, seconds = reference_loftq(weight, quantizer.fake_quantize, rank, iters, svd_cache)
        reference_seconds = seconds + svd_cache["svd_seconds"]
    else:
        approx, reference_seconds = reference_loftq(weight, quantizer.fake_quantize, rank, iters, svd_cache if iters == 1 else None)
    reference_error = relative_error(weight, approx)
    del approx

    options = ConvertOptions(rank=rank, iters=iters)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fit = fit_layer(weight, quantizer.fake_quantize, options)
        times.append(time.perf_counter() - started)
    ours_seconds = statistics.median(times)
    kept = (error_quant - fit.error) / (error_quant - reference_error)
    return {
        "shape": shape,
        "rank": rank,
        "iters": iters,
        "reference_s": reference_seconds,
        "ours_s": ours_seconds,
        "speedup": reference_seconds / ours_seconds,
        "error_quant": error_quant,
        "reference_error": reference_error,
        "ours_error": fit.error,
        "kept": kept,
        "pass": reference_seconds / ours_seconds >= SPEEDUP_TARGET and kept >= KEPT_TARGET,
    }


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=LLAMA2_7B, help="out×in, e.g. 4096x11008")
    parser.add_argument("--ranks", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--iters", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--repeat", type=int, default=3, help="runs of our fit (the median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    # Other processes on the machine distort both sides' timings (the reference more: LAPACK's
    # SVD waits at barriers for a descheduled thread), so the load goes with the numbers.
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, NF4, fp32 weights, std 0.02, load average {_load()}")
    header = f"{'shape':>11} {'r':>3} {'T':>2} {'reference s':>12} {'ours s':>8} {'speed-up':>9} {'err quant':>10} {'err ref':>9} {'err ours':>9} {'kept':>7}"
    print(header)
    results = []
    for shape in args.shapes:
        svd_cache: dict = {}
        for iters in args.iters:
            for rank in args.ranks:
                row = measure(shape, rank, iters, args.repeat, svd_cache)
                results.append(row)
                print(
                    f"{shape:>11} {rank:>3} {iters:>2} {row['reference_s']:>12.2f} {row['ours_s']:>8.3f} {row['speedup']:>8.1f}× "
                    f"{row['error_quant']:>10.5f} {row['reference_error']:>9.5f} {row['ours_error']:>9.5f} {100 * row['kept']:>6.2f}%"
                    + ("" if row["pass"] else "  MISS"),
                    flush=True,
                )
    speedups = [r["speedup"] for r in results]
    kept = [r["kept"] for r in results]
    print(f"speed-up: min {min(speedups):.1f}×, geometric mean {statistics.geometric_mean(speedups):.1f}×; error reduction kept: min {100 * min(kept):.2f}%")
    ok = all(r["pass"] for r in results)
    print(f"targets (≥ {SPEEDUP_TARGET:.0f}× faster, ≥ {100 * KEPT_TARGET:.1f}% kept): {'PASS' if ok else 'FAIL'}; load average {_load()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
