"""Paired needle accuracy of GemFilter's local filter pass vs the dense one, through whole answers (CPU).

The runs (SmolLM2-135M-Instruct, k = 1024, w = 2048, 4k and 7k prompts, 17 needle depths each; two runs per pass
whose depths interleave):

    for a in dense local; do
      OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python -m tokensieve.cli eval needle --model smollm2 --methods gemfilter \\
        --param filter_attention=$a --lengths 4k,7k --depths 0,0.125,0.25,0.375,0.5,0.625,0.75,0.875,1 --out runs/needle_$a
      ... the same with --depths 0.0625,0.1875,...,0.9375 --out runs/needle_${a}2
    done

then ``python benchmarks/local_needle_summary.py`` reads the copies in benchmarks/results/local_needle_smollm2/ and
prints each pass's mean score and the paired difference (local - dense) with its 95% interval (normal
approximation over the prompts).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent / "results" / "local_needle_smollm2"


def load(*names: str) -> dict[tuple[int, str], float]:
    out = {}
    for name in names:
        for line in (HERE / f"{name}.jsonl").read_text().splitlines():
            r = json.loads(line)
            out[(r["length"], json.dumps(r["meta"], sort_keys=True))] = r["score"]
    return out


def main() -> None:
    dense, local = load("needle_dense", "needle_dense2"), load("needle_local", "needle_local2")
    keys = sorted(set(dense) & set(local))
    diff = [local[k] - dense[k] for k in keys]
    mean, se = statistics.mean(diff), statistics.stdev(diff) / math.sqrt(len(diff))
    for length in sorted({k[0] for k in keys}):
        ks = [k for k in keys if k[0] == length]
        print(
            f"{length:>6} tokens, {len(ks)} prompts: dense {statistics.mean(dense[k] for k in ks):.3f}  "
            f"local {statistics.mean(local[k] for k in ks):.3f}"
        )
    print(
        f"all {len(keys)} prompts: dense {statistics.mean(dense[k] for k in keys):.3f}  "
        f"local {statistics.mean(local[k] for k in keys):.3f}  local - dense {mean:+.3f} "
        f"(95% interval {mean - 1.96 * se:+.3f} .. {mean + 1.96 * se:+.3f})"
    )


if __name__ == "__main__":
    main()
