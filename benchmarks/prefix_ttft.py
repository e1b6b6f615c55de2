"""Prefix cache: TTFT of the first question about a document and of the following ones.

CPU, SmolLM2-135M-Instruct, a ~4k-token PG-19 document, several questions (the committed result):

    OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python benchmarks/prefix_ttft.py   # writes benchmarks/results/prefix_ttft_cpu.json

GPU, a real model shape with random weights and token-id prompts (each length = document + a 32-token question;
use an H200 for 131072: weights, the stored prefix and the request's KV are 16 GiB each):

    PYTHONPATH=src .venv/bin/python benchmarks/prefix_ttft.py --shape llama3.1-8b --lengths 32768,131072 \
        --out benchmarks/results/prefix_ttft_gpu.json

For each method (full, gemfilter) a fresh ``PrefixStore`` is used: question 1 is a miss (the document's
state is computed and stored, then the question runs on top of it), questions 2.. reuse it. Each
question is also answered without the cache: ``uncached_ttft_s`` is that baseline and ``same_answer``
says the greedy answers are equal (they must be). ``ratio`` = following question's TTFT / first
question's TTFT (cached runs); ``following_vs_uncached`` = the same over the median uncached TTFT. The 1-minute
load average before and after is recorded: on a shared machine, timings vary with it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "Who is the main character of this text?",
    "Where does the story take place?",
    "Summarize the last paragraph in one sentence.",
    "What is the mood of the opening?",
    "Name two people mentioned in the text.",
]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tokensieve.bench.timing import _IdTokenizer, build_model, environment
    from tokensieve.engine.prefix_cache import GIB, PrefixReuse, PrefixStore, chat_prefix_tokens
    from tokensieve.engine.runner import encode_prompt, generate
    from tokensieve.methods import make_method

    methods = {"full": {}, "gemfilter": {"topk": args.topk}}
    cases: list[tuple[str, list[torch.Tensor], list[int]]] = []  # (label, prompts, prefix lengths)
    if args.shape is None:
        from tokensieve import load_model
        from tokensieve.data import read_text

        model, tok = load_model("smollm2")
        text = read_text(min_chars=args.tokens * 6)
        ids = tok(text, add_special_tokens=False)["input_ids"][: args.tokens]
        doc = tok.decode(ids)
        prompts, prefixes = [], []
        for q in QUESTIONS[: args.questions]:
            msgs = [{"role": "user", "content": f"{doc}\n\nAnswer the question from the text above.\nQuestion: {q}"}]
            p = encode_prompt(tok, msgs)
            prompts.append(p)
            prefixes.append(chat_prefix_tokens(tok, msgs, p))
        cases.append((f"smollm2 {prompts[0].shape[1]} tokens", prompts, prefixes))
        model_name = "smollm2"
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model, tok = build_model(args.shape, dtype, device), _IdTokenizer()
        vocab = model.config.get_text_config().vocab_size
        g = torch.Generator().manual_seed(0)
        for length in args.lengths:
            doc = torch.randint(10, vocab, (1, length - 32), generator=g)  # document + a 32-token question = length
            qs = [torch.randint(10, vocab, (1, 32), generator=g) for _ in range(args.questions)]
            cases.append(
                (f"{args.shape} {length} tokens", [torch.cat([doc, q], 1) for q in qs], [length - 32] * len(qs))
            )
        model_name = args.shape
    device = model.device

    # On a GPU, decode on the eager path: TTFT is measured before decoding starts either way, and the static
    # buffers would hold another copy of the KV (16 GiB at 128k tokens on Llama-3.1-8B) next to the store's.
    decode = "auto" if args.shape is None else "eager"

    def once(ids: torch.Tensor, method: Any):
        return generate(
            model, tok, ids, method=method, max_new_tokens=args.max_new_tokens, allow_long=True, decode=decode
        )

    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    once(cases[0][1][0][:, :64], "full")  # warm-up: one-off costs out of the timed runs
    rows = []
    for label, prompts, prefixes in cases:
        for name, params in methods.items():
            store = PrefixStore(int(args.cache_gib * GIB))
            qrows = []
            for i, (ids, prefix) in enumerate(zip(prompts, prefixes)):
                cached = once(ids, PrefixReuse(make_method(name, **params), store, prefix))
                base = once(ids, make_method(name, **params))
                qrows.append(
                    {
                        "question": i + 1,
                        "prompt_tokens": int(ids.shape[1]),
                        "prefix_tokens": prefix,
                        "prefix_cached_tokens": cached.details["prefix_cached_tokens"],
                        "ttft_s": cached.ttft_s,
                        "uncached_ttft_s": base.ttft_s,
                        "same_answer": cached.token_ids == base.token_ids,
                        "kept_tokens": cached.kept_tokens,
                    }
                )
                print(
                    f"{label} {name} q{i + 1}: ttft {cached.ttft_s:.3f} s (uncached {base.ttft_s:.3f} s), "
                    f"cached {qrows[-1]['prefix_cached_tokens']} tokens, same answer {qrows[-1]['same_answer']}",
                    file=sys.stderr,
                )
            first = qrows[0]["ttft_s"]
            following = statistics.median(r["ttft_s"] for r in qrows[1:]) if len(qrows) > 1 else None
            rows.append(
                {
                    "case": label,
                    "method": name,
                    "params": params,
                    "questions": qrows,
                    "first_ttft_s": first,
                    "following_ttft_s_median": following,
                    "ratio": following / first if following is not None else None,
                    "uncached_ttft_s_median": statistics.median(r["uncached_ttft_s"] for r in qrows),
                    "following_vs_uncached": (
                        following / statistics.median(r["uncached_ttft_s"] for r in qrows)
                        if following is not None
                        else None
                    ),
                    "all_same_answer": all(r["same_answer"] for r in qrows),
                    "store_bytes": store.nbytes,
                }
            )
            del store
    return {
        "benchmark": "prefix_ttft",
        "model": model_name,
        "argv": sys.argv[1:],
        "max_new_tokens": args.max_new_tokens,
        "environment": environment(device)
        | {
            "loadavg_1min_start": load_start,
            "loadavg_1min_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "rows": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shape",
        default=None,
        help="a tokensieve.bench.timing shape (random weights, token ids); default: SmolLM2 on a PG-19 document",
    )
    p.add_argument("--lengths", default="32768,131072", help="document lengths for --shape (comma-separated)")
    p.add_argument("--tokens", type=int, default=4000, help="document tokens for SmolLM2 (default 4000)")
    p.add_argument("--questions", type=int, default=4, help="questions per document (default 4)")
    p.add_argument("--topk", type=int, default=1024, help="GemFilter's topk (default 1024)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--cache-gib", type=float, default=32.0, help="prefix store size (default 32 GiB)")
    p.add_argument(
        "--out", default=None, help="result file (default benchmarks/results/prefix_ttft_cpu.json without --shape)"
    )
    args = p.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    out = args.out or str(
        ROOT / "benchmarks/results" / ("prefix_ttft_cpu.json" if args.shape is None else "prefix_ttft_gpu.json")
    )
    result = run(args)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    for r in result["rows"]:
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        print(
            f"{r['case']:<28} {r['method']:<10} first {r['first_ttft_s']:.3f} s  following {r['following_ttft_s_median']:.3f} s  "
            f"ratio {ratio}  uncached {r['uncached_ttft_s_median']:.3f} s  same answers {r['all_same_answer']}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
