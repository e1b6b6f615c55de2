"""transformers' own fast decoding path, for the side-by-side: ``generate`` with a static cache and the
forward compiled with ``torch.compile(mode="reduce-overhead")`` (transformers' documented recipe), against
its plain ``generate`` (dynamic cache), same model and prompt, one process (GPU).

For each length: per-token time of a 256-token answer = (time(256 new) - time(1 new)) / 255 after a warm-up
call (the compile happens there and is reported apart as ``warmup_s``); a failure is recorded with its
message instead of a time.

    PYTHONPATH=src python benchmarks/hf_static_compile.py --lengths 32768 --out $OUT/hf_static_compile.json
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

from tokensieve.bench.timing import build_model, environment
from tokensieve.commands.common import parse_sizes


def timed_generate(model, ids: torch.Tensor, new: int, **kw) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def per_token(model, ids: torch.Tensor, tokens: int, **kw) -> dict:
    t0 = time.perf_counter()
    timed_generate(model, ids, 8, **kw)  # warm-up: compiles (static) or allocates (dynamic)
    warm = time.perf_counter() - t0
    one = timed_generate(model, ids, 1, **kw)
    full = timed_generate(model, ids, tokens, **kw)
    return {"status": "ok", "warmup_s": warm, "ttft_s": one, "e2e_s": full, "per_token_s": (full - one) / (tokens - 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3.1-8b")
    ap.add_argument("--lengths", type=parse_sizes, default=[32768])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    model = build_model(args.shape, torch.bfloat16, dev)
    model.set_attn_implementation("sdpa")
    out = {"shape": args.shape, "environment": environment(dev), "tokens": args.tokens, "rows": []}
    for n in args.lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)).to(dev)
        for label in ("dynamic", "static_compiled"):
            row = {"label": label, "length": n}
            try:
                if label == "dynamic":
                    row |= per_token(model, ids, args.tokens)
                else:
                    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
                    row |= per_token(model, ids, args.tokens, cache_implementation="static")
            except Exception as exc:  # the recipe's failure is the result
                row |= {
                    "status": "error",
                    "error": f"{type(exc).__name__}: {exc}"[:600],
                    "where": traceback.format_exc().splitlines()[-3:],
                }
            out["rows"].append(row)
            print(json.dumps(row)[:700], flush=True)
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
