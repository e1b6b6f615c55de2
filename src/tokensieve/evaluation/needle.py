"""Needle-in-a-haystack, as in the GemFilter paper's figure: lengths x depths grid.

The default needle and question are the paper's. A sample is scored by the
fraction of expected phrases found in the answer (case-insensitive); a cell is
"correct" when all are found.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokensieve.errors import InputError
from tokensieve.evaluation.harness import Sample, Task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tokensieve.engine.runner import GenerationResult

DEFAULT_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
DEFAULT_QUESTION = "What is the best thing to do in San Francisco?"
DEFAULT_EXPECTED = ("sandwich", "Dolores Park")


@dataclass
class NeedlePrompt:
    messages: list[dict[str, str]]
    length: int  # prompt tokens, chat template included
    depth: float  # requested depth in [0, 1]
    needle_span: list[int]  # token indices of the needle in the prompt


def make_messages(context: str, question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{context}\n\nAnswer the question from the text above.\nQuestion: {question}"}]


def build_needle_prompt(
    tokenizer: PreTrainedTokenizerBase,
    haystack: str,
    length: int,
    depth: float,
    needle: str = DEFAULT_NEEDLE,
    question: str = DEFAULT_QUESTION,
) -> NeedlePrompt:
    """Chat messages of about ``length`` tokens with ``needle`` at ``depth`` (0 = start, 1 = end) of the context.

    The needle goes in at a sentence boundary near the requested depth.
    """
    from tokensieve.engine.runner import encode_prompt

    if not 0.0 <= depth <= 1.0:
        raise InputError(f"depth must be in [0, 1], got {depth}")
    overhead = encode_prompt(tokenizer, make_messages(needle, question)).shape[1]
    budget = length - overhead
    if budget <= 0:
        raise InputError(
            f"length {length} is too short: the needle, question and template alone take {overhead} tokens"
        )
    hay_ids = tokenizer(haystack[: budget * 8], add_special_tokens=False)["input_ids"]
    if len(hay_ids) < budget:
        raise InputError(f"haystack too short for {length} tokens ({len(hay_ids)} available); pass a longer text")
    context = tokenizer.decode(hay_ids[:budget])
    cut = int(depth * len(context))
    if 0 < cut < len(context):
        m = re.search(r"[.!?]\s", context[cut:])
        cut = cut + m.end() if m else len(context)
    before, after = context[:cut], context[cut:]
    joined = f"{before.rstrip()} {needle} {after.lstrip()}".strip()
    messages = make_messages(joined, question)
    ids = encode_prompt(tokenizer, messages)[0].tolist()
    return NeedlePrompt(messages, len(ids), depth, find_span(tokenizer, ids, needle))


def find_span(tokenizer: PreTrainedTokenizerBase, ids: list[int], text: str) -> list[int]:
    """Indices of the tokens of ``ids`` whose decoded characters overlap the first occurrence of ``text``."""
    # Whitespace is dropped on both sides: single-token decodes may add or strip leading spaces.
    pieces = ["".join(tokenizer.decode([t]).split()) for t in ids]
    full, text = "".join(pieces), "".join(text.split())
    start = full.find(text)
    if start < 0:
        raise ValueError("needle text not found in the decoded prompt")
    end, pos, span = start + len(text), 0, []
    for i, p in enumerate(pieces):
        if pos < end and pos + len(p) > start:
            span.append(i)
        pos += len(p)
    return span


def answer_span(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], phrases: Iterable[str]) -> list[int]:
    """Sorted prompt positions of the tokens of each phrase's first occurrence in ``ids`` (phrases not found
    are skipped): the answer tokens a selecting method must keep for the model to read the answer."""
    out: set[int] = set()
    for p in phrases:
        try:
            out.update(find_span(tokenizer, list(ids), p))
        except ValueError:
            continue
    return sorted(out)


def score_answer(answer: str, expected: tuple[str, ...] | list[str] = DEFAULT_EXPECTED) -> float:
    """Fraction of expected phrases that appear in ``answer`` (case- and whitespace-insensitive)."""
    norm = " ".join(answer.lower().split())
    if not expected:
        raise InputError("expected phrases must not be empty")
    return sum(" ".join(e.lower().split()) in norm for e in expected) / len(expected)


class NeedleTask(Task):
    """Needle-in-a-haystack grid: one sample per (length, depth); ``samples`` is not used (the grid is deterministic).

    Each result line also records ``needle_recall``: the fraction of the needle's
    tokens among the tokens a selection method kept (None for methods that keep all).
    """

    name = "needle"

    def __init__(
        self,
        haystack: str,
        lengths: list[int],
        depths: list[float],
        needle: str = DEFAULT_NEEDLE,
        question: str = DEFAULT_QUESTION,
        expected: tuple[str, ...] | list[str] = DEFAULT_EXPECTED,
        haystack_name: str = "pg19",
        max_new_tokens: int = 32,
    ):
        if any(not 0 <= d <= 1 for d in depths):
            raise InputError(f"depths must be in [0, 1], got {depths}")
        if not expected:
            raise InputError("expected phrases must not be empty")
        if not needle.strip() or not question.strip():
            raise InputError(
                f"the needle and the question must not be empty (got needle {needle!r}, question {question!r})"
            )
        self.haystack, self.lengths, self.depths = haystack, list(lengths), list(depths)
        self.needle, self.question, self.expected = needle, question, list(expected)
        self.haystack_name, self.max_new_tokens = haystack_name, max_new_tokens

    def config(self) -> dict[str, Any]:
        return {
            "needle": self.needle,
            "question": self.question,
            "expected": self.expected,
            "haystack": self.haystack_name,
            "max_new_tokens": self.max_new_tokens,
        }

    def samples(self, tokenizer: PreTrainedTokenizerBase) -> Iterator[Sample]:
        from tokensieve.engine.runner import encode_prompt

        for n in self.lengths:
            for d in self.depths:
                p = build_needle_prompt(tokenizer, self.haystack, n, d, self.needle, self.question)
                ids = encode_prompt(tokenizer, p.messages)[0].tolist()
                meta = {
                    "depth": d,
                    "needle_span": p.needle_span,
                    "answer_span": answer_span(tokenizer, ids, self.expected),
                }
                yield Sample(f"{n}/{d:g}", n, ids, list(self.expected), meta)

    def score(self, sample: Sample, answer: str) -> float:
        return score_answer(answer, sample.expected)

    def result_fields(self, sample: Sample, res: GenerationResult) -> dict[str, Any]:
        out = super().result_fields(sample, res)
        span = sample.meta["needle_span"]
        kept = set(res.kept_indices) if res.kept_indices is not None else None
        out["needle_recall"] = None if kept is None else sum(i in kept for i in span) / len(span)
        return out

    def plots(self, rows: list[dict[str, Any]], out: Path) -> list[Path]:
        from tokensieve.evaluation.plots import needle_heatmaps

        return needle_heatmaps(rows, out)
