#!/bin/sh
# End-to-end check of the evaluation pipeline on the embedded SmolLM2-135M-Instruct (CPU, 1 thread).
# Not a benchmark of the methods: 2 samples per RULER subtask at 1k tokens only.
# Command (from the repository root):
#   PYTHONPATH=src OMP_NUM_THREADS=1 python -m tokensieve.cli eval ruler --methods full,gemfilter --lengths 1k --samples 2 --out benchmarks/results/eval_smoke
#   PYTHONPATH=src python -m tokensieve.cli report benchmarks/results/eval_smoke --out benchmarks/results/eval_smoke/report.md
set -e
export PYTHONPATH=src OMP_NUM_THREADS=1
python -m tokensieve.cli eval ruler --methods full,gemfilter --lengths 1k --samples 2 --out benchmarks/results/eval_smoke
python -m tokensieve.cli report benchmarks/results/eval_smoke --out benchmarks/results/eval_smoke/report.md
