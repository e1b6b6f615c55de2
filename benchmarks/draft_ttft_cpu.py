"""TTFT of GemFilter's self-filter against a draft's selection, interleaved in one process (a shared CPU's load
hits both alike): Qwen2.5-Coder-1.5B's own filter pass (layer 12) and Qwen2.5-Coder-0.5B's (layer 11), then the
1.5B's second pass on the kept tokens, on one needle prompt.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/draft_ttft_cpu.py --length 4096 --rounds 3 \\
        --out benchmarks/results/draft/ttft_cpu_4k.json

Each round times, in turn, the self-filter's selection, the draft's selection and one second pass (the same for
both: the same number of kept tokens); TTFT = selection + second pass. Medians over the rounds, and the median of
the per-round ratios. The 1-minute load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b")
    p.add_argument("--length", type=int, default=4096, help="prompt tokens (default 4096)")
    p.add_argument("--topk", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--haystack", default=None, help="text file (default: PG-19)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if not 256 <= args.length <= 1 << 17 or not 1 <= args.rounds <= 20 or not 1 <= args.topk < args.length:
        raise SystemExit("draft_ttft_cpu.py: --length in [256, 128k], --rounds in [1, 20], --topk in [1, length)")

    from tokensieve import load_model
    from tokensieve.core.draft import DraftModel, check_draft
    from tokensieve.data import read_text
    from tokensieve.engine.runner import encode_prompt
    from tokensieve.evaluation.needle import build_needle_prompt
    from tokensieve.methods import GemFilter
    from tokensieve.methods.base import full_prefill

    model, tok = load_model(args.model)
    dm, dtok = load_model(args.draft)
    draft = DraftModel(dm, dtok, args.draft)
    check_draft(draft, model, tok)
    prompt = build_needle_prompt(tok, read_text(args.haystack, min_chars=args.length * 8), args.length, 0.5)
    ids = encode_prompt(tok, prompt.messages)
    own, drafted = GemFilter(topk=args.topk), GemFilter(topk=args.topk, filter_model=draft)
    load0 = os.getloadavg()[0]
    rounds = []
    with torch.inference_mode():
        for i in range(args.rounds):
            row = {}
            for name, g in (("self", own), ("draft", drafted)):
                t0 = time.perf_counter()
                idx = g.select(model, ids)
                row[f"{name}_select_s"] = time.perf_counter() - t0
                row[f"{name}_kept_needle"] = float(torch.isin(torch.tensor(prompt.needle_span), idx).float().mean())
            t0 = time.perf_counter()
            full_prefill(model, ids[:, idx])
            row["second_pass_s"] = time.perf_counter() - t0
            row["ttft_ratio"] = (row["draft_select_s"] + row["second_pass_s"]) / (
                row["self_select_s"] + row["second_pass_s"]
            )
            row["select_ratio"] = row["draft_select_s"] / row["self_select_s"]
            rounds.append(row)
            print(f"round {i + 1}/{args.rounds}: {json.dumps({k: round(v, 3) for k, v in row.items()})}", flush=True)
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    out = {
        "script": "benchmarks/draft_ttft_cpu.py",
        "argv": sys.argv[1:],
        "model": args.model,
        "draft": args.draft,
        "prompt_tokens": int(ids.shape[1]),
        "topk": args.topk,
        "self_filter_layer": own.resolved_layer(model),
        "draft_filter_layer": drafted.resolved_layer(model),
        "threads": torch.get_num_threads(),
        "loadavg_1m": [load0, os.getloadavg()[0]],
        "rounds": rounds,
        "median": med,
        "self_ttft_s": med["self_select_s"] + med["second_pass_s"],
        "draft_ttft_s": med["draft_select_s"] + med["second_pass_s"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("self_ttft_s", "draft_ttft_s", "median")}, indent=1))


if __name__ == "__main__":
    main()
