"""`tokensieve chat`: load a model and a document once, then answer questions from standard input.

The document is computed once (its state kept in a prefix cache, ``tokensieve.engine.prefix_cache``); each
question then runs only its own tokens on top of it (full attention, SnapKV; GemFilter also reuses its
filter pass), so answers after the first come much faster. Answers stream as they are generated.

On a terminal the prompt has line editing and history (the standard library's ``readline``, where the platform
has it). Ctrl-C during an answer stops that answer only; Ctrl-C or Ctrl-D at the prompt ends the session
(``run_session``). With memory (the default) earlier questions and answers stay in the prompt as chat turns
(``Conversation``): the prefix cache then also holds the conversation so far, and the oldest turns are dropped,
with a one-line note, when the next prompt and its answer would not fit the model's context.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from tokensieve.commands import common
from tokensieve.commands.common import (
    add_method_args,
    add_model_args,
    add_text_args,
    build_methods,
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
            "Ask questions about a document, one per line on standard input (prompt '> ', with line editing and "
            "history on a terminal). The model and the document are computed once; each answer streams and reports "
            "its TTFT. Ctrl-C during an answer stops that answer; Ctrl-C or Ctrl-D (EOF) at the prompt, or /exit, "
            "ends the session. The conversation is remembered (--no-memory to ask each question alone)."
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
    p.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the previous questions and answers in the prompt, so a question may refer to an earlier one "
        "(default on; the oldest turns are dropped, with a note, when the model's context would overflow; "
        "--no-memory: every question is asked alone about the document)",
    )
    p.set_defaults(func=run)


def messages_for(
    doc: str, question: str, system: str | None, history: list[tuple[str, str]] | None = None
) -> list[dict[str, str]]:
    """The chat messages of ``question`` about ``doc``: the document and the first question in the first user
    message, then each earlier (question, answer) of ``history`` as turns (oldest first)."""
    out = [{"role": "system", "content": system}] if system else []
    turns = [*(history or []), (question, None)]
    for i, (q, a) in enumerate(turns):
        content = f"{doc}\n\n{INSTRUCTION}\nQuestion: {q}" if i == 0 else f"Question: {q}"
        out.append({"role": "user", "content": content})
        if a is not None:
            out.append({"role": "assistant", "content": a})
    return out


class Conversation:
    """The questions and answers of a chat session kept for the next prompt (``memory``), bounded by the model's
    context: ``messages(question)`` drops the oldest turns until the prompt plus ``max_new_tokens`` fits ``limit``
    positions (``None``: no bound), and says so once per drop with ``note``."""

    def __init__(
        self,
        doc: str,
        system: str | None,
        encode: Callable[[list[dict[str, str]]], Any],
        limit: int | None,
        max_new_tokens: int,
        memory: bool = True,
        note: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    ) -> None:
        self.doc, self.system, self.encode = doc, system, encode
        self.limit, self.max_new_tokens, self.memory, self.note = limit, max_new_tokens, memory, note
        self.turns: list[tuple[str, str]] = []

    def messages(self, question: str) -> tuple[list[dict[str, str]], Any]:
        """The messages of ``question`` with the turns that fit, and their token ids."""
        dropped = 0
        while True:
            msgs = messages_for(self.doc, question, self.system, self.turns)
            ids = self.encode(msgs)
            if not self.turns or self.limit is None or ids.shape[-1] + self.max_new_tokens <= self.limit:
                break
            self.turns.pop(0)
            dropped += 1
        if dropped:
            self.note(
                f"tokensieve chat: note: memory: dropped the {dropped} oldest turn(s) to fit the model's context "
                f"({self.limit} positions; {len(self.turns)} turn(s) kept)"
            )
        return msgs, ids

    def add(self, question: str, answer: str) -> None:
        if self.memory:
            self.turns.append((question, answer))


STOPPED = "[stopped; ask the next question, or Ctrl-C / Ctrl-D at the prompt to end]"


def run_session(read_question: Callable[[], str], answer: Callable[[str], None], err: Any = None) -> str:
    """The chat loop: ``read_question()`` gives the next line (``EOFError`` at the end of input, ``KeyboardInterrupt``
    on Ctrl-C: both end the session), ``answer(question)`` answers one (a ``KeyboardInterrupt`` inside it stops that
    answer only: ``STOPPED`` goes to ``err`` and the next question is read). Blank lines are skipped; ``/exit`` ends.
    Returns how the session ended: ``"eof"``, ``"interrupt"`` or ``"exit"``."""
    err = err or sys.stderr
    while True:
        try:
            line = read_question()
        except EOFError:
            return "eof"
        except KeyboardInterrupt:
            return "interrupt"
        question = line.strip()
        if not question:
            continue
        if question == "/exit":
            return "exit"
        try:
            answer(question)
        except KeyboardInterrupt:
            err.write(f"\n{STOPPED}\n")
            err.flush()


def line_reader(prompt: str = "> ") -> Callable[[], str]:
    """Questions from standard input: on a terminal through ``input`` with the standard library's ``readline``
    (line editing and history, where the platform has it), else read line by line, ``prompt`` written first."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (importing it gives input() line editing and history)
        except ImportError:  # not on every platform (Windows)
            pass
        return lambda: input(prompt)

    def read() -> str:
        sys.stdout.write(prompt)
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line

    return read


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
    model, tok = common.load(args)
    load_drafts(args, [method], model, tok)

    import time

    from tokensieve.core.hf import max_positions
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

    convo = Conversation(
        doc,
        args.system,
        lambda msgs: encode_prompt(tok, msgs),
        None if args.allow_long else max_positions(model),
        args.max_new_tokens,
        memory=args.memory,
    )

    def answer(question: str) -> None:
        stream = TextStream(lambda t: tok.decode(t, skip_special_tokens=True))

        def on_token(token_id: int) -> None:
            sys.stdout.write(stream.push(token_id))
            sys.stdout.flush()

        try:
            msgs, q_ids = convo.messages(question)
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
            return
        except KeyboardInterrupt:  # the answer so far stays on screen; it is not remembered
            sys.stdout.flush()
            raise
        sys.stdout.write(stream.finish() + "\n")
        sys.stdout.flush()
        convo.add(question, res.text)
        cached = res.details.get("prefix_cached_tokens", 0)
        print(
            f"[TTFT {res.ttft_s:.3f} s; {cached} of {res.prompt_tokens} prompt tokens from the prefix cache; "
            f"{res.kept_tokens} kept, KV kept {res.kv_kept}; {res.generated_tokens} generated]",
            file=sys.stderr,
        )

    ended = run_session(line_reader(), answer)
    if sys.stdin.isatty() and ended in ("eof", "interrupt"):
        sys.stdout.write("\n")
    return 0
