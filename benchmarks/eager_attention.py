"""The eager decoding step with and without cuDNN's attention kernel, same process (``tokensieve.core.attention.sdpa``).

cuDNN's fused attention plans every new shape on the host; a decoding step's key length grows at every call, so
each layer's call waits for a new plan. ``tokensieve.core.attention.sdpa`` leaves cuDNN out where the queries are fewer
than the keys. This measures, per method and prompt length, the eager step (``decode="eager"``) with cuDNN allowed
(``CUDNN_IN_STEPS = True``, PyTorch's own choice) and left out (the default), and the prompt's TTFT with PyTorch's
choice and with cuDNN left out of the prompt's pass as well. Random weights in a real shape.

``PYTHONPATH=src python3 benchmarks/eager_attention.py --lengths 8192,32768 --methods full,snapkv,lazyllm --out $OUT/eager_attention.json``
"""

from __future__ import annotations

import argparse
import gc
import json

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from tokensieve.bench.roofline import median, p90
from tokensieve.bench.timing import _IdTokenizer, build_model, environment
from tokensieve.core import attention
from tokensieve.engine.runner import generate

PARAMS = {
    "full": {},
    "snapkv": {"budget": 1024},
    "lazyllm": {},
    "gemfilter": {"topk": 1024, "filter_layer": 13},
    "h2o": {"budget": 1024},
    "streamingllm": {"budget": 1024},
}
NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3.1-8b")
    ap.add_argument("--lengths", default="8192,32768")
    ap.add_argument("--methods", default="full,snapkv,lazyllm")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    model = build_model(args.shape, torch.bfloat16, dev)
    tok = _IdTokenizer()
    out = {"shape": args.shape, "environment": environment(dev), "steps": args.steps, "rows": []}
    warm = torch.randint(0, model.config.vocab_size, (1, 1024), generator=torch.Generator().manual_seed(0))
    for name in args.methods.split(","):
        generate(model, tok, warm, name, max_new_tokens=4, decode="eager", allow_long=True, **PARAMS[name])
    for n in [int(x) for x in args.lengths.split(",")]:
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        for name in args.methods.split(","):
            row = {"method": name, "length": n}
            for label, steps_cudnn in (("cudnn", True), ("no_cudnn", False)):
                attention.CUDNN_IN_STEPS = steps_cudnn
                r = generate(
                    model,
                    tok,
                    ids,
                    name,
                    max_new_tokens=args.steps + 1,
                    decode="eager",
                    allow_long=True,
                    **PARAMS[name],
                )
                row[label] = {
                    "step_median_s": median(r.step_times_s),
                    "step_p90_s": p90(r.step_times_s),
                    "ttft_s": r.ttft_s,
                    "tokens": r.token_ids,
                }
                gc.collect()
                torch.cuda.empty_cache()
            attention.CUDNN_IN_STEPS = False
            with sdpa_kernel(NO_CUDNN):  # the prompt's pass without cuDNN as well
                r = generate(model, tok, ids, name, max_new_tokens=1, decode="eager", allow_long=True, **PARAMS[name])
            row["ttft_no_cudnn_anywhere_s"] = r.ttft_s
            row["same_tokens"] = row["cudnn"]["tokens"] == row["no_cudnn"]["tokens"]
            c, nc = row["cudnn"], row["no_cudnn"]
            print(
                f"{name:>8} {n:>6}: eager step {c['step_median_s'] * 1e3:.1f} -> {nc['step_median_s'] * 1e3:.1f} ms "
                f"(p90 {c['step_p90_s'] * 1e3:.1f} -> {nc['step_p90_s'] * 1e3:.1f}); TTFT cuDNN allowed "
                f"{c['ttft_s']:.3f} / {nc['ttft_s']:.3f} s, never {row['ttft_no_cudnn_anywhere_s']:.3f} s; "
                f"same tokens {row['same_tokens']}",
                flush=True,
            )
            out["rows"].append(row)
            gc.collect()
            torch.cuda.empty_cache()
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
