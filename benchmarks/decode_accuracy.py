"""Is the static decoding step as accurate as the eager one? Both in bf16 against a float32 reference.

On random weights in a real shape, greedy tokens of two bf16 paths part ways within a few steps
(the logits are near-ties), so token identity says little. This compares the logits of the first
``--steps`` teacher-forced decoding steps after one prefill:

* eager bf16 (the method's own step: DynamicCache + SDPA),
* static bf16 (tokensieve.decode.static: static buffers, float32 scores, no graph; the graph replays the same kernels),
* the reference: the same model cast to float32, eager.

Prints and writes ``||path - ref|| / ||ref||`` per step and whether each path's argmax equals the
reference's. Usage: ``PYTHONPATH=src python3 benchmarks/decode_accuracy.py --length 8192 --out $OUT/acc.json``
"""

from __future__ import annotations

import argparse
import json

import torch

from tokensieve.bench.timing import build_model, environment
from tokensieve.decode.static import StaticDecoder, bucket
from tokensieve.methods import make_method
from tokensieve.methods.base import cache_stats

PARAMS = {"full": {}, "gemfilter": {"topk": 1024, "filter_layer": 13}, "snapkv": {"budget": 1024}}


@torch.inference_mode()
def logits_along(model, ids: torch.Tensor, name: str, forced: torch.Tensor, static: bool) -> torch.Tensor:
    """Logits [steps, vocab] (float32) of the steps feeding ``forced`` after prefilling ``ids``."""
    m = make_method(name, **PARAMS[name])
    state = m.prefill(model, ids)
    out = []
    dec = None
    if static:
        dec = StaticDecoder(model, bucket(max(cache_stats(state.cache)[0]) + len(forced)), use_graph=False)
        dec.load(state.cache, state.next_position, len(forced))
        state.cache = None
    for t in forced:
        tok = t.view(1, 1).to(model.device)
        out.append((dec.step(tok) if dec is not None else m.step(model, state, tok)).float().clone())
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3.1-8b")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--methods", default="full,gemfilter,snapkv")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    model = build_model(args.shape, torch.bfloat16, dev)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.length), generator=torch.Generator().manual_seed(1)).to(dev)
    forced = torch.randint(0, vocab, (args.steps,), generator=torch.Generator().manual_seed(2))
    names = args.methods.split(",")
    paths = {
        n: {"eager": logits_along(model, ids, n, forced, False), "static": logits_along(model, ids, n, forced, True)}
        for n in names
    }
    model.float()  # the reference: the same weights in float32
    torch.cuda.empty_cache()
    res = {"shape": args.shape, "length": args.length, "steps": args.steps, "environment": environment(dev), "rows": []}
    for n in names:
        ref = logits_along(model, ids, n, forced, False)
        row = {"method": n}
        for p, x in paths[n].items():
            err = ((x - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist()
            agree = (x.argmax(-1) == ref.argmax(-1)).tolist()
            row[p] = {"rel_error_per_step": err, "top1_agrees_with_fp32": agree}
            print(
                f"{n:>10} {p:>6}: rel error vs fp32 {max(err):.2e} (max over {args.steps} steps), "
                f"top-1 agrees {sum(agree)}/{len(agree)}",
                flush=True,
            )
        row["eager_vs_static_rel_error"] = (
            (paths[n]["static"] - paths[n]["eager"]).norm(dim=-1) / paths[n]["eager"].norm(dim=-1)
        ).tolist()
        res["rows"].append(row)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
