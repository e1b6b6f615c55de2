"""The ``tokensieve`` command line. Each command lives in ``tokensieve/commands/``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# One line per command module; each exposes add_parser(subparsers).
COMMAND_MODULES = ["ask", "demo", "needle", "eval", "report", "calibrate", "stream", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokensieve",
        description="Fast long-context inference by computing on fewer tokens (GemFilter, SepLLM, LazyLLM, baselines).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"tokensieve.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by commands that write results
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.command:
        parser.print_help()
        return 2
    from tokensieve.models import ModelLoadError

    try:
        return int(args.func(args) or 0)
    except (ValueError, ModelLoadError, FileNotFoundError, OSError) as exc:
        print(f"tokensieve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
