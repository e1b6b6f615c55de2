"""Multi-turn questions on one long document, in one conversation, through the prefix cache.

The shape is SCBench's multi-turn mode (Li et al., "SCBench: A KV Cache-Centric Analysis of
Long-Context Methods", 2024, arXiv:2412.10319): a long context is shared by several requests, and
what a method keeps (or drops) for one request decides what later requests can still answer. The
text and the facts are generated here (no SCBench code or data is used):

* the document is sentences of PG-19 books (or any text file) with ``turns`` facts inserted at
  distinct depths, one per stratum of the document (fact ``i`` in ``[(i + 0.15) / n, (i + 0.85) / n]``);
  each fact is a sentence with a short, unambiguous answer found nowhere else: a vault's access code
  (4 to 7 digits), an archive's password (a pseudo-word), the pier a ferry leaves from (3 digits), a
  lighthouse keeper's name (a pseudo-word), an orchard's number of trees (3 to 5 digits), each about a
  pseudo-word subject (more than five facts reuse the kinds with other subjects);
* the questions are asked in a random order, one per turn, in one conversation: turn ``t``'s prompt is
  the chat of the document with the first question, then each earlier answer (the model's own) and
  the next question, up to question ``t`` (:func:`turn_messages`);
* each turn runs through a prefix cache (``tokensieve.engine.prefix_cache``), as ``tokensieve chat`` and
  the server do: the reusable prefix of turn ``t`` is everything before its question's line
  (``chat_prefix_tokens``), so turn 1 computes and stores the document, and each later turn reuses
  the document and the earlier turns and stores them with its own answer. Each cell (sample, method)
  has its own store, so cells do not depend on the order they run in. A method the prefix cache
  cannot serve (``prefix_cache.refusal``: not full, SnapKV or dense GemFilter; or a model with
  sliding-window layers) runs every turn on its whole prompt and the line says so
  (``prefix_reused: false`` and ``prefix_note``);
* a turn scores 1 when its fact's answer appears in the model's answer (case-insensitive, as the
  needle task scores); the cell's ``score`` is the mean over the turns.

One result line per (conversation, method), not per turn: turn ``t`` depends on the model's answers
to the turns before it and on the cache state they left, so a turn cannot be run (or resumed) on
its own, and the report's groups (method x length) average whole conversations. The turns are in
the line's ``turns`` list. ``length`` is the size of the first turn's prompt (the document, the
instruction and the first question, chat template included); later turns add the earlier questions
and answers (at most ``max_new_tokens`` each).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokensieve.errors import InputError, check_number
from tokensieve.evaluation.harness import (
    REVIVAL_FIELDS,
    Sample,
    Task,
    generation_fields,
    merge_revival_fields,
    render,
    run_generation,
    sample_seed,
)
from tokensieve.evaluation.needle import score_answer
from tokensieve.evaluation.ruler import fit_units, insert_at_depths, pseudo_word, split_sentences, take_sentences

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tokensieve.engine.runner import GenerationResult
    from tokensieve.methods import Method

INSTRUCTION = "Answer each question from the text above in a few words."
DEFAULT_TURNS = 5
MIN_SENTENCES_PER_FACT = 2  # the document must hold this many sentences per fact (distinct depths)


def _digits(rng: random.Random, lo: int, hi: int) -> str:
    n = rng.randint(lo, hi)
    return str(rng.randint(10 ** (n - 1), 10**n - 1))


def _name(rng: random.Random) -> str:
    return pseudo_word(rng, 3).capitalize()


# kind -> (statement, question, answer drawn from the rng). {s}: the subject, {a}: the answer.
FACT_KINDS: dict[str, tuple[str, str, Callable[[random.Random], str]]] = {
    "vault": (
        "The access code of the {s} vault is {a}.",
        "What is the access code of the {s} vault?",
        lambda rng: _digits(rng, 4, 7),
    ),
    "archive": (
        "The password of the {s} archive is {a}.",
        "What is the password of the {s} archive?",
        lambda rng: pseudo_word(rng, 3),
    ),
    "ferry": (
        "The ferry to {s} Island leaves from pier {a}.",
        "From which pier does the ferry to {s} Island leave?",
        lambda rng: _digits(rng, 3, 3),
    ),
    "keeper": (
        "The keeper of the {s} lighthouse is called {a}.",
        "What is the keeper of the {s} lighthouse called?",
        _name,
    ),
    "orchard": (
        "The {s} orchard has exactly {a} trees.",
        "How many trees does the {s} orchard have?",
        lambda rng: _digits(rng, 3, 5),
    ),
}


@dataclass
class Fact:
    kind: str
    subject: str
    answer: str
    depth: float  # requested depth in the document, in [0, 1]

    @property
    def statement(self) -> str:
        return FACT_KINDS[self.kind][0].format(s=self.subject, a=self.answer)

    @property
    def question(self) -> str:
        return FACT_KINDS[self.kind][1].format(s=self.subject)


def make_facts(rng: random.Random, n: int) -> list[Fact]:
    """``n`` facts (distinct subjects and answers) in document order, fact ``i`` in the ``i``-th of ``n`` strata."""
    kinds = list(FACT_KINDS)
    rng.shuffle(kinds)
    subjects: list[str] = []
    answers: list[str] = []
    facts = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        s = _name(rng)
        while s in subjects:
            s = _name(rng)
        a = FACT_KINDS[kind][2](rng)
        while any(a in x or x in a for x in answers):  # no answer inside another: the score looks for it in text
            a = FACT_KINDS[kind][2](rng)
        subjects.append(s)
        answers.append(a)
        facts.append(Fact(kind, s, a, round((i + 0.15 + 0.7 * rng.random()) / n, 4)))
    return facts


def first_message(document: str, question: str) -> str:
    return f"{document}\n\n{INSTRUCTION}\nQuestion: {question}"


def turn_messages(document: str, questions: Sequence[str], answers: Sequence[str]) -> list[dict[str, str]]:
    """Turn ``len(answers) + 1``'s chat: the document with the first question, then each earlier answer
    and the next question. Every question is its user message's last line (the prefix cache stops there)."""
    if len(answers) >= len(questions):
        raise ValueError(f"{len(answers)} answers for {len(questions)} questions: no turn left")
    msgs = [{"role": "user", "content": first_message(document, questions[0])}]
    for i, a in enumerate(answers):
        msgs += [{"role": "assistant", "content": a}, {"role": "user", "content": f"Question: {questions[i + 1]}"}]
    return msgs


@dataclass
class MultiTurnSample(Sample):
    """A conversation: ``input_ids`` is turn 1's prompt; ``expected[t]`` is turn ``t + 1``'s answer."""

    document: str = ""
    questions: list[str] = field(default_factory=list)


class MultiTurnTask(Task):
    """``samples`` conversations per length, each from its own seed: ``turns`` facts in a PG-19 haystack,
    one question per turn."""

    name = "multiturn"

    def __init__(
        self,
        haystack: str,
        lengths: list[int],
        samples: int = 5,
        seed: int = 0,
        turns: int = DEFAULT_TURNS,
        haystack_name: str = "pg19",
        max_new_tokens: int | None = None,
        prefix_cache_gib: float = 1.0,
    ):
        if samples < 1 or turns < 1:
            raise InputError(f"samples and turns must be >= 1, got samples={samples}, turns={turns}")
        if not lengths:
            raise InputError("give at least one length")
        check_number("the prefix cache size (GiB)", prefix_cache_gib, 0, note=" (0 disables it)")
        self.sentences = split_sentences(haystack)
        if len(self.sentences) < MIN_SENTENCES_PER_FACT * turns:
            raise InputError(
                f"the haystack text has only {len(self.sentences)} sentences; "
                f"{turns} facts need at least {MIN_SENTENCES_PER_FACT * turns}"
            )
        self.lengths, self.n_samples, self.seed, self.turns = list(lengths), samples, seed, turns
        self.haystack_name, self.prefix_cache_gib = haystack_name, float(prefix_cache_gib)
        self.max_new_tokens = max_new_tokens or 32

    def config(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "turns": self.turns,
            "haystack": self.haystack_name,
            "max_new_tokens": self.max_new_tokens,
            "prefix_cache_gib": self.prefix_cache_gib,
        }

    # ----- samples ------------------------------------------------------------------------------
    def build_sample(self, tokenizer: PreTrainedTokenizerBase, length: int, index: int) -> MultiTurnSample:
        """Conversation ``index`` at ``length``. The facts, their depths, the question order and the haystack's
        first sentence depend on (seed, index) only, so a conversation has the same facts at every length."""
        seed = sample_seed(self.seed, self.name, index)
        rng = random.Random(seed)
        facts = make_facts(rng, self.turns)
        order = list(range(self.turns))
        rng.shuffle(order)
        start = rng.randrange(len(self.sentences))
        questions = [facts[i].question for i in order]

        def document(units: int) -> str:
            return insert_at_depths(
                take_sentences(self.sentences, start, units), [(f.depth, f.statement) for f in facts]
            )

        def ids_of(units: int) -> tuple[list[int], str]:
            doc = document(units)
            return render(tokenizer, first_message(doc, questions[0])), doc

        units, ids, doc = fit_units(ids_of, length)
        slots = [round(f.depth * units) for f in facts]
        if len(set(slots)) < len(slots) or units < MIN_SENTENCES_PER_FACT * self.turns:
            raise InputError(
                f"length {length} is too short for {self.turns} facts at distinct depths "
                f"(the document holds {units} sentences; {MIN_SENTENCES_PER_FACT * self.turns} needed)"
            )
        positions = [doc.index(f.statement) / len(doc) for f in facts]
        meta = {
            "seed": seed,
            "units": units,
            "facts": [
                {"kind": f.kind, "subject": f.subject, "answer": f.answer, "depth": f.depth, "position": round(p, 4)}
                for f, p in zip(facts, positions)
            ],
            "order": order,  # turn t asks facts[order[t]]
            "depths": [facts[i].depth for i in order],  # per turn, the asked fact's depth
        }
        return MultiTurnSample(
            f"{length}/{index}", length, ids, [facts[i].answer for i in order], meta, document=doc, questions=questions
        )

    def samples(self, tokenizer: PreTrainedTokenizerBase) -> Iterator[Sample]:
        for n in self.lengths:
            for i in range(self.n_samples):
                yield self.build_sample(tokenizer, n, i)

    def score(self, sample: Sample, answer: str) -> float:
        raise NotImplementedError("multiturn scores each turn: see evaluate")

    # ----- one conversation ---------------------------------------------------------------------
    def evaluate(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        sample: Sample,
        method: Method,
        allow_long: bool,
    ) -> dict[str, Any]:
        from tokensieve.engine.prefix_cache import PrefixReuse, chat_prefix_tokens, store_for_gib
        from tokensieve.engine.runner import encode_prompt

        if not isinstance(sample, MultiTurnSample):
            raise TypeError(f"multiturn evaluates its own samples, got {type(sample).__name__}")
        why = (
            cache_refusal(model, method)
            if self.prefix_cache_gib > 0
            else "the prefix cache is off (prefix_cache_gib=0)"
        )
        store = store_for_gib(self.prefix_cache_gib) if why is None else None
        answers: list[str] = []
        results: list[GenerationResult] = []
        turns: list[dict[str, Any]] = []
        for t, question in enumerate(sample.questions):
            msgs = turn_messages(sample.document, sample.questions, answers)
            ids = encode_prompt(tokenizer, msgs)
            m = method if store is None else PrefixReuse(method, store, chat_prefix_tokens(tokenizer, msgs, ids))
            res, revivals = run_generation(model, tokenizer, ids, m, self.max_tokens(sample), allow_long)
            answers.append(res.text)
            results.append(res)
            turns.append(turn_fields(t + 1, question, sample.expected[t], res) | revivals)
        return conversation_fields(turns, results, store is not None, why)


def cache_refusal(model: PreTrainedModel, method: Method) -> str | None:
    """Why the prefix cache cannot serve ``method`` on ``model`` (the cache's own rules), or None."""
    from tokensieve.engine.prefix_cache import refusal_on

    return refusal_on(model, method)


def turn_fields(turn: int, question: str, expected: str, res: GenerationResult) -> dict[str, Any]:
    kv = res.kv_tokens_prefill
    return {
        "turn": turn,
        "question": question,
        "expected": expected,
        "answer": res.text,
        "score": score_answer(res.text, [expected]),
        "prompt_tokens": res.prompt_tokens,
        "cached_tokens": int(res.details.get("prefix_cached_tokens", 0)),  # computed by an earlier turn, reused
        "stored_tokens": int(res.details.get("prefix_stored_tokens", 0)),  # computed by this turn, kept for later
        "kept_tokens": res.kept_tokens,
        "kv_kept": res.kv_kept,
        "kv_tokens_prefill": sum(kv) / len(kv) if kv else None,
        "ttft_s": res.ttft_s,
        "decode_tokens_per_s": res.decode_tokens_per_s,
        "generated_tokens": res.generated_tokens,
        "peak_memory_bytes": res.peak_memory_bytes,
    }


def _mean(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def conversation_fields(
    turns: list[dict[str, Any]], results: list[GenerationResult], reused: bool, note: str | None
) -> dict[str, Any]:
    """A conversation's result-line fields: the last turn's (the whole conversation's prompt: prompt, kept and
    KV tokens), with the score, TTFT and decode speed averaged over the turns, and the turns themselves."""
    out = generation_fields(results[-1])
    del out["answer"]
    revivals = [{k: t[k] for k in REVIVAL_FIELDS} for t in turns if "revived_total" in t]
    out |= {
        "score": _mean([t["score"] for t in turns]),
        "turn_scores": [t["score"] for t in turns],
        "answers": [t["answer"] for t in turns],
        "ttft_s": _mean([t["ttft_s"] for t in turns]),
        "ttft_s_first": turns[0]["ttft_s"],
        "ttft_s_later": _mean([t["ttft_s"] for t in turns[1:]]),
        "decode_tokens_per_s": _mean([t["decode_tokens_per_s"] for t in turns]),
        "generated_tokens": sum(t["generated_tokens"] for t in turns),
        "peak_memory_bytes": max(t["peak_memory_bytes"] for t in turns),
        "cached_tokens": sum(t["cached_tokens"] for t in turns),
        "prefix_reused": reused,
        "prefix_note": note,
        "turns": turns,
    }
    return out | (merge_revival_fields(revivals) if revivals else {})
