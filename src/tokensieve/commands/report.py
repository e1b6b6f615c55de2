"""`tokensieve report DIR`: a markdown comparison table and plots from result files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        description="Turn result files of `tokensieve eval` (folders are searched for *.jsonl, except the files "
        "--restart set aside, <task>.<time>.jsonl) into a markdown table "
        "(accuracy with its 95% interval and the paired difference to full, perplexity, TTFT, peak memory, KV kept, "
        "per model, task, method and length), an "
        "accuracy breakdown by subtask/dataset, an accuracy-vs-TTFT plot and needle heatmaps.",
    )
    p.add_argument("paths", nargs="+", metavar="DIR", help="result folders or .jsonl files")
    p.add_argument("--out", default=None, help="write the markdown here (default: print it; plots go beside it)")
    p.add_argument(
        "--plots", default=None, help="folder for the plots (default: plots/ beside --out, else the first DIR's plots/)"
    )
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument(
        "--paired",
        action="store_true",
        help="compare methods on the same prompts: keep only samples every method scored at that length",
    )
    p.add_argument(
        "--no-timing",
        action="store_true",
        help="leave out TTFT and the accuracy-vs-TTFT plot (runs timed under different load)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokensieve.errors import InputError
    from tokensieve.evaluation.report import build_report, load_results

    def warn(message: str) -> None:
        print(f"tokensieve report: warning: {message}", file=sys.stderr)

    if not args.no_plots:
        from tokensieve.errors import require_extra

        require_extra("plots", "tokensieve report's plots (or pass --no-plots)")
    rows = load_results(args.paths, warn)
    if not rows:
        raise InputError(f"no result lines in {', '.join(args.paths)}")
    first = Path(args.paths[0])
    base = Path(args.out).parent if args.out else (first if first.is_dir() else first.parent)
    plot_dir = None if args.no_plots else Path(args.plots) if args.plots else base / "plots"
    md = build_report(rows, plot_dir, link_base=base, paired=args.paired, timing=not args.no_timing)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(md)
        print(f"wrote {args.out}" + (f" (plots in {plot_dir})" if plot_dir else ""))
    else:
        print(md, end="")
    return 0
