"""`tokensieve stream`: streaming perplexity over a long text with a bounded, position-shifted KV cache."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tokensieve.commands import common
from tokensieve.commands.common import MB, add_model_args, add_text_args, parse_size, print_json
from tokensieve.errors import InputError

# Old flag -> current flag; the old ones still work for one release, with a deprecation line.
DEPRECATED_FLAGS: tuple[tuple[str, str], ...] = (
    ("--init-size", "--n-initial"),
    ("--sep-size", "--n-separators"),
    ("--window", "--n-recent"),
    ("--cache-size", "--budget"),
)

DEFAULT_BOOK = "2544.txt"  # the longest PG-19 book shipped in shared/data/pg19 (~90k SmolLM2 tokens)


# The streaming policies' names (tokensieve.engine.streaming.POLICIES; a test keeps the two equal), here so that
# building the parser imports no torch.
STREAM_METHODS = ("sepllm", "streamingllm", "full")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stream",
        description=(
            "Feed a text far longer than the model's context through the model in chunks, keeping a bounded KV "
            "cache of --budget entries per layer (SepLLM's SepCache: --n-initial + --n-separators + --n-recent; "
            "StreamingLLM: --n-initial sinks + --n-recent recent tokens) with positions shifted inside the cache, "
            "and report running perplexity, tokens/s and cache size. Each chunk's tokens attend to the cache "
            "and to the earlier tokens of the chunk; eviction runs between chunks (--chunk-size 1 is token by token). "
            "Full attention stops at the model's maximum length unless --allow-long. Ctrl-C or SIGTERM stops the "
            'stream after the chunk being fed and writes what was computed (the JSON says "interrupted": true; '
            "exit code 130 or 143); a second one stops at once."
        ),
    )
    add_model_args(p)
    p.add_argument("--method", choices=list(STREAM_METHODS), default="sepllm", help="cache policy (default: sepllm)")
    p.add_argument(
        "--file", default=None, help="text file to stream (default: the longest PG-19 book in shared/data/pg19)"
    )
    p.add_argument("--chunk-size", type=int, default=64, help="tokens fed per forward (default 64; 1 = token by token)")
    p.add_argument(
        "--max-tokens",
        type=parse_size,
        default=None,
        help="stop after this many tokens, e.g. 64k (default: whole text)",
    )
    p.add_argument("--n-initial", type=int, default=None, help="a: initial / attention-sink tokens kept (default 4)")
    p.add_argument("--n-separators", type=int, default=None, help="s: separator tokens kept, SepLLM only (default 64)")
    p.add_argument(
        "--n-recent",
        type=int,
        default=None,
        help="w: recent tokens kept: SepLLM's local window (default 256), StreamingLLM's recent window (default budget - n-initial)",
    )
    p.add_argument("--budget", type=int, default=None, help="c: KV entries per layer between chunks (default 800)")
    for old, _new in DEPRECATED_FLAGS:  # hidden; one deprecation line on stderr when used
        p.add_argument(old, dest=_old_dest(old), type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--allow-long",
        action="store_true",
        help="full attention: run past the model's maximum position (to show the breakdown)",
    )
    p.add_argument(
        "--ppl-window", type=int, default=1024, help="tokens per point of the windowed perplexity curve (default 1024)"
    )
    p.add_argument(
        "--plot",
        default=None,
        help="PNG of perplexity and KV memory vs tokens seen (default runs/stream/<method>.png; '' for none)",
    )
    p.add_argument("--json", action="store_true", help="print the final numbers as JSON")
    add_text_args(p, "the text")
    p.set_defaults(func=run)


def _default_file() -> Path:
    from tokensieve.data import default_pg19_dir

    path = default_pg19_dir() / DEFAULT_BOOK
    if not path.is_file():
        raise InputError(f"no default text ({path} is missing); pass a text file with --file PATH")
    return path


def _old_dest(flag: str) -> str:
    return "deprecated_" + flag.lstrip("-").replace("-", "_")


def _new_dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def apply_deprecated_flags(args: argparse.Namespace) -> None:
    """Move the values of old flags to their current names, with one deprecation line on stderr per old flag."""
    for old, new in DEPRECATED_FLAGS:
        value = getattr(args, _old_dest(old), None)
        if value is None:
            continue
        print(
            f"tokensieve stream: {old} is deprecated, use {new} (the old flag goes in the next release)",
            file=sys.stderr,
        )
        if getattr(args, _new_dest(new), None) is not None:
            raise InputError(f"give {new} or its old name {old}, not both")
        setattr(args, _new_dest(new), value)
        setattr(args, _old_dest(old), None)


def policy_params(args: argparse.Namespace) -> dict:
    params = {"n_initial": args.n_initial, "budget": args.budget}
    if args.method == "sepllm":
        params.update(n_separators=args.n_separators, n_recent=args.n_recent)
    elif args.method == "streamingllm":
        params.update(n_recent=args.n_recent)
        if args.n_separators is not None:
            raise InputError("--n-separators applies to --method sepllm only")
    elif any(v is not None for v in (args.n_initial, args.budget, args.n_separators, args.n_recent)):
        raise InputError(
            "--n-initial/--n-separators/--n-recent/--budget do not apply to --method full (it keeps every token)"
        )
    return params if args.method != "full" else {}


class StopRequest:
    """Ctrl-C (SIGINT) and SIGTERM while a stream runs: the first asks it to stop after the current chunk
    (``reason``, read by ``stream_perplexity``'s ``should_stop``), the second stops at once (``KeyboardInterrupt``)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.signum: int | None = None

    def __call__(self) -> str | None:
        return self.reason

    def handle(self, signum: int, frame: object) -> None:
        if self.reason is not None:
            raise KeyboardInterrupt
        self.signum, self.reason = signum, f"interrupted ({signal.Signals(signum).name})"
        print(
            f"\ntokensieve stream: {signal.Signals(signum).name}: stopping after this chunk and writing what was "
            "computed (again to stop at once)",
            file=sys.stderr,
            flush=True,
        )


@contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[StopRequest]:
    """``stop`` handles SIGINT and SIGTERM inside the block (main thread only; the old handlers come back after)."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    old = {s: signal.signal(s, stop.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tokensieve.data import read_document
    from tokensieve.engine.streaming import make_policy

    apply_deprecated_flags(args)
    if args.chunk_size < 1:
        raise InputError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    policy = make_policy(args.method, **policy_params(args))  # bad sizes fail before the model loads
    plot = f"runs/stream/{args.method}.png" if args.plot is None else args.plot
    if plot:
        from tokensieve.errors import require_extra

        require_extra("plots", "tokensieve stream's plot (or pass --plot '')")
    path = Path(args.file) if args.file else _default_file()
    text = read_document(path, args.encoding, args.encoding_errors)
    if args.max_tokens:
        text = text[: args.max_tokens * 12]  # plenty of characters; tokenizing a whole huge file is slow
    model, tok = common.load(args)
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    total = min(ids.numel(), args.max_tokens or ids.numel())
    bar = tqdm(total=total, desc=f"stream {args.method}", unit="tok", file=sys.stderr)

    def progress(point, done: int) -> None:
        bar.update(done - bar.n)
        bar.set_postfix(
            ppl=f"{point.running_ppl:.2f}",
            tok_s=f"{point.tokens_per_s:.0f}",
            cache=point.cache_entries,
            kv=f"{point.kv_bytes / MB:.1f}MiB",
            refresh=False,
        )

    from tokensieve.evaluation.stream_ppl import stream_perplexity

    with stop_on_signals(StopRequest()) as stop:
        res = stream_perplexity(
            model,
            ids,
            policy,
            chunk_size=args.chunk_size,
            max_tokens=args.max_tokens,
            allow_long=args.allow_long,
            ppl_window=args.ppl_window,
            progress=progress,
            tokenizer=tok,
            should_stop=stop,
        )
    bar.close()
    if res.stopped not in ("end of text",) and not res.stopped.startswith("max_tokens"):
        print(f"tokensieve stream: stopped: {res.stopped}", file=sys.stderr)
    if plot:
        from tokensieve.evaluation.plots import plot_stream

        plot_stream([res], plot, f"{args.method} on {args.model}, {path.name}, chunk {args.chunk_size}")
    summary = res.to_dict()
    summary.update(model=args.model, file=str(path), plot=plot or None)
    if args.json:
        print_json(summary)
        return 128 + stop.signum if res.interrupted and stop.signum else 0
    ppl = "-" if res.perplexity is None else f"{res.perplexity:.3f}"
    print(
        f"{res.method}: {res.tokens_seen} tokens, perplexity {ppl}, {res.tokens_per_s:.0f} tok/s, "
        f"cache <= {res.max_cache_entries} entries/layer (mean {res.mean_cache_entries:.0f}), "
        f"KV <= {res.max_kv_bytes / MB:.1f} MiB, max position {res.max_position_used} (model max {res.model_max_positions})"
    )
    if plot:
        print(f"wrote {plot}")
    return 128 + stop.signum if res.interrupted and stop.signum else 0
