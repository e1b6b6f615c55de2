"""Helpers for the evaluation tests: a byte-level tokenizer built in memory and a tiny random model over its ids."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import tiny_model

from tokensieve.testing import byte_tokenizer  # noqa: F401  (re-exported for the tests)

# A few sentences to build haystacks from (any text works; PG-19 is not needed in tests).
TEXT = " ".join(
    f"Sentence number {i} talks about the {w} near the old {v}. It was a quiet day in town {i % 7}!"
    for i, (w, v) in enumerate(
        zip(["river", "mill", "garden", "bridge", "school"] * 60, ["tower", "gate", "road", "farm"] * 75)
    )
)


def byte_model(family: str = "llama", *, layers: int = 3, max_pos: int = 4096, seed: int = 0) -> torch.nn.Module:
    """A tiny random model over byte_tokenizer()'s 257 ids (hidden 32) that stops at its <eos> (256)."""
    return tiny_model(
        family,
        layers=layers,
        vocab=257,
        hidden=32,
        max_pos=max_pos,
        seed=seed,
        ids={"eos_token_id": 256},
        stop_at_eos=True,
        scale_head=False,
    )


def save_model_dir(d: Path, max_pos: int = 4096) -> Path:
    """byte_model(), byte_tokenizer() and TEXT (as hay.txt) saved as a model folder, for the command line."""
    byte_model(max_pos=max_pos).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    (d / "hay.txt").write_text(TEXT)
    return d
