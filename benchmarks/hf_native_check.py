"""``tokensieve.apply`` on a GPU: the user's own ``model.generate`` inside the block against ``tokensieve.generate``.

For each method, on one model of a real shape (random weights) and one prompt of ``--length`` random ids:

* ``hf``: ``with tokensieve.apply(model, method, **params): model.generate(ids, max_new_tokens=T, do_sample=False)``
  (transformers' eager decoding loop, the method's cache and hooks), wall time of the call;
* ``eager``: ``tokensieve.generate(..., decode="eager")``, the same computation in tokensieve's loop;
* ``auto``: ``tokensieve.generate(..., decode="auto")``, static buffers and a captured step where supported;
* the tokens of ``hf`` compared with both (``same_as_eager``, ``same_as_auto``; on a GPU in half precision a
  kernel difference can flip a near-tie, so the first differing step is reported), and the KV entries the
  method kept after the prompt (``kv_kept``, per layer, from the block's ``last_kv_entries``).

Usage (GPU machine, from the repository root; one JSON under ``$OUT``)::

    PYTHONPATH=src python3 benchmarks/hf_native_check.py --out $OUT/hf_native.json

CPU smoke run: ``PYTHONPATH=src python3 benchmarks/hf_native_check.py --shape smollm2-135m --device cpu
--dtype float32 --length 512 --tokens 8 --out /tmp/hf_native.json``
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import tokensieve
from tokensieve.bench.timing import SHAPES, _IdTokenizer, build_model, environment
from tokensieve.core.memory import synchronize

METHODS = {
    "full": {},
    "snapkv": {"budget": 1024},
    "h2o": {"budget": 1024},
    "streamingllm": {"budget": 1024},
    "sepllm": {"n_recent": 256, "separator_ids": (13, 11, 30, 0, 25, 26, 198)},
    "gemfilter": {"topk": 1024},
}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first step where two token lists differ (None: equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--length", type=int, default=8192, help="prompt tokens (1..131072)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per answer (1..4096)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not 1 <= args.length <= 131072 or not 1 <= args.tokens <= 4096:
        ap.error("--length must be in [1, 131072] and --tokens in [1, 4096]")
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown methods {unknown}; expected some of {list(METHODS)}")
    device = torch.device(args.device)
    model = build_model(args.shape, getattr(torch, args.dtype), device)
    tok = _IdTokenizer()
    ids = torch.randint(
        100, model.config.vocab_size - 100, (1, args.length), generator=torch.Generator().manual_seed(0)
    )
    ids = ids.to(device)
    rows = []
    for name in methods:
        params = METHODS[name]
        print(f"{name} ...", flush=True)
        with tokensieve.apply(model, name, **params) as block:
            model.generate(ids[:, :64], max_new_tokens=2, do_sample=False)  # warm-up
            synchronize(device)
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
            synchronize(device)
            hf_s = time.perf_counter() - t0
        hf = out[0, args.length :].tolist()
        row = {
            "method": name,
            "params": {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()},
            "hf_s": hf_s,
            "kv_kept": block.last_kv_entries,
            "kept_prompt_tokens": len(block.last_selection or []) or None,
        }
        for mode in ("eager", "auto"):
            res = tokensieve.generate(model, tok, ids, method=name, max_new_tokens=args.tokens, decode=mode, **params)
            row[f"{mode}_s"] = (
                res.ttft_s + (len(res.token_ids) - 1) / res.decode_tokens_per_s
                if res.decode_tokens_per_s
                else res.ttft_s
            )
            row[f"same_as_{mode}"] = res.token_ids == hf
            row[f"first_difference_{mode}"] = first_difference(hf, res.token_ids)
            row[f"kv_prefill_{mode}"] = res.kv_tokens_prefill
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {
        "shape": args.shape,
        "dtype": args.dtype,
        "length": args.length,
        "tokens": args.tokens,
        "environment": environment(device),
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
