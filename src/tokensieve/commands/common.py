"""Argument helpers shared by the commands.

This module is imported when the command line builds its parsers, so it imports
neither torch nor transformers nor a method module (the registry's names only):
what needs them happens inside the functions that ``run`` calls (after parsing,
before the model loads).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tokensieve.methods import METHODS

if TYPE_CHECKING:
    from tokensieve.methods import Method

MB = 1024 * 1024

# The registered methods' names, for --method choices and help (the registry imports no method module).
METHOD_NAMES = tuple(METHODS)
# GemFilter's scorings (checked against tokensieve.methods.gemfilter.SCORINGS by the same test).
SCORINGS = ("paper", "window")
# The method-specific flags: flag -> the method parameter it sets.
METHOD_FLAGS = {
    "--topk": "topk",
    "--filter-layer": "filter_layer",
    "--scoring": "scoring",
    "--filter-model": "filter_model",
}


def _type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type=`` from a function that raises ``InputError``: argparse reports the message as it is."""

    def convert(text: str) -> Any:
        from tokensieve.errors import InputError

        try:
            return parse(text)
        except InputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def parse_size(text: str) -> int:
    """'4k' -> 4096, '1m' -> 1048576, '3000' -> 3000."""
    t = text.strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if mult > 1 else t) * mult)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (expected e.g. 2048, 4k, 1m)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return value


def parse_sizes(text: str) -> list[int]:
    sizes = [parse_size(x) for x in text.split(",") if x.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError(f"expected at least one size, e.g. 1k,2k,4k; got {text!r}")
    return sizes


def parse_count(text: str, minimum: int = 1) -> int:
    """An integer >= ``minimum``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return parse_count(text, 1)


def non_negative_int(text: str) -> int:
    return parse_count(text, 0)


def parse_floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one number, got {text!r}")
    return values


def parse_fraction(text: str) -> float:
    """A number in [0, 1] (a needle depth)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (expected a value in [0, 1])") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a value in [0, 1], got {text!r}")
    return value


def parse_fractions(text: str) -> list[float]:
    values = parse_floats(text)
    bad = [x for x in values if not 0.0 <= x <= 1.0]
    if bad:
        raise argparse.ArgumentTypeError(
            f"expected values in [0, 1], got {', '.join(f'{x:g}' for x in bad)} in {text!r}"
        )
    return values


def parse_methods(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in METHOD_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(bad) if bad else repr(text)}; expected any of: {', '.join(METHOD_NAMES)}"
        )
    return names


def parse_text(text: str) -> str:
    """A non-empty string (a question, a needle)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a non-empty text, got {text!r}")
    return text


def _dtype(text: str) -> str:
    from tokensieve.core.models import dtype_name

    return dtype_name(text)


def _device(text: str) -> str:
    from tokensieve.core.models import parse_device

    return parse_device(text)


def _encoding(text: str) -> str:
    from tokensieve.data import check_encoding

    return check_encoding(text)


def parse_literal(v: str) -> Any:
    """A ``--param`` value: JSON when it parses (numbers, true/false, null, lists), else the text itself."""
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def add_model_args(p: argparse.ArgumentParser, default: str = "smollm2") -> None:
    from tokensieve.core.models import EMBEDDED

    p.add_argument(
        "--model",
        default=default,
        help=f"embedded name ({', '.join(EMBEDDED)}), model folder or .gguf file (default: {default})",
    )
    add_dtype_device_args(p)


def add_dtype_device_args(p: argparse.ArgumentParser, dtype_default: str | None = None) -> None:
    """--dtype and --device, checked while parsing (before any model loads)."""
    p.add_argument(
        "--dtype",
        type=_type(_dtype),
        default=dtype_default,
        help=f"float32, bfloat16 or float16 (default: {dtype_default or 'float32 on CPU, bfloat16 on GPU'})",
    )
    p.add_argument(
        "--device", type=_type(_device), default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available)"
    )
    p.add_argument(
        "--threads",
        type=_threads,
        default=None,
        metavar="N",
        help=f"CPU threads torch computes with, 1..{MAX_THREADS} (default: $OMP_NUM_THREADS when set, else "
        f"{SMALL_MACHINE_THREADS} on a machine with at most {SMALL_MACHINE_CORES} cores, else torch's own default; "
        "-v says which; docs/cli.md)",
    )


# torch's intra-op threads on a small machine: with at most SMALL_MACHINE_CORES cores (a laptop VM, a shared CI
# runner), one thread per core contends with everything else the machine runs; measured on a shared 2-core machine
# (benchmarks/threads_cpu.py, benchmarks/results/threads_cpu/; docs/cli.md#threads), one thread was faster in most runs.
SMALL_MACHINE_CORES = 2
SMALL_MACHINE_THREADS = 1
MAX_THREADS = 1024


def _threads(text: str) -> int:
    value = parse_count(text, 1)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected a thread count in 1..{MAX_THREADS}, got {text!r}")
    return value


def default_threads(cores: int | None) -> int | None:
    """The thread count the commands set when neither ``--threads`` nor ``OMP_NUM_THREADS`` says one:
    ``SMALL_MACHINE_THREADS`` on a machine of at most ``SMALL_MACHINE_CORES`` cores, else ``None`` (torch's own
    default, one thread per core)."""
    return SMALL_MACHINE_THREADS if cores is not None and cores <= SMALL_MACHINE_CORES else None


def apply_threads(args: argparse.Namespace) -> int | None:
    """Set torch's thread count for a command that runs a model (one with ``--threads``), before it loads one:
    ``--threads N``, else nothing when ``OMP_NUM_THREADS`` is set (torch reads it), else ``default_threads``.
    torch is not imported here (the "loading NAME ..." line comes first): ``OMP_NUM_THREADS`` is set for it
    to read (torch caps that at the core count), and ``announce_loading`` calls ``torch.set_num_threads`` once
    torch is imported; when torch is imported already, it is called here. With -v, says what it chose once on
    stderr. Returns the count set (``None``: left to torch)."""
    n, why = getattr(args, "threads", None), "--threads"
    if n is None:
        if os.environ.get("OMP_NUM_THREADS", "").strip():
            if getattr(args, "verbose", False):
                print(
                    f"tokensieve: torch threads from OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}", file=sys.stderr
                )
            return None
        cores = os.cpu_count()
        n, why = default_threads(cores), f"the default on a machine with {cores} cores; --threads to change"
        if n is None:
            if getattr(args, "verbose", False):
                print(f"tokensieve: torch threads: torch's default ({cores} cores)", file=sys.stderr)
            return None
    args.torch_threads = n
    if "torch" in sys.modules:
        set_torch_threads(args)
    else:
        os.environ["OMP_NUM_THREADS"] = str(n)
    if getattr(args, "verbose", False):
        print(f"tokensieve: using {n} torch thread(s) ({why})", file=sys.stderr)
    return n


def add_text_args(p: argparse.ArgumentParser, what: str) -> None:
    """--encoding and --encoding-errors for the text files a command reads (``what`` names them in the help)."""
    p.add_argument("--encoding", type=_type(_encoding), default="utf-8", help=f"encoding of {what} (default utf-8)")
    p.add_argument(
        "--encoding-errors",
        choices=["strict", "replace"],
        default="strict",
        help="strict (default): stop at bytes the encoding cannot decode; replace: put U+FFFD instead",
    )


def parse_model_name(text: str) -> str:
    """A model name or path (non-empty, no surrounding spaces)."""
    if not text.strip() or text != text.strip():
        raise argparse.ArgumentTypeError(f"expected a model name or path, got {text!r}")
    return text


FILTER_MODEL_HELP = (
    "GemFilter: a draft model of the same tokenizer (embedded name or model folder) runs the filter pass; "
    "--filter-layer is then the draft's layer (default: its known layer); docs/gemfilter.md"
)


def add_method_args(p: argparse.ArgumentParser, multi: bool = False, filter_model: bool = True) -> None:
    """--method(s), --topk, --filter-layer, --scoring, --param and (``filter_model``) --filter-model."""
    if multi:
        p.add_argument(
            "--methods",
            type=parse_methods,
            default=["full", "gemfilter"],
            help=f"comma-separated, any of: {', '.join(METHOD_NAMES)}",
        )
    else:
        p.add_argument("--method", choices=METHOD_NAMES, default="full", help="method (default: full)")
    p.add_argument("--topk", type=parse_size, default=None, help="GemFilter: prompt tokens kept (default 1024)")
    p.add_argument(
        "--filter-layer",
        type=non_negative_int,
        default=None,
        help="GemFilter: 0-based filter layer (default: known value for the model)",
    )
    p.add_argument("--scoring", choices=SCORINGS, default=None, help="GemFilter: token scoring (default: window)")
    if filter_model:
        p.add_argument(
            "--filter-model", type=parse_model_name, default=None, metavar="NAME|PATH", help=FILTER_MODEL_HELP
        )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any method parameter, e.g. --param budget=512 (repeatable; applies to the chosen methods that have it)",
    )


def chosen_methods(args: argparse.Namespace) -> list[str]:
    return list(args.methods) if hasattr(args, "methods") else [args.method]


def method_params(args: argparse.Namespace, names: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """The parameters each chosen method gets from --topk/--filter-layer/--scoring and --param.

    ``InputError`` for a flag or ``--param`` key that none of the chosen methods takes (names it
    and the methods that do take it), or a ``--param`` without ``=``. Deprecated parameter names
    are accepted (the method renames them, with a warning).
    """
    from tokensieve.errors import InputError
    from tokensieve.methods import METHODS, accepted_params

    names = list(names) if names is not None else chosen_methods(args)
    accepts = {n: accepted_params(n) for n in names}
    given: list[tuple[str, str, Any]] = []  # (how it was given, parameter, value)
    for flag, key in METHOD_FLAGS.items():
        v = getattr(args, key, None)
        if v is not None:
            given.append((flag, key, v))
    for item in getattr(args, "param", []) or []:
        k, eq, v = item.partition("=")
        k = k.strip().replace("-", "_")
        if not eq or not k:
            raise InputError(f"--param expects KEY=VALUE (e.g. --param budget=512), got {item!r}")
        given.append((f"--param {k}", k, parse_literal(v)))
    out: dict[str, dict[str, Any]] = {n: {} for n in names}
    for how, key, value in given:
        users = [n for n in names if key in accepts[n]]
        if not users:
            owners = [n for n in METHODS if key in accepted_params(n)]
            chosen = ", ".join(names)
            if how.startswith("--param"):
                known = "; " + "; ".join(f"{n} takes {', '.join(sorted(accepts[n])) or 'no parameters'}" for n in names)
                where = f" (a parameter of {', '.join(owners)})" if owners else ""
                raise InputError(f"{how}{where} is not a parameter of the chosen method(s) {chosen}{known}")
            raise InputError(f"{how} is a {'/'.join(owners)} option; the chosen method(s) {chosen} do not use it")
        for n in users:
            out[n][key] = value
    return out


def build_methods(args: argparse.Namespace) -> list[Method]:
    """The chosen methods with their parameters, checked before any model is loaded."""
    from tokensieve.methods import make_method

    return [make_method(name, **params) for name, params in method_params(args).items()]


def load_drafts(args: argparse.Namespace, methods: Sequence[Method], model: Any, tokenizer: Any) -> None:
    """Load the draft model each method names by ``filter_model`` (once per name, on ``model``'s device and in its
    dtype, "loading NAME ..." first) and check it against ``model``'s tokenizer (``InputError`` otherwise), so a
    wrong draft fails before any prompt runs."""
    from tokensieve.core.draft import check_draft, load_draft

    loaded: dict[str, Any] = {}
    for m in methods:
        spec = getattr(m, "filter_model", None)
        if isinstance(spec, str):
            if spec not in loaded:
                announce_loading(args, spec)
                loaded[spec] = load_draft(spec, model)
            m.filter_model = loaded[spec]  # type: ignore[attr-defined]
        if spec is not None:
            check_draft(m.filter_model, model, tokenizer)  # type: ignore[attr-defined]


def set_torch_threads(args: argparse.Namespace) -> None:
    """``torch.set_num_threads`` with the count ``apply_threads`` chose, if it chose one."""
    n = getattr(args, "torch_threads", None)
    if n is not None:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def announce_loading(args: argparse.Namespace, name: str) -> None:
    """Say "loading NAME ..." on stderr (not with --quiet), before the imports of torch and transformers and the
    weights (10-20 s of silence otherwise), set torch's threads (``apply_threads``), and show transformers'
    progress bars ("Loading weights") with -v only."""
    if not getattr(args, "quiet", False):
        print(f"loading {name} ...", file=sys.stderr, flush=True)
    set_torch_threads(args)
    from transformers.utils import logging as hf_logging

    if getattr(args, "verbose", False) and not getattr(args, "quiet", False):
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()


def load(args: argparse.Namespace):
    """The model and tokenizer named by --model/--dtype/--device (``announce_loading`` first)."""
    announce_loading(args, args.model)
    from tokensieve.core.models import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / MB:.1f} MiB"
