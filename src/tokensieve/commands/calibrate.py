"""`tokensieve calibrate`: find a GemFilter filter layer (and scoring) for a model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokensieve.commands.common import add_model_args, add_text_args, load, parse_floats, parse_size, parse_sizes, print_json
from tokensieve.errors import InputError

DEFAULT_WINDOW_SIZE = 16  # GemFilter's default window_size (a test keeps the two equal; no torch at parse time)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        description=(
            "Measure, for every layer and both scorings ('paper': q_last . k; 'window': softmax attention of the "
            "last --window-size queries), the fraction of needle tokens inside GemFilter's top-k selection on "
            "generated needle prompts; print the recall per layer and the chosen layer."
        ),
    )
    add_model_args(p)
    p.add_argument("--lengths", type=parse_sizes, default=[2048, 4096], help="prompt lengths (default 2k,4k)")
    p.add_argument("--depths", type=parse_floats, default=[0.1, 0.3, 0.5, 0.7, 0.9], help="needle depths (default 0.1,...,0.9)")
    p.add_argument("--topk", type=parse_size, default=1024, help="selection size (default 1024)")
    p.add_argument("--window-size", type=int, default=DEFAULT_WINDOW_SIZE, help=f"GemFilter window_size: scoring queries of the 'window' scoring (default {DEFAULT_WINDOW_SIZE})")
    p.add_argument("--haystack", default=None, help="text file for the haystack (default: PG-19 books)")
    add_text_args(p, "the haystack file")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokensieve.data import read_text
    from tokensieve.evaluation.calibrate import calibrate

    if args.window_size < 1:
        raise InputError(f"--window-size must be >= 1, got {args.window_size}")
    model, tok = load(args)
    hay = read_text(args.haystack, min_chars=max(args.lengths) * 8, encoding=args.encoding, errors=args.encoding_errors)
    cal = calibrate(model, tok, hay, args.lengths, args.depths, topk=args.topk, window_size=args.window_size)
    res = cal.to_dict() | {"model": args.model}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    if args.json:
        print_json(res)
        return 0
    print(f"needle recall of the top-{args.topk} selection per layer (mean over {len(args.lengths) * len(args.depths)} prompts)")
    print("layer " + " ".join(f"{s:>7}" for s in cal.recall))
    for i in range(len(next(iter(cal.recall.values())))):
        print(f"{i:>5} " + " ".join(f"{cal.recall[s][i]:7.2f}" for s in cal.recall))
    extra = f" --param window_size={cal.window_size}" if cal.best_scoring == "window" and cal.window_size != DEFAULT_WINDOW_SIZE else ""
    print(f"chosen: --filter-layer {cal.best_layer} --scoring {cal.best_scoring}{extra}")
    return 0
