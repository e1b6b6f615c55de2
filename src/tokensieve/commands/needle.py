"""`tokensieve needle`: needle-in-a-haystack grid (lengths x depths) for chosen methods."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from tokensieve.commands.common import add_method_args, add_model_args, build_method, load, parse_floats, parse_sizes
from tokensieve.data import read_text
from tokensieve.evaluation.needle import DEFAULT_EXPECTED, DEFAULT_NEEDLE, DEFAULT_QUESTION, build_needle_prompt, score_answer
from tokensieve.evaluation.plots import needle_heatmap
from tokensieve.runner import generate


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("needle", help="needle-in-a-haystack grid with heatmaps", description="Needle-in-a-haystack: for each length and depth, insert the needle into PG-19 text, ask each method, score, and write results.json plus one heatmap PNG per method.")
    add_model_args(p)
    add_method_args(p, multi=True)
    p.add_argument("--lengths", type=parse_sizes, default=[1024, 2048, 4096], help="prompt lengths, e.g. 1k,2k,4k (default)")
    p.add_argument("--depths", type=parse_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths in [0,1] (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--haystack", default=None, help="text file for the haystack (default: the PG-19 books)")
    p.add_argument("--needle", default=DEFAULT_NEEDLE, help="needle sentence (default: the GemFilter paper's)")
    p.add_argument("--question", default=DEFAULT_QUESTION, help="question whose answer is the needle")
    p.add_argument("--expected", default=",".join(DEFAULT_EXPECTED), help="comma-separated phrases a correct answer contains")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", default="runs/needle", help="output folder (default runs/needle)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    methods = {name: build_method(args, name) for name in args.methods}
    expected = [e.strip() for e in args.expected.split(",") if e.strip()]
    if any(not 0 <= d <= 1 for d in args.depths):
        raise ValueError(f"depths must be in [0, 1], got {args.depths}")
    model, tok = load(args)
    hay = read_text(args.haystack, min_chars=max(args.lengths) * 8)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    cells = [(n, d) for n in args.lengths for d in args.depths]
    bar = tqdm(total=len(cells) * len(methods), desc="needle")
    for n, d in cells:
        p = build_needle_prompt(tok, hay, n, d, args.needle, args.question)
        for name, m in methods.items():
            r = generate(model, tok, p.messages, method=m, max_new_tokens=args.max_new_tokens)
            kept = set(r.kept_indices) if r.kept_indices is not None else None
            rows.append(dict(
                method=name, params=r.params, model=args.model, length=n, depth=d, prompt_tokens=r.prompt_tokens,
                score=score_answer(r.text, expected), answer=r.text, kept_tokens=r.kept_tokens, ttft_s=r.ttft_s,
                peak_memory_bytes=r.peak_memory_bytes, kv_bytes_prefill=r.kv_bytes_prefill,
                needle_recall=None if kept is None else sum(i in kept for i in p.needle_span) / len(p.needle_span),
            ))
            bar.update()
    bar.close()
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"{'method':>10} " + " ".join(f"{n:>7}" for n in args.lengths) + "   mean TTFT per length (s)")
    for name in methods:
        grid = [[next(r["score"] for r in rows if r["method"] == name and r["length"] == n and r["depth"] == d) for n in args.lengths] for d in args.depths]
        needle_heatmap(grid, args.lengths, args.depths, f"{name} on {args.model}", out / f"needle_{name}.png")
        acc = [sum(g[j] for g in grid) / len(grid) for j in range(len(args.lengths))]
        ttft = [sum(r["ttft_s"] for r in rows if r["method"] == name and r["length"] == n) / len(args.depths) for n in args.lengths]
        print(f"{name:>10} " + " ".join(f"{a:7.2f}" for a in acc) + "   " + " ".join(f"{t:.2f}" for t in ttft))
    print(f"wrote {out / 'results.json'} and heatmaps")
    return 0
