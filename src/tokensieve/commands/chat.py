"""`tokensieve chat`: load a model and a document once, then answer questions from standard input.

The document is computed once (its state kept in a prefix cache, ``tokensieve.engine.prefix_cache``); each
question then runs only its own tokens on top of it (full attention, SnapKV; GemFilter also reuses its
filter pass), so answers after the first come much faster. Answers stream as they are generated.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from tokensieve.commands.common import (
    add_method_args,
    add_model_args,
    add_text_args,
    build_methods,
    load,
    load_drafts,
    parse_size,
)

INSTRUCTION = "Answer the question from the text above."


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _gib(text: str) -> float:
    value = _float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of GiB >= 0 (0 disables the cache), got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=_float, default=0.0, help="0 (default) is greedy; > 0 samples")
    p.add_argument(
        "--top-p",
        type=_float,
        default=1.0,
        help="nucleus sampling: keep the smallest set reaching this probability (default 1)",
    )
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: no limit)")
    p.add_argument("--seed", type=_seed, default=None, help="seed for reproducible sampling")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        description=(
            "Ask questions about a document, one per line on standard input (prompt '> '; EOF or /exit ends). "
            "The model and the document are computed once; each answer streams and reports its TTFT."
        ),
    )
    p.add_argument("--file", required=True, help="document to read")
    p.add_argument("--system", default=None, help="system message (default: none)")
    add_text_args(p, "the document")
    add_model_args(p)
    add_method_args(p)
    add_sampling_args(p)
    p.add_argument(
        "--max-new-tokens", type=parse_size, default=128, help="tokens to generate per answer at most (default 128)"
    )
    p.add_argument(
        "--prefix-cache-gib", type=_gib, default=1.0, help="prefix cache size in GiB (default 1; 0 disables it)"
    )
    p.add_argument("--allow-long", action="store_true", help="run prompts longer than the model's maximum length")
    p.set_defaults(func=run)


def messages_for(doc: str, question: str, system: str | None) -> list[dict[str, str]]:
    out = [{"role": "system", "content": system}] if system else []
    return out + [{"role": "user", "content": f"{doc}\n\n{INSTRUCTION}\nQuestion: {question}"}]


def run(args: argparse.Namespace) -> int:
    from tokensieve.data import read_document
    from tokensieve.engine.runner import Sampling
    from tokensieve.errors import InputError

    if args.file == "-":
        raise InputError("--file - is not possible here: standard input carries the questions; give a file")
    doc = read_document(args.file, args.encoding, args.encoding_errors)
    if not doc.strip():
        raise InputError(f"the document {args.file} is empty")
    if args.system is not None and not args.system.strip():
        raise InputError("--system is empty; give a text or leave it out")
    (method,) = build_methods(args)
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    model, tok = load(args)
    load_drafts(args, [method], model, tok)

    import time

    from tokensieve.engine.detokenize import TextStream
    from tokensieve.engine.prefix_cache import PrefixReuse, chat_prefix_tokens, refusal_on, store_for_gib
    from tokensieve.engine.runner import encode_prompt, generate, prepare

    store = store_for_gib(args.prefix_cache_gib)
    why = None
    if store is not None:
        why = refusal_on(model, method)
        if why is not None:
            print(
                f"tokensieve chat: note: no prefix cache: {why}; every question recomputes the document",
                file=sys.stderr,
            )
            store = None

    def method_for(msgs: list[dict[str, str]], ids) -> object:
        fresh = dataclasses.replace(method)  # a new instance with the same parameters (a loaded draft model kept)
        if store is None:
            return fresh
        return PrefixReuse(fresh, store, chat_prefix_tokens(tok, msgs, ids))

    # Compute the document now, with a placeholder question: its prefix is the same for every question.
    probe = messages_for(doc, "?", args.system)
    ids = encode_prompt(tok, probe)
    run_ = prepare(model, tok, ids, method_for(probe, ids), args.allow_long)
    if isinstance(run_.method, PrefixReuse):
        t0 = time.perf_counter()
        held = run_.method.warm(model, run_.input_ids)
        print(f"document: {held} prompt tokens computed once, in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    else:
        print(f"document: about {ids.shape[1]} tokens", file=sys.stderr)

    interactive = sys.stdin.isatty()
    while True:
        sys.stdout.write("> ")
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            if interactive:
                sys.stdout.write("\n")
            break
        question = line.strip()
        if not question:
            continue
        if question == "/exit":
            break
        msgs = messages_for(doc, question, args.system)
        stream = TextStream(lambda t: tok.decode(t, skip_special_tokens=True))

        def on_token(token_id: int) -> None:
            sys.stdout.write(stream.push(token_id))
            sys.stdout.flush()

        try:
            q_ids = encode_prompt(tok, msgs)
            res = generate(
                model,
                tok,
                q_ids,
                method=method_for(msgs, q_ids),
                max_new_tokens=args.max_new_tokens,
                allow_long=args.allow_long,
                sampling=sampling,
                on_token=on_token,
            )
        except InputError as exc:
            print(f"tokensieve chat: error: {' '.join(str(exc).split())}", file=sys.stderr)
            continue
        sys.stdout.write(stream.finish() + "\n")
        sys.stdout.flush()
        cached = res.details.get("prefix_cached_tokens", 0)
        print(
            f"[TTFT {res.ttft_s:.3f} s; {cached} of {res.prompt_tokens} prompt tokens from the prefix cache; "
            f"{res.kept_tokens} kept; {res.generated_tokens} generated]",
            file=sys.stderr,
        )
    return 0
