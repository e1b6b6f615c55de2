"""`tokensieve demo`: full attention vs GemFilter on a ~4k-token needle prompt, side by side."""

from __future__ import annotations

import argparse

from tokensieve.commands.common import add_model_args, fmt_bytes, load, parse_fraction, parse_size


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", description="Build a needle-in-a-haystack prompt from the PG-19 books and answer it with full attention and GemFilter, side by side.")
    add_model_args(p)
    p.add_argument("--length", type=parse_size, default=4000, help="prompt tokens (default 4000)")
    p.add_argument("--depth", type=parse_fraction, default=0.5, help="needle depth in [0,1] (default 0.5)")
    p.add_argument("--topk", type=parse_size, default=1024, help="GemFilter tokens kept (default 1024)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokensieve.data import read_text
    from tokensieve.evaluation.needle import build_needle_prompt, score_answer
    from tokensieve.runner import generate

    haystack = read_text(min_chars=args.length * 8)  # a missing PG-19 folder fails before the model loads
    print(f"loading {args.model} ...", flush=True)
    model, tok = load(args)
    p = build_needle_prompt(tok, haystack, args.length, args.depth)
    print(f"prompt: {p.length} tokens of PG-19 text, needle at depth {args.depth:.0%}\n", flush=True)
    results = {}
    for name, params in (("full", {}), ("gemfilter", {"topk": args.topk})):
        print(f"running {name} ...", flush=True)
        results[name] = generate(model, tok, p.messages, method=name, max_new_tokens=40, **params)
    full, gem = results["full"], results["gemfilter"]
    w = 44
    print()
    for label, res in (("full attention", full), ("GemFilter", gem)):
        print(f"{label} answers: {res.text!r}")
    print(f"\n{'':>14} {'full attention':<{w}} {'GemFilter':<{w}}")
    for label, a, b in (
        ("score", score_answer(full.text), score_answer(gem.text)),
        ("kept tokens", f"{full.kept_tokens} / {full.prompt_tokens}", f"{gem.kept_tokens} / {gem.prompt_tokens}"),
        ("TTFT", f"{full.ttft_s:.2f} s", f"{gem.ttft_s:.2f} s"),
        ("peak memory", fmt_bytes(full.peak_memory_bytes), fmt_bytes(gem.peak_memory_bytes)),
        ("KV cache", fmt_bytes(full.kv_bytes_prefill), fmt_bytes(gem.kv_bytes_prefill)),
    ):
        a, b = str(a), str(b)
        print(f"{label:>14} {a[:w - 1]:<{w}} {b[:w - 1]:<{w}}")
    print("(score: fraction of \"sandwich\" and \"Dolores Park\" in the answer)")
    print(f"\nGemFilter TTFT speedup: {full.ttft_s / gem.ttft_s:.2f}x (filter layer {gem.details['filter_layer']})")
    return 0
