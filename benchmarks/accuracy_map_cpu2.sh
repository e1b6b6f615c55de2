#!/usr/bin/env bash
# The accuracy map's second CPU part (issue 20): SnapKV's span rule on SmolLM2 (the paper's isolated top-k,
# dilation=1, beside the default run of accuracy_map_cpu.sh), and Qwen2.5-Coder-0.5B at 4k (full attention,
# GemFilter at its defaults and with the paper's rule) on the same confirmation prompts. One thread each.
#
#   bash benchmarks/accuracy_map_cpu2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
A=benchmarks/results/accuracy_map
mkdir -p $A/smollm2_cpu $A/qwen05_cpu
CONFIRM=$(mktemp -d)
for b in 3129 40700 54537 860; do ln -sf "$(realpath ../shared/data/pg19/$b.txt)" "$CONFIRM/$b.txt"; done
export TOKENSIEVE_PG19=$CONFIRM OMP_NUM_THREADS=1 PYTHONPATH=src
TS=".venv/bin/python -m tokensieve.cli eval"
RULER="--tasks niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt --seed 7 --no-plots --quiet"
$TS ruler --model smollm2 --lengths 2k,4k $RULER --samples 10 --methods snapkv --param dilation=1 --out $A/smollm2_cpu/e > /tmp/accmap_e.log 2>&1 &
( $TS ruler --model qwen2.5-coder-0.5b --lengths 4k $RULER --samples ${QSAMPLES:-5} --methods full,gemfilter --out $A/qwen05_cpu/a
  $TS ruler --model qwen2.5-coder-0.5b --lengths 4k $RULER --samples ${QSAMPLES:-5} --methods gemfilter --param dilation=1 --out $A/qwen05_cpu/b ) > /tmp/accmap_q.log 2>&1 &
wait
