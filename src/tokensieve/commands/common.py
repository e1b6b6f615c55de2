"""Argument helpers shared by the commands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from tokensieve.methods import METHODS, Method, make_method

MB = 1024 * 1024


def parse_size(text: str) -> int:
    """'4k' -> 4096, '1m' -> 1048576, '3000' -> 3000."""
    t = text.strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (expected e.g. 2048, 4k, 1m)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return value


def parse_sizes(text: str) -> list[int]:
    return [parse_size(x) for x in text.split(",") if x.strip()]


def parse_floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None


def parse_methods(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad or text!r}; expected any of: {', '.join(METHODS)}")
    return names


def _literal(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="embedded name (smollm2, gemma3-270m), model folder or .gguf file (default: smollm2)")
    p.add_argument("--dtype", default=None, help="torch dtype, e.g. float32, bfloat16 (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def add_method_args(p: argparse.ArgumentParser, multi: bool = False) -> None:
    if multi:
        p.add_argument("--methods", type=parse_methods, default=["full", "gemfilter"], help=f"comma-separated, any of: {', '.join(METHODS)}")
    else:
        p.add_argument("--method", choices=list(METHODS), default="full", help="method (default: full)")
    p.add_argument("--topk", type=parse_size, default=None, help="GemFilter: prompt tokens kept (default 1024)")
    p.add_argument("--filter-layer", type=int, default=None, help="GemFilter: 0-based filter layer (default: known value for the model)")
    p.add_argument("--scoring", choices=["window", "paper"], default=None, help="GemFilter: token scoring (default: window)")
    p.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE",
        help="any method parameter, e.g. --param window=32 (repeatable; applies to methods that have it)",
    )


def method_params(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Parameters from the flags that the method ``name`` has."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(METHODS[name])}
    given: dict[str, Any] = {}
    for flag, key in (("topk", "topk"), ("filter_layer", "filter_layer"), ("scoring", "scoring")):
        v = getattr(args, flag, None)
        if v is not None and key in fields:
            given[key] = v
    for item in getattr(args, "param", []):
        if "=" not in item:
            raise ValueError(f"--param expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        if k in fields:
            given[k] = _literal(v)
    return given


def build_method(args: argparse.Namespace, name: str) -> Method:
    return make_method(name, **method_params(args, name))


def load(args: argparse.Namespace):
    from tokensieve.models import load_model

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return load_model(args.model, dtype=dtype, device=args.device)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / MB:.1f} MiB"
