"""`tokensieve eval TASK`: accuracy and speed of methods on needle, RULER-style, LongBench, multi-turn and perplexity tasks.

Each run appends one JSON line per (sample, method) to ``OUT/<task>.jsonl``
(running the same command again resumes), prints a summary table, and writes
``OUT/report.md`` with plots under ``OUT/plots/``. Exit code 0 when every cell
ran, 1 when some cells failed (listed on stderr), 2 for bad input. See
docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from tokensieve.commands import common
from tokensieve.commands.common import (
    add_method_args,
    add_model_args,
    add_text_args,
    build_methods,
    load_drafts,
    parse_fractions,
    parse_size,
    parse_sizes,
    parse_text,
    positive_int,
)
from tokensieve.evaluation.harness import Task
from tokensieve.evaluation.needle import DEFAULT_EXPECTED, DEFAULT_NEEDLE, DEFAULT_QUESTION

TASKS = ("needle", "ruler", "longbench", "multiturn", "ppl")
SHOWN_FAILURES = 5  # failed cells listed on stderr at the end of a run (then a count)


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_common_args(p: argparse.ArgumentParser, task: str, lengths: list[int] | None, samples: int | None) -> None:
    p.set_defaults(prog=p.prog)
    add_model_args(p)
    add_method_args(p, multi=True)
    p.add_argument(
        "--lengths",
        type=parse_sizes,
        default=lengths,
        help="prompt lengths in tokens, e.g. 1k,2k,4k"
        + (
            f" (default {','.join(_short(n) for n in lengths)})"
            if lengths
            else " (LongBench: truncation budgets; default the model's maximum minus 512)"
        ),
    )
    if samples is not None:
        p.add_argument(
            "--samples",
            type=positive_int,
            default=samples,
            help=f"samples per length (and subtask) (default {samples})",
        )
    p.add_argument("--max-new-tokens", type=parse_size, default=None, help="answer budget (default: the task's)")
    p.add_argument("--allow-long", action="store_true", help="run prompts longer than the model's maximum length")
    p.add_argument("--out", default=f"runs/{task}", help=f"output folder (default runs/{task})")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--restart",
        action="store_true",
        help="set an existing results file aside (renamed <task>.<time>.jsonl) and start over",
    )
    g.add_argument(
        "--append", action="store_true", help="add to a results file written with another model or task configuration"
    )
    p.add_argument("--no-plots", action="store_true", help="skip the report and plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_text_args(p, "--haystack, --file and --data")


def _names(text: str) -> list[str]:
    names = _csv(text)
    if not names:
        raise argparse.ArgumentTypeError(f"expected at least one name, got {text!r}")
    return names


def _ruler_tasks(text: str) -> list[str]:
    from tokensieve.evaluation.ruler import RULER_TASKS

    names = _csv(text)
    bad = [t for t in names if t not in RULER_TASKS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown RULER subtask(s) {', '.join(bad) if bad else repr(text)}; "
            f"expected any of: {', '.join(RULER_TASKS)}"
        )
    return names


def _short(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of GiB >= 0 (0 disables the cache), got {text!r}")
    return value


def add_multiturn_args(p: argparse.ArgumentParser) -> None:
    from tokensieve.evaluation.multiturn import DEFAULT_TURNS

    add_common_args(p, "multiturn", [1024, 2048, 4096], 5)
    p.add_argument("--seed", type=int, default=0, help="seed of the generated conversations (default 0)")
    p.add_argument(
        "--turns",
        type=positive_int,
        default=DEFAULT_TURNS,
        help=f"facts in the document, one question per turn (default {DEFAULT_TURNS})",
    )
    p.add_argument("--haystack", default=None, help="text file for the document (default: the PG-19 books)")
    p.add_argument(
        "--prefix-cache-gib",
        type=_gib,
        default=1.0,
        help="prefix cache per conversation in GiB (default 1); 0 runs every turn without it",
    )
    p.set_defaults(func=run)


def add_needle_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p, "needle", [1024, 2048, 4096], None)
    p.add_argument(
        "--depths",
        type=parse_fractions,
        default=[0.0, 0.25, 0.5, 0.75, 1.0],
        help="needle depths in [0,1] (default 0,0.25,0.5,0.75,1)",
    )
    p.add_argument("--haystack", default=None, help="text file for the haystack (default: the PG-19 books)")
    p.add_argument(
        "--needle", type=parse_text, default=DEFAULT_NEEDLE, help="needle sentence (default: the GemFilter paper's)"
    )
    p.add_argument(
        "--question",
        type=parse_text,
        default=DEFAULT_QUESTION,
        help="question whose answer is in the needle (default: the paper's)",
    )
    p.add_argument(
        "--expected",
        default=",".join(DEFAULT_EXPECTED),
        help="comma-separated phrases a correct answer contains (default: sandwich,Dolores Park)",
    )
    p.set_defaults(func=run, task="needle")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        description="Run methods on an evaluation task; one JSON line per sample and method in OUT/<task>.jsonl "
        "(rerun the same command to resume), a summary table, OUT/report.md and plots.",
    )
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)

    add_needle_args(
        tasks.add_parser(
            "needle",
            help="needle-in-a-haystack grid (lengths x depths), heatmaps",
            description="Needle-in-a-haystack: the needle at each depth of a haystack of each length; scored by the expected phrases found in the answer; one heatmap per method.",
        )
    )

    r = tasks.add_parser(
        "ruler",
        help="RULER-style synthetic tasks generated from a seed",
        description="RULER-style tasks (needle retrieval variants, variable tracking, common/frequent words), generated to fit each length; scored by the fraction of expected items in the answer.",
    )
    add_common_args(r, "ruler", [1024, 2048, 4096], 5)
    from tokensieve.evaluation.ruler import KEY_TYPES, RULER_TASKS

    r.add_argument("--seed", type=int, default=0, help="seed of the generated samples (default 0)")
    r.add_argument(
        "--tasks", type=_ruler_tasks, default=list(RULER_TASKS), help=f"subtasks (default all: {','.join(RULER_TASKS)})"
    )
    r.add_argument("--haystack", default=None, help="text file for the essay haystack (default: the PG-19 books)")
    r.add_argument(
        "--haystack-kind",
        choices=["essay", "noise"],
        default="essay",
        help="needle tasks: essay text or RULER's repeated noise sentences (default essay)",
    )
    r.add_argument("--key-type", choices=KEY_TYPES, default="word", help="needle keys (default word)")
    r.add_argument("--value-type", choices=KEY_TYPES, default="number", help="needle values (default number)")
    r.add_argument("--num-keys", type=positive_int, default=4, help="niah_multikey: needles, one asked (default 4)")
    r.add_argument(
        "--num-values", type=positive_int, default=4, help="niah_multivalue: values of the one key (default 4)"
    )
    r.add_argument("--num-queries", type=positive_int, default=4, help="niah_multiquery: keys asked (default 4)")
    r.add_argument("--vt-chains", type=positive_int, default=1, help="vt: chains, one asked (default 1)")
    r.add_argument("--vt-hops", type=positive_int, default=4, help="vt: assignments after the first (default 4)")
    r.add_argument("--num-common", type=positive_int, default=10, help="cwe: common words to name (default 10)")
    r.add_argument("--fwe-alpha", type=float, default=2.0, help="fwe: Zipf exponent (default 2)")
    r.add_argument("--no-answer-prefix", action="store_true", help="do not start the answer with RULER's answer prefix")
    r.set_defaults(func=run)

    lb = tasks.add_parser(
        "longbench",
        help="LongBench-format data you supply (--data FILE.jsonl)",
        description="LongBench on your data file (fields input, context, answers, dataset): LongBench's templates, middle truncation to each length, and its metric per dataset.",
    )
    add_common_args(lb, "longbench", None, None)
    lb.add_argument(
        "--samples", type=positive_int, default=None, help="only the first N samples of each dataset (default all)"
    )
    lb.add_argument("--data", required=True, help="JSON-lines file in LongBench's format")
    lb.add_argument("--datasets", type=_names, default=None, help="only these datasets of the file (default all)")
    lb.set_defaults(func=run)

    add_multiturn_args(
        tasks.add_parser(
            "multiturn",
            help="several questions on one document in one conversation, through the prefix cache",
            description="Multi-turn (SCBench's multi-turn mode): a PG-19 document with --turns facts at distinct depths, "
            "one question per turn in one conversation (earlier questions and the model's answers stay in the "
            "chat); each turn reuses the document and earlier turns from the prefix cache where the method "
            "allows it. Scored per turn by the expected answer found; one line per conversation and method.",
        )
    )

    pp = tasks.add_parser(
        "ppl",
        help="perplexity of a text file (any method, or plain sliding windows)",
        description="Perplexity of a text: 'decode' mode prefills each window's start with the method and teacher-forces its last --score-tokens through the method's decoding; 'sliding' mode is plain strided perplexity (full attention only).",
    )
    add_common_args(pp, "ppl", [1024, 2048], 4)
    pp.add_argument("--file", default=None, help="text file (default: the PG-19 books)")
    pp.add_argument(
        "--mode",
        choices=["decode", "sliding"],
        default="decode",
        help="decode (default, any method) or sliding (full only)",
    )
    pp.add_argument(
        "--score-tokens", type=parse_size, default=64, help="decode mode: tokens scored per window (default 64)"
    )
    pp.add_argument("--stride", type=parse_size, default=None, help="sliding mode: window stride (default length/2)")
    pp.set_defaults(func=run)


def build_task(args: argparse.Namespace) -> Task:
    """The task object for parsed ``eval`` arguments; reads its text or data file (before any model loads).

    LongBench's default truncation budget needs the model: see :func:`run`.
    """
    from tokensieve.data import read_text
    from tokensieve.errors import InputError

    lengths = args.lengths
    name = args.task
    mnt = args.max_new_tokens
    enc = (args.encoding, args.encoding_errors)
    if name == "needle":
        from tokensieve.evaluation.needle import NeedleTask

        expected = _csv(args.expected)
        if not expected:
            raise InputError(
                f"--expected names no phrase: {args.expected!r}; expected comma-separated phrases, e.g. sandwich,Dolores Park"
            )
        hay = read_text(args.haystack, max(lengths) * 8, *enc)
        return NeedleTask(
            hay,
            lengths,
            args.depths,
            args.needle,
            args.question,
            expected,
            haystack_name=args.haystack or "pg19",
            max_new_tokens=mnt or 32,
        )
    if name == "ruler":
        from tokensieve.evaluation.ruler import RulerTask

        needs_text = args.haystack_kind == "essay" and any(t.startswith("niah") for t in args.tasks)
        hay = read_text(args.haystack, max(lengths) * 8, *enc) if needs_text else None
        return RulerTask(
            lengths,
            args.samples,
            args.seed,
            args.tasks,
            hay,
            args.haystack or "pg19",
            args.haystack_kind,
            args.key_type,
            args.value_type,
            args.num_keys,
            args.num_values,
            args.num_queries,
            args.vt_chains,
            args.vt_hops,
            args.num_common,
            args.fwe_alpha,
            not args.no_answer_prefix,
            mnt,
        )
    if name == "longbench":
        from tokensieve.evaluation.longbench import LongBenchTask

        return LongBenchTask(args.data, lengths, args.samples, args.datasets, mnt, *enc)
    if name == "multiturn":
        from tokensieve.evaluation.multiturn import MultiTurnTask

        hay = read_text(args.haystack, max(lengths) * 8, *enc)
        return MultiTurnTask(
            hay, lengths, args.samples, args.seed, args.turns, args.haystack or "pg19", mnt, args.prefix_cache_gib
        )
    if name == "ppl":
        from tokensieve.evaluation.ppl import PerplexityTask

        if args.mode == "sliding":
            other = [m for m in args.methods if m != "full"]
            if other:
                raise InputError(
                    f"--mode sliding is defined for full attention only, not {', '.join(other)}; "
                    f"use --methods full or --mode decode"
                )
        text = read_text(args.file, max(lengths) * (args.samples + 1) * 8, *enc)
        return PerplexityTask(
            text, lengths, args.samples, args.mode, args.score_tokens, args.stride, args.file or "pg19"
        )
    raise InputError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")


def run(args: argparse.Namespace) -> int:
    from tokensieve.evaluation.harness import lock_results_dir, run_eval
    from tokensieve.evaluation.report import build_report, load_results, markdown_table, summarize

    prog = getattr(args, "prog", f"tokensieve eval {args.task}")
    if not args.no_plots:
        from tokensieve.errors import require_extra

        require_extra("plots", f"{prog}'s report plots (or pass --no-plots)")  # before any cell runs

    def warn(message: str) -> None:
        print(f"{prog}: warning: {message}", file=sys.stderr)

    methods = build_methods(args)  # bad method options fail here, before the model loads
    task = build_task(args)  # ... and a missing, binary or undecodable text file here
    command = "tokensieve " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:]))
    ran: list[dict[str, Any]] = []
    with lock_results_dir(args.out) as out:  # another eval writing this folder: fail before the model loads
        model, tok = common.load(args)
        load_drafts(args, methods, model, tok)
        if args.task == "longbench":
            from tokensieve.methods.base import max_positions

            task.set_default_lengths(max_positions(model))
        path = run_eval(
            model,
            tok,
            task,
            methods,
            out,
            args.model,
            allow_long=args.allow_long,
            restart=args.restart,
            append=args.append,
            progress=not args.quiet,
            extra={"command": command},
            on_row=ran.append,
        )
        print(markdown_table(summarize(load_results([path], warn))))
        print(f"\nresults: {path}")
        if not args.no_plots:
            report = out / "report.md"
            report.write_text(build_report(load_results([out], warn), out / "plots", link_base=out))
            print(f"report:  {report} (plots in {out / 'plots'})")
    failed = [r for r in ran if r.get("error")]
    if failed:
        print(
            f"{prog}: {len(failed)} of {len(ran)} cell(s) failed (recorded in {path}; retried on the next run):",
            file=sys.stderr,
        )
        for r in failed[:SHOWN_FAILURES]:
            print(f"  {r['method']} {r['key']}: {r['error']}", file=sys.stderr)
        if len(failed) > SHOWN_FAILURES:
            print(f"  ... and {len(failed) - SHOWN_FAILURES} more", file=sys.stderr)
        return 1
    return 0
