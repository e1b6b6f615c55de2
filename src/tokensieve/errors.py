"""The errors tokensieve declares: bad input from the user, reported in one line.

Anything derived from :class:`InputError` is the user's to fix (a bad value, a
prompt too long, a file that is not text); the CLI prints it as one line on
stderr and exits with code 2, and the evaluation harness records it as a
failed cell. Every other exception is a bug or an environment failure and is
never swallowed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


class InputError(ValueError):
    """Bad input: the message names the value and what was expected."""


class PromptTooLongError(InputError):
    """The prompt is longer than the model's maximum position (pass ``allow_long=True`` to run anyway)."""


class ChatTemplateError(InputError):
    """The tokenizer's chat template refused the messages (e.g. roles that must alternate)."""


class EmptyPromptError(InputError):
    """The prompt holds no text."""


# ----------------------------------------------------------------------------- the validation vocabulary
# One way to check a parameter, one message shape: "<name> must be <what was expected>, got <value>".


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None, *, note: str = "") -> int:
    """``value`` if it is an int (not a bool) >= ``minimum`` (and <= ``maximum`` when given); ``InputError``
    otherwise. ``note`` (e.g. ``" (0 = no limit)"``) follows the expectation in the message."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}{note}, got {value!r}")
    if maximum is not None and value > maximum:
        raise InputError(f"{name} must be an integer in [{minimum}, {maximum}]{note}, got {value!r}")
    return value


def check_number(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    above: bool = False,
    note: str = "",
) -> float:
    """``value`` if it is a finite real number (an int or float, not a bool) >= ``minimum`` (> when ``above``)
    and <= ``maximum``, each bound only when given; ``InputError`` otherwise. ``note`` follows the expectation."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if above else value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        if minimum is not None and maximum is not None:
            bound = f" in {'(' if above else '['}{minimum:g}, {maximum:g}]"
        elif minimum is not None:
            bound = f" {'>' if above else '>='} {minimum:g}"
        elif maximum is not None:
            bound = f" <= {maximum:g}"
        else:
            bound = ""
        raise InputError(f"{name} must be a number{bound}{note}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``; ``InputError`` naming them otherwise."""
    choices = tuple(choices)
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


# ----------------------------------------------------------------------------- optional dependencies (extras)

# pyproject's extras a feature may need -> the modules each provides (checked without importing them).
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
    "plots": ("matplotlib",),
    "gguf": ("gguf",),
    "multigpu": ("accelerate",),
    "eval": ("rouge", "rapidfuzz"),
    "vllm": ("vllm",),
}


class MissingExtraError(InputError):
    """A feature needs an optional dependency that is not installed; the message names the extra to install."""


def missing_extra_message(extra: str, what: str, missing: Iterable[str]) -> str:
    """One line: ``what`` needs ``extra`` (the ``missing`` modules) and the pip command that installs it."""
    return (
        f"{what} needs the '{extra}' extra (not installed: {', '.join(missing)}); "
        f"install it with: pip install 'tokensieve[{extra}]'"
    )


def module_installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it (``None`` in ``sys.modules`` blocks it)."""
    import importlib.util
    import sys

    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_extra(extra: str, what: str) -> None:
    """Nothing when every module of ``extra`` (a key of ``EXTRAS``) is installed; ``MissingExtraError`` naming the
    extra and its pip command otherwise. ``what`` is the feature that needs it (e.g. ``"tokensieve serve"``)."""
    check_choice("extra", extra, EXTRAS)
    missing = [m for m in EXTRAS[extra] if not module_installed(m)]
    if missing:
        raise MissingExtraError(missing_extra_message(extra, what, missing))
