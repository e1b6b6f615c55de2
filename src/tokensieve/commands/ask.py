"""`tokensieve ask`: answer a question about a document with any method."""

from __future__ import annotations

import argparse

from tokensieve.commands import common
from tokensieve.commands.common import (
    add_method_args,
    add_model_args,
    add_text_args,
    build_methods,
    fmt_bytes,
    load_drafts,
    parse_size,
    parse_text,
    print_json,
)
from tokensieve.data import DEFAULT_MAX_INPUT_BYTES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ask",
        description="Answer a question about a document (chat template applied) and print the answer with timing, memory and tokens kept.",
    )
    p.add_argument(
        "--file", required=True, help="document to read: a regular file, or '-' for stdin (at most --max-input-bytes)"
    )
    p.add_argument("--question", required=True, type=parse_text, help="question about the document")
    add_text_args(p, "the document")
    add_model_args(p)
    add_method_args(p)
    p.add_argument("--max-new-tokens", type=parse_size, default=64, help="tokens to generate at most (default 64)")
    p.add_argument(
        "--max-input-bytes",
        type=parse_size,
        default=DEFAULT_MAX_INPUT_BYTES,
        help="with --file -: read at most this much of standard input; more is an error (default 64M)",
    )
    p.add_argument("--allow-long", action="store_true", help="run prompts longer than the model's maximum length")
    p.add_argument(
        "--show-selection",
        action="store_true",
        help="print the prompt text the method kept, with [...] for dropped spans",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokensieve.data import read_document
    from tokensieve.errors import InputError

    doc = read_document(args.file, args.encoding, args.encoding_errors, max_stdin_bytes=args.max_input_bytes)
    if not doc.strip():
        raise InputError(f"the document {'on standard input' if args.file == '-' else args.file} is empty")
    (method,) = build_methods(args)
    model, tok = common.load(args)
    load_drafts(args, [method], model, tok)
    import sys

    from tokensieve.engine.detokenize import TextStream
    from tokensieve.engine.runner import encode_prompt, generate, selection_text

    messages = [
        {"role": "user", "content": f"{doc}\n\nAnswer the question from the text above.\nQuestion: {args.question}"}
    ]
    stream = TextStream(lambda ids: tok.decode(ids, skip_special_tokens=True))
    streamed: list[str] = []

    def on_token(token_id: int) -> None:  # the answer goes to the terminal as it is generated (not with --json)
        piece = stream.push(token_id)
        if not streamed:
            piece = piece.lstrip()
        if piece:
            streamed.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()

    res = generate(
        model,
        tok,
        messages,
        method=method,
        max_new_tokens=args.max_new_tokens,
        allow_long=args.allow_long,
        on_token=None if args.json else on_token,
    )
    out = res.to_dict()
    out.pop("token_ids")
    out["answer"] = out.pop("text")
    out["model"] = args.model
    if args.show_selection and res.kept_indices is not None:
        out["kept_text"] = selection_text(tok, encode_prompt(tok, messages), res.kept_indices)
    if args.json:
        if not args.show_selection:
            out.pop("kept_indices")
        print_json(out)
        return 0
    tail = stream.finish()  # text held back until the end (an incomplete character)
    print(tail.rstrip() if streamed else tail.strip())
    print()
    rows = [
        ("method", res.method),
        ("model", args.model),
        ("prompt tokens", res.prompt_tokens),
        ("kept tokens", res.kept_tokens),
        ("KV kept", "-" if res.kv_kept is None else f"{res.kv_kept} entries (the fullest layer)"),
        ("TTFT", f"{res.ttft_s:.3f} s"),
        ("decode", f"{res.decode_tokens_per_s:.1f} tok/s" if res.decode_tokens_per_s else "-"),
        ("peak memory", fmt_bytes(res.peak_memory_bytes)),
        (
            "KV after prefill",
            f"{res.kv_tokens_prefill[0] if res.kv_tokens_prefill else 0} tokens/layer, {fmt_bytes(res.kv_bytes_prefill)}",
        ),
    ]
    for k, v in rows:
        print(f"{k:>17}: {v}")
    if "kept_text" in out:
        print("\n--- kept text ---")
        print(out["kept_text"])
    return 0
