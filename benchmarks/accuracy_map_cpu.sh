#!/usr/bin/env bash
# The accuracy map's CPU part (issue 20): SmolLM2 on prompts nobody tuned on — the confirmation half of the
# PG-19 books (3129, 40700, 54537, 860; the span rule was chosen on the other half), RULER seed 7 (tuning
# used 101), a needle sentence and question wording not used in tuning. Two processes of one thread each
# (on this 2-core machine two single-thread processes finished more cells per minute than one of two
# threads); each writes its own resumable results folder, so running the script again resumes both.
#
#   bash benchmarks/accuracy_map_cpu.sh            # then: tokensieve report benchmarks/results/accuracy_map/smollm2_cpu
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/accuracy_map/smollm2_cpu
mkdir -p $OUT
CONFIRM=$(mktemp -d)
for b in 3129 40700 54537 860; do ln -sf "$(realpath ../shared/data/pg19/$b.txt)" "$CONFIRM/$b.txt"; done
export TOKENSIEVE_PG19=$CONFIRM OMP_NUM_THREADS=1 PYTHONPATH=src
TS=".venv/bin/python -m tokensieve.cli eval"
COMMON="--model smollm2 --lengths 2k,4k,7k --no-plots --quiet"
RULER="--tasks niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt --samples ${SAMPLES:-10} --seed 7"
NEEDLE=(--needle "The flight of Professor Alvarez to Lisbon departs at 6:45 from gate B17."
        --question "From which gate does the flight of Professor Alvarez leave?" --expected B17
        --depths 0,0.11,0.22,0.33,0.44,0.56,0.67,0.78,0.89,1)
# process 1: full attention and GemFilter at its defaults, then the paper's rule; process 2: SnapKV, the local pass
( $TS needle $COMMON "${NEEDLE[@]}" --methods full,gemfilter --out $OUT/a
  $TS ruler $COMMON $RULER --methods full,gemfilter --out $OUT/a
  $TS needle $COMMON "${NEEDLE[@]}" --methods gemfilter --param dilation=1 --out $OUT/b
  $TS ruler $COMMON $RULER --methods gemfilter --param dilation=1 --out $OUT/b ) > /tmp/accmap_a.log 2>&1 &
( $TS needle $COMMON "${NEEDLE[@]}" --methods snapkv --out $OUT/c
  $TS ruler $COMMON $RULER --methods snapkv --out $OUT/c
  $TS needle $COMMON "${NEEDLE[@]}" --methods gemfilter --param filter_attention=local --out $OUT/d
  $TS ruler $COMMON $RULER --methods gemfilter --param filter_attention=local --out $OUT/d
  $TS ruler $COMMON $RULER --methods snapkv --param dilation=1 --out $OUT/e ) > /tmp/accmap_c.log 2>&1 &
wait
