"""Needle recall of GemFilter's local filter pass next to the dense one, on the embedded models (CPU).

Behind GemFilter's ``filter_attention`` default (docs/gemfilter.md, "Local filter pass"). For each
model, length and window ``w``: mean recall of the needle tokens inside the top-``topk`` selection at
every layer, "window" scoring (the default), ``n_initial`` = 4 sinks; one JSON per model and length
under benchmarks/results/local_recall/ (written as soon as it finishes, so a cut-off run keeps what
finished).

Command (CPU, 2 threads; the lengths are modest because CPU time was limited):
    OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python benchmarks/local_recall.py --model smollm2 --lengths 2048,4096,8192
    OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python benchmarks/local_recall.py --model gemma3-270m --lengths 4096,8192
Equivalent CLI: tokensieve calibrate --model smollm2 --lengths 8192 --scorings window --local-windows 256,1024,4096
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import tokensieve
from tokensieve.commands.common import parse_floats, parse_sizes
from tokensieve.data import read_text
from tokensieve.evaluation.calibrate import calibrate
from tokensieve.methods.gemfilter import default_filter_layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--lengths", type=parse_sizes, default=[2048, 4096, 8192])
    ap.add_argument("--depths", type=parse_floats, default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--windows", type=parse_sizes, default=[256, 1024, 4096])
    ap.add_argument("--topk", type=int, default=1024)
    ap.add_argument("--n-initial", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/local_recall")
    args = ap.parse_args()
    model, tok = tokensieve.load_model(args.model)
    r = default_filter_layer(model)
    hay = read_text(None, min_chars=max(args.lengths) * 8)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for n in args.lengths:
        t0 = time.time()
        cal = calibrate(
            model,
            tok,
            hay,
            [n],
            args.depths,
            topk=args.topk,
            scorings=("window",),
            progress=False,
            local_windows=args.windows,
            n_initial=args.n_initial,
        )
        res = cal.to_dict() | {"model": args.model, "filter_layer": r, "seconds": round(time.time() - t0, 1)}
        res["at_filter_layer"] = {"dense": cal.recall["window"][r]} | {
            f"local_w{w}": cal.local_recall[w]["window"][r] for w in cal.local_recall
        }
        (out / f"{args.model}_{n}.json").write_text(json.dumps(res, indent=1))
        print(args.model, n, res["at_filter_layer"], f"{res['seconds']} s", flush=True)


if __name__ == "__main__":
    main()
