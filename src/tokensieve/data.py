"""Text input: the one reader of user documents and text files; the PG-19 books (a folder of ``.txt`` files) and
the one PG-19 book shipped inside the package (``tokensieve/texts/``), the demo's haystack."""

from __future__ import annotations

import codecs
import os
import sys
from pathlib import Path

from tokensieve.errors import InputError

ENCODING_ERRORS = ("strict", "replace")
# Bytes that text files do not hold: C0 controls except tab, newline, vertical tab, form feed,
# carriage return and escape (terminal colours), plus DEL.
_CONTROL = bytes([*range(0x00, 0x09), *range(0x0E, 0x1B), *range(0x1C, 0x20), 0x7F])
_CONTROL_CHARS = set(_CONTROL.decode("latin-1"))
BINARY_CONTROL_SHARE = 0.05  # random bytes hold about 11% of these; text holds next to none
DEFAULT_MAX_INPUT_BYTES = (
    64 << 20
)  # standard input read at most (64 MiB: ~16M tokens of English, past every model's positions)


def check_encoding(encoding: str) -> str:
    """``encoding`` if Python knows it (``InputError`` otherwise), e.g. utf-8, latin-1, cp1252, utf-16."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise InputError(
            f"unknown encoding {encoding!r}; expected a Python codec name such as utf-8, latin-1, cp1252, utf-16"
        ) from None
    return encoding


def _is_wide(encoding: str) -> bool:
    """UTF-16/32 text is full of NUL bytes: such files are checked after decoding."""
    return codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))


def looks_binary(data: bytes | str) -> bool:
    """True for a NUL byte, or a share of control bytes (other than whitespace and escape) no text has."""
    if not data:
        return False
    if isinstance(data, str):
        bad = sum(c in _CONTROL_CHARS for c in data)
        return "\0" in data or bad / len(data) > BINARY_CONTROL_SHARE
    return b"\0" in data or (len(data) - len(data.translate(None, _CONTROL))) / len(data) > BINARY_CONTROL_SHARE


def decode_text(data: bytes, name: str, encoding: str = "utf-8", errors: str = "strict") -> str:
    """``data`` (the content of ``name``) as text; ``InputError`` for binary data or bytes ``encoding`` cannot decode."""
    check_encoding(encoding)
    if errors not in ENCODING_ERRORS:
        raise InputError(f"unknown encoding error handling {errors!r}; expected one of: {', '.join(ENCODING_ERRORS)}")
    wide = _is_wide(encoding)
    if not wide and looks_binary(data):
        raise InputError(f"{name} does not look like text (binary data)")
    try:
        text = data.decode(encoding, errors=errors)
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{name} is not valid {encoding}: byte 0x{data[exc.start]:02x} at byte offset {exc.start} cannot be decoded; "
            f"pass --encoding with the file's encoding (e.g. --encoding latin-1) or --encoding-errors replace"
        ) from None
    if wide and looks_binary(text):
        raise InputError(f"{name} does not look like text (binary data)")
    return text


def read_document(
    path: str | Path, encoding: str = "utf-8", errors: str = "strict", max_stdin_bytes: int = DEFAULT_MAX_INPUT_BYTES
) -> str:
    """The text of a user's file (``"-"``: standard input), the one reader of documents and text files.

    ``InputError`` (one line naming the file) for a missing file, a folder, anything else that is not a
    regular file (a FIFO, a device such as /dev/zero: they could block or never end), binary data, or
    bytes that ``encoding`` cannot decode (with ``errors="strict"``; ``"replace"`` puts U+FFFD instead).
    Standard input is read up to ``max_stdin_bytes`` (characters, for a text stream); ``InputError`` past
    that, without reading further (an endless stream ends there).
    """
    if str(path) == "-":
        if isinstance(max_stdin_bytes, bool) or not isinstance(max_stdin_bytes, int) or max_stdin_bytes < 1:
            raise InputError(f"the standard input limit must be a number of bytes >= 1, got {max_stdin_bytes!r}")
        too_long = InputError(
            f"standard input is longer than {max_stdin_bytes} bytes; pass a larger --max-input-bytes "
            f"or the document as a file"
        )
        stream = getattr(sys.stdin, "buffer", None)
        if stream is None:  # a text stream (e.g. replaced in a test): already decoded
            text = sys.stdin.read(max_stdin_bytes + 1)
            if len(text) > max_stdin_bytes:
                raise too_long
            if looks_binary(text):
                raise InputError("standard input does not look like text (binary data)")
            return text
        data = stream.read(max_stdin_bytes + 1)
        if len(data) > max_stdin_bytes:
            raise too_long
        return decode_text(data, "standard input", encoding, errors)
    p = Path(path).expanduser()
    if p.is_dir():
        raise InputError(f"{p} is a folder; expected a text file")
    if not p.exists() and not p.is_symlink():
        raise InputError(f"file {p} does not exist")
    if not p.is_file():
        raise InputError(f"{p} is not a regular file (a pipe, a device or a broken link); expected a text file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {p}: {exc.strerror or exc}") from None
    return decode_text(data, str(p), encoding, errors)


def default_pg19_dir() -> Path:
    """``$TOKENSIEVE_PG19``, else ``shared/data/pg19`` beside the project checkout or the working directory."""
    env = os.environ.get("TOKENSIEVE_PG19")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    candidates = [Path.cwd() / "../shared/data/pg19", Path.cwd() / "shared/data/pg19"]
    candidates += [p / "shared/data/pg19" for p in here.parents]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    return candidates[0]


# A public-domain book from PG-19 shipped in the package (tokensieve/texts/README.md): the demo's haystack, and the
# default text when no PG-19 folder is found. It is also the first of the PG-19 books sorted by name used so far,
# so the defaults read the same text with or without that folder.
SHIPPED_TEXT = Path(__file__).with_name("texts") / "pg19-10146.txt"


def shipped_text(min_chars: int = 0) -> str:
    """The shipped PG-19 book as one paragraph stream (whitespace runs as one space), as ``read_text`` joins books.

    ``InputError`` when ``min_chars`` is more than it holds (pass a longer text file instead)."""
    text = " ".join(read_document(SHIPPED_TEXT).split())
    if min_chars > len(text):
        raise InputError(
            f"the shipped text holds {len(text):,} characters, fewer than the {min_chars:,} needed "
            f"(about {min_chars // 8:,} tokens); pass a longer text file (--haystack / --file) or set "
            f"TOKENSIEVE_PG19 to a folder of .txt books"
        )
    return text


def pg19_found() -> bool:
    """Whether a PG-19 folder is configured (``TOKENSIEVE_PG19``) or found beside the checkout."""
    return bool(os.environ.get("TOKENSIEVE_PG19")) or default_pg19_dir().is_dir()


def pg19_books(folder: str | Path | None = None) -> list[Path]:
    folder = Path(folder) if folder else default_pg19_dir()
    books = sorted(folder.glob("*.txt"), key=lambda p: p.name)
    if not books:
        raise FileNotFoundError(
            f"no PG-19 books (*.txt) found in {folder}; pass a text file with --haystack "
            f"or set TOKENSIEVE_PG19 to a folder of .txt files"
        )
    return books


def read_text(
    path: str | Path | None = None, min_chars: int = 0, encoding: str = "utf-8", errors: str = "strict"
) -> str:
    """A text file (read by :func:`read_document`), or (path=None) the PG-19 books joined until ``min_chars`` is
    reached; without a PG-19 folder (:func:`pg19_found`), the shipped book (:func:`shipped_text`)."""
    if path is not None:
        return read_document(path, encoding, errors)
    if not pg19_found():
        return shipped_text(min_chars)
    parts, total = [], 0
    for book in pg19_books():
        t = " ".join(read_document(book).split())  # one paragraph stream
        parts.append(t)
        total += len(t)
        if min_chars and total >= min_chars:
            break
    return "\n\n".join(parts)
