#!/usr/bin/env bash
# Selection by a draft model on the CPU (issue 25): Qwen2.5-Coder-1.5B answering on the tokens chosen by
# Qwen2.5-Coder-0.5B (its known filter layer 11) against its own GemFilter (layer 12) and full attention, on the
# same prompts, TTFT in the same run. Paired results: benchmarks/accuracy_map_table.py-style pairing by key.
#
#   bash benchmarks/draft_cpu.sh                      # the committed small sample: needle 4k, 2 depths
#   TASK=ruler SAMPLES=10 LENGTHS=4k,8k bash benchmarks/draft_cpu.sh   # a full run (hours on a CPU)
#   TASK=multiturn SAMPLES=10 TURNS=3 bash benchmarks/draft_cpu.sh     # conversations through the prefix cache
#   PARALLEL=1 ...                     # the draft and own runs at once, one thread each (a 2-core machine)
#
# Writes benchmarks/results/draft/qwen15_cpu/{draft,own}/<task>.jsonl ("draft": gemfilter with
# --filter-model qwen2.5-coder-0.5b; "own": full and gemfilter). Resumable: a rerun skips the rows already there.
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=${TASK:-needle}
LENGTHS=${LENGTHS:-4k}
OUTDIR=${OUTDIR:-benchmarks/results/draft/qwen15_cpu}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH=src
if [ "$TASK" = needle ]; then
  SEL="--depths ${DEPTHS:-0.3,0.7}"
elif [ "$TASK" = multiturn ]; then
  SEL="--turns ${TURNS:-3} --samples ${SAMPLES:-5}"
else
  SEL="--tasks ${RULER_TASKS:-niah_single,niah_multikey,niah_multivalue,vt} --samples ${SAMPLES:-5} --seed 7"
fi
TS="$PY -m tokensieve.cli eval $TASK --model qwen2.5-coder-1.5b --lengths $LENGTHS $SEL --no-plots --quiet"
if [ -n "${PARALLEL:-}" ]; then
  $TS --methods gemfilter --filter-model qwen2.5-coder-0.5b --out "$OUTDIR/draft" &
  $TS --methods full,gemfilter --out "$OUTDIR/own" &
  wait -n && wait -n
else
  $TS --methods gemfilter --filter-model qwen2.5-coder-0.5b --out "$OUTDIR/draft"
  $TS --methods full,gemfilter --out "$OUTDIR/own"
fi
