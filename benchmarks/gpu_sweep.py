"""The GPU sweep behind the README's performance section (issue: GPU benchmark).

Run on the lent GPU machine from the repository root (it needs only torch,
transformers, tqdm and matplotlib, which that machine has):

    PYTHONPATH=src python3 benchmarks/gpu_sweep.py --part main --out $OUT
    PYTHONPATH=src python3 benchmarks/gpu_sweep.py --part long --out $OUT

``main``: Llama-3.1-8B shape, bf16, 8k-128k, every method that exists, with
the paper's GemFilter settings (r = 13, k = 1024).
``long``: GemFilter with the chunked filter pass at 256k, 512k and 1M tokens,
and full attention at 256k / 512k to find where it runs out of memory.
Each part writes bench_<part>.json and .png under --out; the results are
committed under benchmarks/results/ with the device named in the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tokensieve.bench.timing import build_model, run_bench, save
from tokensieve.commands.bench import format_table
from tokensieve.evaluation.plots import bench_plot
from tokensieve.methods import METHODS
from tokensieve.methods.gemfilter import causal_chunk_attention

K = 1024
# Measured anchors on an H100 (plain script, transformers 5.17, torch 2.11, SDPA): {length: (ttft_s, peak_GiB)}.
ANCHORS = {
    "anchor: full": {32768: (1.39, 22.6), 65536: (3.70, 30.3), 131072: (11.58, 45.6)},
    "anchor: first 13 layers": {32768: (0.57, 18.6), 65536: (1.50, 22.3), 131072: (4.69, 29.6)},
}


def main_methods() -> dict[str, dict]:
    specs = {
        "full": {"method": "full"},
        "gemfilter": {"method": "gemfilter", "filter_layer": 13, "topk": K, "scoring": "paper"},
        "gemfilter-window": {"method": "gemfilter", "filter_layer": 13, "topk": K, "scoring": "window"},
        "snapkv": {"method": "snapkv", "budget": K},
        "h2o": {"method": "h2o", "budget": K},
        "streamingllm": {"method": "streamingllm"},
        # Random prompts: every 10th vocabulary id counts as a separator, so ~10% of the prompt
        # are separators, as in PG-19 text with the SmolLM2 tokenizer (9.5%).
        "sepllm": {"method": "sepllm", "separator_ids": tuple(range(0, 128256, 10))},
        "lazyllm": {"method": "lazyllm"},
        # the most aggressive schedule of the SmolLM2 sweep (36% of prompt KV computed; it lost the needle there)
        "lazyllm-aggressive": {"method": "lazyllm", "prune_layers": (4, 10, 16, 22), "keep_fractions": (0.5,) * 4},
    }
    return {label: s for label, s in specs.items() if s["method"] in METHODS}


def check_chunk_attention(device: torch.device) -> dict:
    """Correctness and kernel speed of the bottom-right causal chunk attention used by the chunked filter pass."""
    q = torch.randn(1, 32, 512, 128, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, 8, 2048, 128, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = causal_chunk_attention(q, k, v, 128**-0.5).float()
    kr, vr = (x.repeat_interleave(4, dim=1).float() for x in (k, v))
    s = (q.float() @ kr.transpose(-1, -2)) * 128**-0.5
    qpos = torch.arange(2048 - 512, 2048, device=device)[:, None]
    s = s.masked_fill(torch.arange(2048, device=device)[None] > qpos, float("-inf"))
    ref = s.softmax(-1) @ vr
    rel = float((out - ref).norm() / ref.norm())
    q = torch.randn(1, 32, 16384, 128, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, 8, 262144, 128, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    causal_chunk_attention(q, k, v, 0.088)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        causal_chunk_attention(q, k, v, 0.088)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / 3
    flops = 4 * 32 * 16384 * 262144 * 128  # q chunk fully below the diagonal except its own block
    return {"rel_error_vs_fp32": rel, "chunk16k_over_256k_s": dt, "tflops": flops / dt / 1e12}


def decode_profile(model, method_name: str, n: int, steps: int = 32, **params) -> dict:
    """Per-step decode times (s) after a prefill of n random tokens: tells one-time from steady costs."""
    from tokensieve.methods import make_method

    m = make_method(method_name, **params)
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=model.device)
    times = []
    with torch.inference_mode():
        state = m.prefill(model, ids)
        tok = state.logits.argmax(-1, keepdim=True)
        for _ in range(steps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            tok = m.step(model, state, tok).argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    k = state.cache.layers[0].keys
    return {"method": method_name, "n": n, "step_s": times, "key_stride": list(k.stride()), "key_shape": list(k.shape)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["main", "long"], required=True)
    ap.add_argument("--shape", default="llama3.1-8b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", default=None, help="override lengths, comma-separated token counts")
    ap.add_argument("--chunk", type=int, default=16384, help="chunk size of the long GemFilter filter pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tag", default="", help="suffix for the output file names")
    ap.add_argument("--labels", default=None, help="only these method labels, comma-separated")
    ap.add_argument("--no-checks", action="store_true", help="long part: skip the kernel check and decode profile")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    model = build_model(args.shape, torch.bfloat16, device)
    if args.part == "main":
        lengths = [8192, 32768, 65536, 131072]
        methods = main_methods()
        if args.labels:
            methods = {k: v for k, v in methods.items() if k in args.labels.split(",")}
        tag = f"main_{args.tag}" if args.tag else "main"

        def partial(rows, tag=tag):
            (out / f"bench_{tag}.partial.json").write_text(json.dumps(rows, indent=1))

        res = run_bench(
            args.shape,
            [int(x) for x in args.lengths.split(",")] if args.lengths else lengths,
            methods,
            model=model,
            repeats=args.repeats,
            decode_tokens=128,
            progress=True,
            on_row=partial,
        )
        anchors = ANCHORS
    else:
        extra = {}
        if not args.no_checks:
            extra["chunk_attention_check"] = check_chunk_attention(device)
            print(json.dumps(extra), flush=True)
            extra["decode_profile"] = [
                decode_profile(model, "full", 8192),
                decode_profile(model, "full", 8192),
                decode_profile(model, "gemfilter", 8192, filter_layer=13, topk=K),
            ]
            for d in extra["decode_profile"]:
                print(d["method"], [round(x * 1000, 1) for x in d["step_s"]], d["key_stride"], flush=True)
        lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else [262144, 524288, 1048576]
        methods = {
            "gemfilter-chunked": {
                "method": "gemfilter",
                "filter_layer": 13,
                "topk": K,
                "scoring": "paper",
                "chunk_size": args.chunk,
            },
            "full": {"method": "full"},
        }
        if args.labels:
            methods = {k: v for k, v in methods.items() if k in args.labels.split(",")}
        tag = f"long_{args.tag}" if args.tag else "long"

        def partial(rows, tag=tag):
            (out / f"bench_{tag}.partial.json").write_text(json.dumps(rows, indent=1))

        res = run_bench(
            args.shape,
            lengths,
            methods,
            model=model,
            repeats=1,
            decode_tokens=16,
            progress=True,
            warmup_length=8192,
            on_row=partial,
        )
        res.update(extra)
        anchors = None
    res["command"] = " ".join(["PYTHONPATH=src python3"] + sys.argv)
    tag = f"{args.part}_{args.tag}" if args.tag else args.part
    save(res, str(out / f"bench_{tag}.json"))
    bench_plot(res, out / f"bench_{tag}.png", anchors=anchors)
    print(format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
