"""The evicting methods' slot policies on a captured CUDA graph give the eager path's tokens, prompt after prompt.

The driver captures a decoder once and then loads it for every later prompt of the same size, so a slot policy's
state must be filled in place (a graph reads tensors by address). This check decodes, in float32 on random weights
(the ``tiny`` shape, or ``--shape``), each evicting method's answers to ``--prompts`` prompts through one decoder
pool (the first captures, the others replay) and compares every answer with the eager path's, token for token.
Answers are long against the windows (``--tokens`` > ``n_recent`` and budgets), and SepLLM's separators are a
quarter of the vocabulary, so generated separators leave the window while decoding.

Run from the repository root on a GPU machine (exit 1 when an answer differs; JSON under ``--out``):
``PYTHONPATH=src python3 benchmarks/slot_policy_graph_check.py --out $OUT/slot_policy_graph.json``
CPU smoke run (no graph there): ``... --device cpu --tokens 40 --out /tmp/s.json``
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from tokensieve.bench.timing import SHAPES, _IdTokenizer, build_model, environment
from tokensieve.decode.static import DecoderPool
from tokensieve.engine.runner import generate
from tokensieve.errors import check_int


def method_params(vocab: int) -> dict[str, dict]:
    return {
        "streamingllm": {"budget": 48, "n_initial": 4},
        "h2o": {"budget": 48, "n_recent": 16},
        "sepllm": {"n_initial": 4, "n_recent": 16, "separator_ids": tuple(range(0, vocab, 4))},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--device", default=None, help="default: cuda when available")
    ap.add_argument("--length", type=int, default=256, help="prompt tokens")
    ap.add_argument("--tokens", type=int, default=200, help="answer tokens")
    ap.add_argument("--prompts", type=int, default=3, help="prompts per method through one decoder pool")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    check_int("--length", args.length, 1, 1 << 20)
    check_int("--tokens", args.tokens, 1, 4096)
    check_int("--prompts", args.prompts, 1, 64)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args.shape, torch.float32, device)
    vocab = model.config.get_text_config().vocab_size
    tok, rows, ok = _IdTokenizer(), [], True
    for name, params in method_params(vocab).items():
        pool = DecoderPool(model)
        for p in range(args.prompts):
            gen = torch.Generator().manual_seed(100 + p)
            ids = torch.randint(0, vocab, (1, args.length), generator=gen).to(device)
            eager = generate(model, tok, ids, name, max_new_tokens=args.tokens, decode="eager", **params)
            static = generate(
                model, tok, ids, name, max_new_tokens=args.tokens, decode="static", decoders=pool, **params
            )
            pairs = list(zip(eager.token_ids, static.token_ids))
            prefix = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
            identical = eager.token_ids == static.token_ids and eager.kv_tokens_final == static.kv_tokens_final
            ok &= identical
            row = {
                "method": name,
                "params": {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()},
                "prompt": p,
                "decode_path": static.details["decode_path"],
                "decoders_in_pool": len(pool.decoders),
                "identical": identical,
                "identical_prefix": prefix,
                "tokens": len(eager.token_ids),
                "kv_final_eager": eager.kv_tokens_final[0],
                "kv_final_static": static.kv_tokens_final[0],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {
        "shape": args.shape,
        "length": args.length,
        "environment": environment(torch.device(device)),
        "all_identical": ok,
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"all identical: {ok}; wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
