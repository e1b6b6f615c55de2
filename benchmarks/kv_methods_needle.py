"""KV-eviction methods vs full attention on SmolLM2 needle prompts (CPU).

Command (from the repository root):

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/kv_methods_needle.py \
        --length 1500 --depths 0.1,0.5,0.9 --out benchmarks/results/kv_methods_needle.json

Each method answers the same needle prompts (tokensieve.evaluation.needle,
PG-19 haystack); we record whether the answer contains the needle's phrases,
TTFT, peak memory growth (CPU RSS), and KV entries per layer after prefill.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

import tokensieve
from tokensieve.data import read_text
from tokensieve.evaluation.needle import build_needle_prompt, score_answer

METHODS = [
    ("full", {}),
    ("snapkv", {"budget": 512}),
    ("h2o", {"budget": 512}),
    ("streamingllm", {"budget": 512}),
    ("sepllm", {"window": 256}),
    ("snapkv", {"budget": 256}),
    ("h2o", {"budget": 256}),
    ("streamingllm", {"budget": 256}),
    ("sepllm", {"window": 128}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=1500)
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--out", default="benchmarks/results/kv_methods_needle.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = tokensieve.load_model("smollm2", device="cpu", dtype=torch.float32)
    hay = read_text(min_chars=args.length * 8)
    depths = [float(d) for d in args.depths.split(",")]
    prompts = [build_needle_prompt(tok, hay, args.length, d) for d in depths]
    rows = []
    for name, params in METHODS:
        for p in prompts:
            res = tokensieve.generate(model, tok, p.messages, method=name, max_new_tokens=args.max_new_tokens, **params)
            rows.append(
                dict(
                    method=name,
                    params=res.params,
                    depth=p.depth,
                    prompt_tokens=res.prompt_tokens,
                    score=score_answer(res.text),
                    answer=res.text,
                    ttft_s=round(res.ttft_s, 3),
                    peak_memory_mb=round(res.peak_memory_bytes / 2**20, 1),
                    kv_tokens_prefill=res.kv_tokens_prefill[0],
                    kv_tokens_final=res.kv_tokens_final[0],
                    kv_bytes_prefill=res.kv_bytes_prefill,
                )
            )
            print(
                f"{name:13s} {json.dumps(params):18s} depth={p.depth:.1f} score={rows[-1]['score']:.1f} "
                f"ttft={res.ttft_s:.2f}s kv={res.kv_tokens_prefill[0]} -> {res.kv_tokens_final[0]}  {res.text[:60]!r}",
                flush=True,
            )
    out = dict(
        command="PYTHONPATH=src OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
        model="smollm2 (SmolLM2-135M-Instruct, float32, CPU, 1 thread)",
        machine=platform.platform(),
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"),
        rows=rows,
    )
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
