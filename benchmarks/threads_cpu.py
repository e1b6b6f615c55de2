"""torch threads on a small CPU machine: TTFT (prefill + first token) of SmolLM2 with 1 thread vs 2 and more.

    PYTHONPATH=src .venv/bin/python benchmarks/threads_cpu.py --out benchmarks/results/threads_cpu/run1.json

One process loads the embedded SmolLM2 once and answers prompts cut from the shipped PG-19 book (full attention,
one new token) at each length, ``--repeats`` times, switching ``torch.set_num_threads`` between the thread counts
in an order that alternates from repeat to repeat (after one untimed warm-up per length). It writes every TTFT, the
median per (threads, length), the machine's core count and the 1-minute load average before and after: on a
machine shared with other jobs the result depends on that load, which is the point of measuring it there. The
default thread count of the CLI (``tokensieve.commands.common.default_threads``) was chosen from this run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,4096", help="prompt lengths in tokens (default 2048,4096)")
    ap.add_argument("--threads", default="1,2", help="thread counts to compare (default 1,2)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per (threads, length) (default 5)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    a = ap.parse_args(argv)
    if not 1 <= a.repeats <= 100:
        ap.error(f"--repeats must be in 1..100, got {a.repeats}")
    lengths = [int(x) for x in a.lengths.split(",")]
    threads = [int(x) for x in a.threads.split(",")]
    if any(t < 1 for t in threads) or any(n < 64 for n in lengths):
        ap.error("thread counts must be >= 1 and lengths >= 64")

    import torch

    import tokensieve
    from tokensieve.data import shipped_text

    load_before = os.getloadavg()[0]
    model, tok = tokensieve.load_model(a.model)
    ids = tok(shipped_text(), return_tensors="pt").input_ids[0]
    times: dict[str, list[float]] = {f"{t}@{n}": [] for t in threads for n in lengths}

    def ttft(n: int) -> float:
        return tokensieve.generate(model, tok, ids[None, :n], method="full", max_new_tokens=1).ttft_s

    for n in lengths:  # warm-up
        ttft(n)
    for r in range(a.repeats):
        order = threads if r % 2 == 0 else threads[::-1]
        for t in order:
            torch.set_num_threads(t)
            for n in lengths:
                times[f"{t}@{n}"].append(ttft(n))
                print(f"repeat {r + 1}/{a.repeats} threads {t} length {n}: {times[f'{t}@{n}'][-1]:.2f} s", flush=True)
    rows = [
        {"threads": t, "length": n, "median_ttft_s": statistics.median(times[f"{t}@{n}"]), "ttft_s": times[f"{t}@{n}"]}
        for t in threads
        for n in lengths
    ]
    out = {
        "command": "PYTHONPATH=src python " + " ".join(sys.argv),
        "model": a.model,
        "cpu_count": os.cpu_count(),
        "load_1min_before": load_before,
        "load_1min_after": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    for row in rows:
        print(f"threads {row['threads']} length {row['length']}: median TTFT {row['median_ttft_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
