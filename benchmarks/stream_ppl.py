"""Streaming perplexity on a PG-19 book: SepLLM vs StreamingLLM vs full attention, SmolLM2 on CPU, one run.

Command (from the project root; the numbers in benchmarks/results/stream_ppl_smollm2.json came from it):

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/stream_ppl.py \
        --tokens 65536 --chunk-size 128 --full-past 2048 --out benchmarks/results/stream_ppl_smollm2

* SepLLM: SepCache n_initial=4, n_separators=64, n_recent=256, budget=800
  (a=4, s=64, w=256, c=800: the paper's streaming setting).
* StreamingLLM: n_initial=4 sinks + 796 recent tokens (the same budget of 800).
* Full attention: every token kept, true positions; runs to the model's maximum
  (8192) and, as if with ``--allow-long``, ``--full-past`` tokens beyond it to show
  the breakdown, then stops.

All three stream the same tokens of the same book in chunks of ``--chunk-size``
(chunk semantics: docs/streaming.md). Writes ``<out>.json`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from tokensieve.core.models import load_model
from tokensieve.core.separators import separator_token_ids
from tokensieve.data import default_pg19_dir
from tokensieve.engine.streaming import FullPolicy, SepLLMPolicy, StreamingLLMPolicy
from tokensieve.evaluation.plots import plot_stream
from tokensieve.evaluation.stream_ppl import stream_perplexity


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--book", default=None, help="text file (default: PG-19 book 2544, the longest shipped)")
    ap.add_argument("--tokens", type=int, default=65536, help="tokens streamed by SepLLM and StreamingLLM")
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--full-past", type=int, default=2048, help="tokens full attention runs past the model maximum")
    ap.add_argument("--full-tokens", type=int, default=None, help="override: tokens for full attention (smoke tests)")
    ap.add_argument("--ppl-window", type=int, default=1024)
    ap.add_argument("--out", default="benchmarks/results/stream_ppl_smollm2")
    args = ap.parse_args()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)

    book = Path(args.book) if args.book else default_pg19_dir() / "2544.txt"
    model, tok = load_model(args.model, device="cpu")
    ids = tok(book.read_text(encoding="utf-8"), return_tensors="pt")["input_ids"][0]
    if ids.numel() < args.tokens:
        raise SystemExit(f"{book} has only {ids.numel()} tokens, fewer than --tokens {args.tokens}")
    max_pos = model.config.max_position_embeddings
    runs = [
        (SepLLMPolicy(n_initial=4, n_separators=64, n_recent=256, budget=800), args.tokens, False),
        (StreamingLLMPolicy(n_initial=4, budget=800), args.tokens, False),
        (FullPolicy(), args.full_tokens or max_pos + args.full_past, True),
    ]
    results, t_all = [], time.perf_counter()
    for policy, n, allow_long in runs:
        bar = tqdm(total=n, desc=policy.name, unit="tok", file=sys.stderr, mininterval=5)

        def progress(point, done, bar=bar):
            bar.update(done - bar.n)
            bar.set_postfix(ppl=f"{point.running_ppl:.2f}", cache=point.cache_entries, refresh=False)

        r = stream_perplexity(
            model,
            ids,
            policy,
            chunk_size=args.chunk_size,
            max_tokens=n,
            tokenizer=tok,
            allow_long=allow_long,
            ppl_window=args.ppl_window,
            progress=progress,
        )
        bar.close()
        results.append(r)
        print(
            f"{r.method}: {r.tokens_seen} tokens, ppl {r.perplexity:.3f}, {r.tokens_per_s:.0f} tok/s, "
            f"cache <= {r.max_cache_entries}, {r.seconds:.0f} s",
            file=sys.stderr,
        )
    total_s = time.perf_counter() - t_all

    def ppl_range(r, lo, hi):  # perplexity of scored tokens lo+1..hi (nll[i] scores token i+1)
        xs = r.nll[lo:hi]
        return math.exp(sum(xs) / len(xs)) if xs else None

    rows = []
    for r in results:
        d = r.to_dict()
        d["ppl_first_max_positions"] = ppl_range(r, 0, max_pos - 1)  # tokens 1..8191: full attention's valid range
        d["ppl_past_max_positions"] = ppl_range(r, max_pos - 1, max_pos - 1 + args.full_past)
        d["ppl_last_8k"] = ppl_range(r, len(r.nll) - 8192, len(r.nll)) if len(r.nll) >= 8192 else None
        rows.append(d)
    out = dict(
        command="PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/stream_ppl.py " + " ".join(sys.argv[1:]),
        model=args.model,
        book=book.name,
        book_tokens=int(ids.numel()),
        model_max_positions=max_pos,
        chunk_size=args.chunk_size,
        separators=len(separator_token_ids(tok)),
        device="cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        python=platform.python_version(),
        total_seconds=total_s,
        results=rows,
    )
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(out, indent=1))
    plot_stream(
        results,
        path.with_suffix(".png"),
        f"Streaming perplexity, {args.model} on PG-19 book {book.stem} (CPU, chunk {args.chunk_size})",
    )
    print(
        f"{'method':>13} {'tokens':>7} {'ppl':>8} {'ppl<=8k':>8} {'ppl>8k':>9} {'cache':>6} {'KV MiB':>7} {'tok/s':>6}"
    )
    for d in rows:
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(
            f"{d['method']:>13} {d['tokens_seen']:>7} {fmt(d['perplexity']):>8} {fmt(d['ppl_first_max_positions']):>8} "
            f"{fmt(d['ppl_past_max_positions']):>9} {d['max_cache_entries']:>6} {d['max_kv_bytes'] / 2**20:>7.1f} "
            f"{d['tokens_per_s']:>6.0f}"
        )
    print(f"total {total_s:.0f} s; wrote {path.with_suffix('.json')} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
