"""Stacked bars of end-to-end latency per method (TTFT + decoding) from ``tokensieve bench`` JSON files.

``PYTHONPATH=src python3 benchmarks/e2e_bars.py benchmarks/results/gpu/bench_compiled_32k_h100.json
benchmarks/results/gpu/bench_compiled_128k_h100.json benchmarks/results/gpu/bench_compiled_128k_h2o_lazyllm_h100.json
--out benchmarks/results/gpu/bench_compiled_e2e_h100.png``
"""

from __future__ import annotations

import argparse
import json

from tokensieve.evaluation.plots import e2e_bars


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", help="tokensieve bench --out JSON files (rows merged)")
    ap.add_argument("--out", required=True, help="PNG path")
    args = ap.parse_args()
    results = []
    for path in args.results:
        with open(path) as f:
            results.append(json.load(f))
    print(f"wrote {e2e_bars(results, args.out)}")


if __name__ == "__main__":
    main()
