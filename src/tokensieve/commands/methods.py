"""`tokensieve methods`: each method, its parameters, their defaults and meanings (from the methods' docstrings)."""

from __future__ import annotations

import argparse

from tokensieve.commands.common import METHOD_NAMES, print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "methods",
        description="List the methods, each with its parameters (what --param KEY=VALUE and the Python API take), "
        "their defaults and a one-line meaning, read from the method classes and their docstrings.",
    )
    p.add_argument(
        "names", nargs="*", metavar="METHOD", help=f"only these methods (default: all of {', '.join(METHOD_NAMES)})"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON list: name, summary, parameters (name, default, meaning, doc) and renamed (old -> new)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokensieve.methods import describe_methods

    methods = describe_methods(list(dict.fromkeys(args.names)) or None)
    if args.json:
        print_json(methods)
        return 0
    for i, m in enumerate(methods):
        print(("\n" if i else "") + f"{m['name']}: {m['summary']}")
        if not m["parameters"]:
            print("  (no parameters)")
        width = max((len(f"{p['name']}={p['default']!r}") for p in m["parameters"]), default=0)
        for p in m["parameters"]:
            print(f"  {p['name'] + '=' + repr(p['default']):<{width}}  {p['meaning']}")
    print("\nSet any of them with --param KEY=VALUE (e.g. --param budget=512), or as keywords in Python.")
    return 0
