"""`tokensieve calibrate`: find a GemFilter filter layer (and scoring) for a model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokensieve.commands import common
from tokensieve.commands.common import (
    add_model_args,
    add_text_args,
    parse_floats,
    parse_size,
    parse_sizes,
    print_json,
)
from tokensieve.errors import InputError

DEFAULT_WINDOW_SIZE = 16  # GemFilter's default window_size (a test keeps the two equal; no torch at parse time)
DEFAULT_N_INITIAL = 4  # GemFilter's default n_initial (a test keeps the two equal)
SCORING_NAMES = ("paper", "window")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        description=(
            "Measure, for every layer and both scorings ('paper': q_last . k; 'window': softmax attention of the "
            "last --window-size queries), the fraction of needle tokens inside GemFilter's top-k selection on "
            "generated needle prompts; print the recall per layer and the chosen layer. With --local-windows, "
            "also the recall of GemFilter's local filter pass (filter_attention=local: layers below the filter "
            "layer see only the first --n-initial tokens and the last w) for each w, and the smallest w within "
            "0.02 of dense at the chosen layer."
        ),
    )
    add_model_args(p)
    p.add_argument(
        "--filter-model",
        default=None,
        metavar="NAME|PATH",
        help="calibrate this draft model for --model instead of --model itself: its tokenizer is checked against "
        "--model's (only --model's tokenizer is loaded), every layer of the draft is measured, its last "
        "layer included (a draft may run all its layers)",
    )
    p.add_argument("--lengths", type=parse_sizes, default=[2048, 4096], help="prompt lengths (default 2k,4k)")
    p.add_argument(
        "--depths", type=parse_floats, default=[0.1, 0.3, 0.5, 0.7, 0.9], help="needle depths (default 0.1,...,0.9)"
    )
    p.add_argument("--topk", type=parse_size, default=1024, help="selection size (default 1024)")
    p.add_argument(
        "--window-size",
        type=int,
        default=DEFAULT_WINDOW_SIZE,
        help=f"GemFilter window_size: scoring queries of the 'window' scoring (default {DEFAULT_WINDOW_SIZE})",
    )
    p.add_argument(
        "--scorings", default=",".join(SCORING_NAMES), help="comma-separated scorings to measure (default paper,window)"
    )
    p.add_argument(
        "--local-windows",
        type=parse_sizes,
        default=[],
        help="recent windows w of the local filter pass to measure, e.g. 256,1024,4096 (default: none)",
    )
    p.add_argument(
        "--n-initial",
        type=int,
        default=DEFAULT_N_INITIAL,
        help=f"sink tokens of the local filter pass (default {DEFAULT_N_INITIAL})",
    )
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
    scorings = tuple(x.strip() for x in args.scorings.split(",") if x.strip())
    if not scorings or any(x not in SCORING_NAMES for x in scorings):
        raise InputError(f"--scorings must be a comma-separated subset of {SCORING_NAMES}, got {args.scorings!r}")
    if args.n_initial < 0:
        raise InputError(f"--n-initial must be >= 0, got {args.n_initial}")
    if any(w < 1 for w in args.local_windows):
        raise InputError(f"--local-windows must be positive, got {args.local_windows}")
    if args.filter_model is not None and (
        not args.filter_model.strip() or args.filter_model != args.filter_model.strip()
    ):
        raise InputError(f"--filter-model: expected a model name or path, got {args.filter_model!r}")
    if args.filter_model is None:
        model, tok = common.load(args)
    else:
        from tokensieve.commands.common import announce_loading
        from tokensieve.core.draft import check_same_tokenizer
        from tokensieve.core.models import load_model, load_tokenizer

        announce_loading(args, args.filter_model)
        tok = load_tokenizer(args.model)
        model, draft_tok = load_model(args.filter_model, dtype=args.dtype, device=args.device)
        check_same_tokenizer(tok, draft_tok)
    hay = read_text(args.haystack, min_chars=max(args.lengths) * 8, encoding=args.encoding, errors=args.encoding_errors)
    cal = calibrate(
        model,
        tok,
        hay,
        args.lengths,
        args.depths,
        topk=args.topk,
        window_size=args.window_size,
        scorings=scorings,
        local_windows=args.local_windows,
        n_initial=args.n_initial,
    )
    res = cal.to_dict() | {"model": args.model, "filter_model": args.filter_model}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    if args.json:
        print_json(res)
        return 0
    print(
        f"needle recall of the top-{args.topk} selection per layer (mean over {len(args.lengths) * len(args.depths)} prompts)"
    )
    cols = [(s, cal.recall[s]) for s in cal.recall] + [
        (f"{s}@w{w}", cal.local_recall[w][s]) for w in cal.local_recall for s in cal.local_recall[w]
    ]
    width = max(7, *(len(name) for name, _ in cols))
    print("layer " + " ".join(f"{name:>{width}}" for name, _ in cols))
    for i in range(len(cols[0][1])):
        print(f"{i:>5} " + " ".join(f"{vals[i]:{width}.2f}" for _, vals in cols))
    extra = (
        f" --param window_size={cal.window_size}"
        if cal.best_scoring == "window" and cal.window_size != DEFAULT_WINDOW_SIZE
        else ""
    )
    draft = f"--filter-model {args.filter_model} " if args.filter_model else ""
    print(f"chosen: {draft}--filter-layer {cal.best_layer} --scoring {cal.best_scoring}{extra}")
    last = len(cols[0][1]) - 1
    print(
        f"last layer {last}: recall {cal.last_layer_recall:.2f} ({cal.last_layer_gain:+.2f} against layer {cal.best_layer}"
        + ("; it is the chosen layer)" if cal.best_layer == last else ")")
    )
    print(
        f"\nanswer tokens kept by each span rule at layer {cal.best_layer} (top-{args.topk}; whole: the whole answer kept)"
    )
    for label, r in cal.span_recall.items():
        print(f"  {label:>10}  recall {r['answer_recall']:.2f}  whole {r['answer_whole']:.2f}")
    sp = cal.suggested_span
    print(f"span rule: --param kernel={sp['kernel']} --param pooling={sp['pooling']} --param dilation={sp['dilation']}")
    if cal.local_windows:
        if cal.suggested_window is None:
            print(
                f"local filter pass: no window in {cal.local_windows} is within 0.02 of dense at layer {cal.best_layer}: "
                "keep --param filter_attention=dense"
            )
        else:
            print(
                f"local filter pass: --param filter_attention=local --param n_recent={cal.suggested_window} "
                f"--param n_initial={cal.n_initial} (smallest window within 0.02 of dense at layer {cal.best_layer})"
            )
    return 0
