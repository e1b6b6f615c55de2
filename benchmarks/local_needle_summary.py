"""Paired answers of GemFilter's local filter pass vs the dense one (CPU, SmolLM2-135M-Instruct, k = 1024, w = 2048).

Two experiments, each printed as each pass's mean score and the paired difference (local - dense) with its 95%
percentile-bootstrap interval (``tokensieve.evaluation.report.bootstrap_interval``):

1. Before the span rule (``dilation=1``, the paper's isolated top-k; the default then), needle task at 4k and 7k,
   17 depths each, two runs per pass whose depths interleave (copies in
   ``benchmarks/results/local_needle_smollm2/``):

       for a in dense local; do
         OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python -m tokensieve.cli eval needle --model smollm2 \\
           --methods gemfilter --param filter_attention=$a --lengths 4k,7k \\
           --depths 0,0.125,0.25,0.375,0.5,0.625,0.75,0.875,1 --out runs/needle_$a
         ... the same with --depths 0.0625,0.1875,...,0.9375 --out runs/needle_${a}2
       done

2. With the span rule (``dilation=31``, the default now), on the confirmation prompts nobody tuned on (the other
   half of the PG-19 books, other needle sentences and questions, another RULER seed; 4k and 7k), with full
   attention's answers to the same prompts (``benchmarks/results/span_selection/smollm2_confirm_{dense,local}_answers.json``):

       OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/span_selection.py --model smollm2 --set confirm \\
         --lengths 4096,7000 --topk 1024 --rules avg5,avg5_d31 --answer-rules avg5_d31 --answers \\
         --param filter_attention=local --out benchmarks/results/span_selection/smollm2_confirm_local_answers.json
       # the same with filter_attention=dense, --skip-full and ..._dense_answers.json (full's answers are in the first)

Then ``PYTHONPATH=src python benchmarks/local_needle_summary.py``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from tokensieve.evaluation.report import bootstrap_interval

RESULTS = Path(__file__).resolve().parent / "results"
BEFORE = RESULTS / "local_needle_smollm2"
SPAN = RESULTS / "span_selection" / "smollm2_confirm_{}_answers.json"
SPAN_RULE = "avg5_d31@1024"  # the default rule at k = 1024 (span_selection's label)


def load_eval(*names: str) -> dict[tuple[int, str], float]:
    """(length in k tokens, prompt) -> score from ``tokensieve eval`` result files in BEFORE."""
    out = {}
    for name in names:
        for line in (BEFORE / f"{name}.jsonl").read_text().splitlines():
            r = json.loads(line)
            out[(round(r["length"] / 1024), json.dumps(r["meta"], sort_keys=True))] = r["score"]
    return out


def load_span(which: str) -> tuple[dict[tuple[int, str], float], dict[tuple[int, str], float]]:
    """(length in k tokens, prompt) -> the span rule's score, and full attention's where the file has it, from a
    span_selection answers file."""
    rows = json.loads(Path(str(SPAN).format(which)).read_text())["rows"]
    rule = {(round(r["n"] / 1024), r["key"]): r["rules"][SPAN_RULE]["score"] for r in rows}
    full = {(round(r["n"] / 1024), r["key"]): r["full"]["score"] for r in rows if "full" in r}
    return rule, full


def paired(name_a: str, a: dict, name_b: str, b: dict) -> list[str]:
    """Lines: per length and overall, both means and the paired difference b - a with its bootstrap interval."""
    keys = sorted(set(a) & set(b))
    lines = []
    for length in sorted({k[0] for k in keys}) + [None]:
        ks = [k for k in keys if length is None or k[0] == length]
        d = [b[k] - a[k] for k in ks]
        lo, hi = bootstrap_interval(d)
        where = "all" if length is None else f"{length}k"
        lines.append(
            f"  {where:>4}, {len(ks)} prompts: {name_a} {statistics.mean(a[k] for k in ks):.3f}  "
            f"{name_b} {statistics.mean(b[k] for k in ks):.3f}  {name_b} - {name_a} {statistics.mean(d):+.3f} "
            f"[95% {lo:+.3f} .. {hi:+.3f}]"
        )
    return lines


def main() -> None:
    print("1. paper's rule (dilation=1), needle 'Dolores Park', 4k/7k:")
    dense, local = load_eval("needle_dense", "needle_dense2"), load_eval("needle_local", "needle_local2")
    print("\n".join(paired("dense", dense, "local", local)))
    if Path(str(SPAN).format("local")).exists() and Path(str(SPAN).format("dense")).exists():
        (dense, _), (local, full) = load_span("dense"), load_span("local")  # full's answers: in the local run's file
        print(f"2. span rule ({SPAN_RULE}), confirmation prompts (needles + RULER), 4k/7k:")
        print("\n".join(paired("dense", dense, "local", local)))
        print("   each pass against full attention:")
        print("\n".join(paired("full", full, "dense", dense)))
        print("\n".join(paired("full", full, "local", local)))


if __name__ == "__main__":
    main()
