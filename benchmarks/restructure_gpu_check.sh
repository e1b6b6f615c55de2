#!/usr/bin/env bash
# Issue 21's GPU check after the restructure, from the repo root in one command:
#   OUT=/some/dir bash benchmarks/restructure_gpu_check.sh
# 1. decode_bench.py --dtype float32 --require-identical (eager vs static tokens for 64 steps, all seven methods,
#    llama3.1-8b shape at 8k: the committed benchmarks/results/gpu/decode_tokens_fp32_h100.json run);
# 2. tokensieve bench --compile at 32k (the committed bench_compiled_32k_h100.json run);
# 3. a comparison with the committed figures (graph step, TTFT, decode step, e2e; ratio new / committed; within 5%?)
#    in $OUT/compare.json. For a same-machine baseline run this script on main's checkout too (the committed
#    figures came from an H100 with torch 2.11).
set -euo pipefail
: "${OUT:?set OUT to a folder for the JSON}"
export PYTHONPATH=src PYTHONUNBUFFERED=1
python3 benchmarks/decode_bench.py --dtype float32 --require-identical --lengths 8192 --tokens 65 --check-steps 64 \
  --no-hf --out "$OUT/decode_tokens_fp32.json"
python3 -m tokensieve.cli bench --compile --lengths 32k --repeats 1 --decode-tokens 64 --answer-tokens 256 \
  --methods full,gemfilter,snapkv,streamingllm,h2o,lazyllm --out "$OUT/bench_compiled_32k.json"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
pairs = [("decode_tokens_fp32.json", "decode_tokens_fp32_h100.json", ("method", "length"),
          ("graph_step_median_s", "ttft_s")),
         ("bench_compiled_32k.json", "bench_compiled_32k_h100.json", ("label", "length"),
          ("ttft_s", "decode_step_median_s", "e2e_s"))]
report = []
for new, old, key, fields in pairs:
    a = {tuple(r[k] for k in key): r for r in json.load(open(f"{out}/{new}"))["rows"]}
    b = {tuple(r[k] for k in key): r for r in json.load(open(f"benchmarks/results/gpu/{old}"))["rows"]}
    for k in sorted(set(a) & set(b)):
        for f in fields:
            if a[k].get(f) and b[k].get(f):
                ratio = a[k][f] / b[k][f]
                report.append({"file": new, "row": list(k), "field": f, "new": a[k][f], "committed": b[k][f],
                               "ratio": ratio, "within_5pct": abs(ratio - 1) <= 0.05})
json.dump(report, open(f"{out}/compare.json", "w"), indent=1)
for r in report:
    print(f"{r['file']:28} {str(r['row']):28} {r['field']:22} {r['ratio']:.3f} {'ok' if r['within_5pct'] else 'OUT'}")
PY
