"""Long text for haystacks and streaming: the PG-19 books in ``../shared/data/pg19``."""

from __future__ import annotations

import os
from pathlib import Path


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


def pg19_books(folder: str | Path | None = None) -> list[Path]:
    folder = Path(folder) if folder else default_pg19_dir()
    books = sorted(folder.glob("*.txt"), key=lambda p: p.name)
    if not books:
        raise FileNotFoundError(
            f"no PG-19 books (*.txt) found in {folder}; pass a text file with --haystack "
            f"or set TOKENSIEVE_PG19 to a folder of .txt files"
        )
    return books


def read_text(path: str | Path | None = None, min_chars: int = 0) -> str:
    """A text file, or (path=None) the PG-19 books joined until ``min_chars`` is reached."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"text file not found: {p}")
        return p.read_text(encoding="utf-8", errors="replace")
    parts, total = [], 0
    for book in pg19_books():
        t = " ".join(book.read_text(encoding="utf-8", errors="replace").split())  # one paragraph stream
        parts.append(t)
        total += len(t)
        if min_chars and total >= min_chars:
            break
    return "\n\n".join(parts)
