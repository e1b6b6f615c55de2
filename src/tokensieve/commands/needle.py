"""`tokensieve needle`: alias of `tokensieve eval needle` (needle-in-a-haystack grid with heatmaps)."""

from __future__ import annotations

import argparse

from tokensieve.commands.eval import add_needle_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "needle",
        description="Alias of `tokensieve eval needle`: for each length and depth, insert the needle into "
        "PG-19 text, ask each method, score; results in OUT/needle.jsonl, one heatmap per method.",
    )
    add_needle_args(p)
