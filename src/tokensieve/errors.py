"""The errors tokensieve declares: bad input from the user, reported in one line.

Anything derived from :class:`InputError` is the user's to fix (a bad value, a
prompt too long, a file that is not text); the CLI prints it as one line on
stderr and exits with code 2, and the evaluation harness records it as a
failed cell. Every other exception is a bug or an environment failure and is
never swallowed.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: the message names the value and what was expected."""


class PromptTooLongError(InputError):
    """The prompt is longer than the model's maximum position (pass ``allow_long=True`` to run anyway)."""


class ChatTemplateError(InputError):
    """The tokenizer's chat template refused the messages (e.g. roles that must alternate)."""


class EmptyPromptError(InputError):
    """The prompt holds no text."""
