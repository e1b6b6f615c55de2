"""Training text: files and folders of text, tokenized, packed into fixed-length rows, in a resumable order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tokensieve.data import read_document
from tokensieve.errors import InputError

TEXT_SUFFIXES = (".txt", ".md", ".text")


def text_files(paths: Sequence[str | Path], what: str = "--data") -> list[Path]:
    """The text files named by ``paths``: files as given, folders searched (recursively, sorted) for
    ``*.txt``, ``*.md`` and ``*.text``. ``InputError`` for a path that does not exist or a folder without text."""
    if not paths:
        raise InputError(f"{what} names no files; expected text files or folders of .txt files")
    out: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise InputError(f"{what}: folder {p} holds no text files ({', '.join(TEXT_SUFFIXES)})")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise InputError(f"{what}: {p} does not exist; expected a text file or a folder of text files")
    return out


def tokenize_files(
    files: Sequence[Path],
    tokenizer,
    max_tokens: int,
    encoding: str = "utf-8",
    errors: str = "strict",
    progress: Callable[[str], None] | None = None,
) -> torch.Tensor:
    """int64 [tokens]: every file's tokens, each document preceded by BOS (where the tokenizer has one) and
    followed by EOS (where it has one), in order, stopping at ``max_tokens``."""
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    parts, total = [], 0
    for f in files:
        if progress:
            progress(f"tokenizing {f}")
        text = read_document(f, encoding, errors)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else [])
        parts.append(torch.tensor(ids[: max_tokens - total], dtype=torch.long))
        total += parts[-1].numel()
        if total >= max_tokens:
            break
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def pack(ids: torch.Tensor, seq_len: int, what: str = "--data") -> torch.Tensor:
    """[rows, seq_len]: consecutive ``seq_len``-token rows of ``ids`` (the tail shorter than a row is dropped)."""
    rows = ids.numel() // seq_len
    if rows == 0:
        raise InputError(f"{what} has {ids.numel()} tokens, fewer than one row of --seq-len {seq_len}")
    return ids[: rows * seq_len].view(rows, seq_len)


class Batches:
    """Micro-batch ``k`` of ``batch_size`` rows, the same for a given (rows, batch_size, seed) whatever ran before:
    row ``r = k * batch_size + t`` is row ``r mod n`` of epoch ``r // n``'s permutation (seeded by ``seed + epoch``),
    so a resumed run reads exactly the batches an uninterrupted one would."""

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int, shuffle: bool = True):
        self.rows, self.batch_size, self.seed, self.shuffle = rows, batch_size, seed, shuffle
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        n = self.rows.shape[0]
        if not self.shuffle:
            return torch.arange(n)
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return self._perms[epoch]

    def __call__(self, k: int) -> torch.Tensor:
        n = self.rows.shape[0]
        idx = [int(self._perm(r // n)[r % n]) for r in range(k * self.batch_size, (k + 1) * self.batch_size)]
        return self.rows[idx]
