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


def check_number(name: str, value: Any, minimum: float | None = None, maximum: float | None = None, *,
                 above: bool = False, note: str = "") -> float:
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
