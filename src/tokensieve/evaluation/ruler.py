"""RULER-style synthetic tasks, generated on the fly from a seed.

Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context
Language Models?", 2024 (arXiv:2404.06654). The task families, prompt
wording and scoring follow the paper's synthetic tasks; the text is generated
here (no RULER code or data is used):

* ``niah_single``: one needle "One of the special magic numbers for KEY is: VALUE."
  in a haystack; answer its value.
* ``niah_multikey``: ``num_keys`` needles with different keys; one is asked for.
* ``niah_multivalue``: ``num_values`` needles with the same key; all values are asked for.
* ``niah_multiquery``: ``num_queries`` needles with different keys; all are asked for.
* ``vt`` (variable tracking): a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... hidden
  in noise (plus distractor chains); name every variable holding the value.
* ``cwe`` (common-words extraction): a numbered word list where ``num_common`` words
  appear ``freq_common`` times and the rest ``freq_rare`` times; name the common ones.
* ``fwe`` (frequent-words extraction): coded words drawn from a Zipf distribution
  (exponent ``alpha``); name the three most frequent.

Keys of the needle tasks are words (``adjective-noun``), numbers (7 digits) or
UUIDs; so are values. The haystack is ``essay`` (sentences of PG-19 books or
any text file, as RULER's Paul Graham essays) or ``noise`` (RULER's repeated
"The grass is green. ..." sentences).

Every prompt is sized with the tokenizer: the largest haystack (in whole
sentences, list entries or words) whose prompt, chat template and answer prefix
included, is at most the requested length. The random draws of a sample
depend only on the seed, not on the size, so the same sample at two sizes has
the same needles at the same relative depths.

Scoring is RULER's ``string_match_all``: the fraction of expected items that
appear in the answer (case-insensitive).
"""

from __future__ import annotations

import random
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokensieve.errors import InputError
from tokensieve.evaluation.harness import Sample, Task, render, sample_seed
from tokensieve.evaluation.needle import answer_span

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
KEY_TYPES = ("word", "number", "uuid")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# RULER's answer budgets per family (tokens).
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}

ADJECTIVES = (
    "ancient bitter brave bright calm careful cheerful clever curious daring eager elegant fancy fierce gentle "
    "glossy golden graceful grumpy happy hollow humble icy jolly lively lucky mellow misty modest noisy "
    "patient plain polite proud quiet rapid rare rustic scarlet shiny silent silver sleepy smooth sour "
    "steady sturdy sunny swift tender tidy velvet vivid wary wicked wise witty"
).split()
NOUNS = (
    "anchor apple badger banjo beacon bison candle canyon cactus castle cobra comet cottage crystal dolphin "
    "dragon eagle falcon ferry fiddle forest garden glacier goblet harbor hammer helmet island jaguar kettle "
    "lantern lemon lizard meadow mirror monkey needle oasis orchard otter panther parrot pepper pillow "
    "pirate planet puzzle rabbit raven river saddle salmon signal spider tiger tornado trumpet tulip "
    "valley violin walrus wizard"
).split()
_CONS, _VOWELS = "bdfgklmnprstvz", "aeiou"


@dataclass
class Built:
    """A generated prompt before tokenization."""

    user: str
    answer_prefix: str
    answers: list[str]
    meta: dict[str, Any]


def score_all(answer: str, expected: list[str]) -> float:
    """RULER's ``string_match_all``: fraction of ``expected`` items found in ``answer`` (case-insensitive)."""
    if not expected:
        raise ValueError("expected items must not be empty")
    a = answer.lower()
    return sum(e.lower() in a for e in expected) / len(expected)


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (whitespace collapsed), split after . ! ? followed by a space."""
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split()))]
    return [s for s in sents if s]


def pseudo_word(rng: random.Random, syllables: int = 3) -> str:
    return "".join(rng.choice(_CONS) + rng.choice(_VOWELS) for _ in range(syllables))


def make_item(rng: random.Random, kind: str) -> str:
    if kind == "word":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise InputError(f"unknown key/value type {kind!r}; expected one of {', '.join(KEY_TYPES)}")


def distinct_items(rng: random.Random, kind: str, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        x = make_item(rng, kind)
        if x not in out:
            out.append(x)
    return out


def insert_at_depths(sentences: list[str], inserts: list[tuple[float, str]]) -> str:
    """Join ``sentences`` with each insert placed at its depth in [0, 1] (between sentences)."""
    slots: dict[int, list[str]] = {}
    for depth, text in inserts:
        slots.setdefault(round(depth * len(sentences)), []).append(text)
    out: list[str] = []
    for i in range(len(sentences) + 1):
        out += slots.get(i, [])
        if i < len(sentences):
            out.append(sentences[i])
    return " ".join(out)


def take_sentences(pool: list[str], start: int, n: int) -> list[str]:
    return [pool[(start + i) % len(pool)] for i in range(n)]


class RulerTask(Task):
    """RULER-style tasks; ``samples`` prompts per (subtask, length), each from its own derived seed."""

    name = "ruler"

    def __init__(
        self,
        lengths: list[int],
        samples: int = 10,
        seed: int = 0,
        tasks: tuple[str, ...] | list[str] = RULER_TASKS,
        haystack: str | None = None,
        haystack_name: str = "pg19",
        haystack_kind: str = "essay",
        key_type: str = "word",
        value_type: str = "number",
        num_keys: int = 4,
        num_values: int = 4,
        num_queries: int = 4,
        vt_chains: int = 1,
        vt_hops: int = 4,
        num_common: int = 10,
        fwe_alpha: float = 2.0,
        answer_prefix: bool = True,
        max_new_tokens: int | None = None,
    ):
        bad = [t for t in tasks if t not in RULER_TASKS]
        if bad or not tasks:
            raise InputError(f"unknown RULER task(s) {bad or list(tasks)}; expected any of: {', '.join(RULER_TASKS)}")
        for label, kind in (("key type", key_type), ("value type", value_type)):
            if kind not in KEY_TYPES:
                raise InputError(f"{label} {kind!r} is not one of {', '.join(KEY_TYPES)}")
        if haystack_kind not in ("essay", "noise"):
            raise InputError(f"haystack kind {haystack_kind!r} is not 'essay' or 'noise'")
        if haystack_kind == "essay" and any(t.startswith("niah") for t in tasks) and not haystack:
            raise InputError("the essay haystack needs text (a file or the PG-19 books)")
        for label, v in (
            ("num_keys", num_keys),
            ("num_values", num_values),
            ("num_queries", num_queries),
            ("vt_chains", vt_chains),
            ("vt_hops", vt_hops),
            ("num_common", num_common),
            ("samples", samples),
        ):
            if v < 1:
                raise InputError(f"{label} must be >= 1, got {v}")
        self.lengths, self.n_samples, self.seed, self.tasks = list(lengths), samples, seed, list(tasks)
        self.haystack_name, self.haystack_kind = haystack_name, haystack_kind
        self.key_type, self.value_type = key_type, value_type
        self.num_keys, self.num_values, self.num_queries = num_keys, num_values, num_queries
        self.vt_chains, self.vt_hops, self.num_common, self.fwe_alpha = vt_chains, vt_hops, num_common, fwe_alpha
        self.answer_prefix, self.max_new_override = answer_prefix, max_new_tokens
        self.sentences = split_sentences(haystack) if haystack and haystack_kind == "essay" else []
        if haystack_kind == "essay" and any(t.startswith("niah") for t in tasks) and len(self.sentences) < 10:
            raise InputError(f"the haystack text has only {len(self.sentences)} sentences; expected at least 10")

    def config(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "haystack": self.haystack_name if self.haystack_kind == "essay" else "noise",
            "key_type": self.key_type,
            "value_type": self.value_type,
            "num_keys": self.num_keys,
            "num_values": self.num_values,
            "num_queries": self.num_queries,
            "vt_chains": self.vt_chains,
            "vt_hops": self.vt_hops,
            "num_common": self.num_common,
            "fwe_alpha": self.fwe_alpha,
            "answer_prefix": self.answer_prefix,
            "max_new_tokens": self.max_new_override,
        }

    # ----- generation ---------------------------------------------------------------------------
    def builder(self, task: str, seed: int, length: int) -> Callable[[int], Built]:
        """``units -> Built`` for one sample; every random draw depends on ``seed`` only."""
        if task.startswith("niah"):
            return lambda units: self._niah(task, random.Random(seed), units)
        return {"vt": self._vt, "cwe": self._cwe, "fwe": self._fwe}[task](seed, length)

    def _haystack(self, rng: random.Random, units: int) -> list[str]:
        if self.haystack_kind == "noise":
            return [NOISE] * units
        return take_sentences(self.sentences, rng.randrange(len(self.sentences)), units)

    def _niah(self, task: str, rng: random.Random, units: int) -> Built:
        kind = {"word": "words", "number": "numbers", "uuid": "uuids"}[self.value_type]
        n_keys = {
            "niah_single": 1,
            "niah_multikey": self.num_keys,
            "niah_multivalue": 1,
            "niah_multiquery": self.num_queries,
        }[task]
        n_vals = self.num_values if task == "niah_multivalue" else 1
        keys = distinct_items(rng, self.key_type, n_keys)
        values = distinct_items(rng, self.value_type, n_keys * n_vals)
        needles = [(keys[i // n_vals], values[i]) for i in range(n_keys * n_vals)]
        depths = [rng.random() for _ in needles]
        hay = self._haystack(rng, units)
        text = insert_at_depths(
            hay, [(d, f"One of the special magic {kind} for {k} is: {v}.") for d, (k, v) in zip(depths, needles)]
        )
        if task == "niah_multiquery":
            asked, answers = keys, values
        elif task == "niah_multikey":
            asked, answers = keys[:1], values[:1]  # the others are distractors
        else:
            asked, answers = keys, values
        query = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + " and " + asked[-1]
        user = (
            f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {kind} afterwards.\n{text}\n"
            f"What are all the special magic {kind} for {query} mentioned in the provided text?"
        )
        prefix = f"The special magic {kind} for {query} mentioned in the provided text are"
        return Built(user, prefix, list(answers), {"keys": asked, "depths": [round(d, 4) for d in depths]})

    def _vt(self, seed: int, length: int) -> Callable[[int], Built]:
        def build(units: int) -> Built:
            rng = random.Random(seed)
            names: list[str] = []
            while len(names) < self.vt_chains * (self.vt_hops + 1):
                v = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
                if v not in names:
                    names.append(v)
            values = [str(v) for v in rng.sample(range(10_000, 100_000), self.vt_chains)]
            inserts = []
            for c in range(self.vt_chains):
                chain = names[c * (self.vt_hops + 1) : (c + 1) * (self.vt_hops + 1)]
                depths = sorted(rng.random() for _ in chain)
                stmts = [f"VAR {chain[0]} = {values[c]}."] + [
                    f"VAR {chain[i]} = VAR {chain[i - 1]}." for i in range(1, len(chain))
                ]
                inserts += list(zip(depths, stmts))
            answers = names[: self.vt_hops + 1]
            text = insert_at_depths([NOISE] * units, inserts)
            user = (
                "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                f"{text}\nQuestion: Find all variables that are assigned the value {values[0]} in the text above."
            )
            prefix = (
                f"Answer: According to the chain(s) of variable assignment in the text above, {len(answers)} variables "
                f"are assigned the value {values[0]}, they are:"
            )
            return Built(user, prefix, answers, {"value": values[0]})

        return build

    def cwe_frequencies(self, length: int) -> tuple[int, int]:
        """(appearances of each common word, of each rare word): RULER's 30 and 3, scaled down for short prompts
        so that the common words fill about half of the list (at ~4 tokens per entry)."""
        freq_common = min(30, max(2, length // (8 * self.num_common)))
        return freq_common, (3 if freq_common > 6 else 1)

    def _cwe(self, seed: int, length: int, freq_common: int | None = None) -> Callable[[int], Built]:
        fc, freq_rare = self.cwe_frequencies(length)
        freq_common = freq_common or fc
        freq_rare = min(freq_rare, freq_common - 1)

        def build(units: int) -> Built:
            rng = random.Random(seed)
            pool = list(dict.fromkeys(NOUNS + ADJECTIVES))
            rng.shuffle(pool)
            words = pool[: self.num_common]
            seen = set(pool)
            rare = pool[self.num_common :]
            while len(rare) < units:  # more rare words than the built-in lists hold: pronounceable pseudo-words
                w = pseudo_word(rng)
                if w not in seen:
                    seen.add(w)
                    rare.append(w)
            rare = rare[:units]
            entries = words * freq_common + rare * freq_rare
            random.Random(seed + 1).shuffle(entries)
            text = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(entries))
            n = self.num_common
            user = (
                "Below is a numbered list of words. In these words, some appear more often than others. "
                f"Memorize the ones that appear most often.\n{text}\nQuestion: What are the {n} most common words in the above list?"
            )
            prefix = f"Answer: The top {n} words that appear most often in the list are:"
            return Built(user, prefix, list(words), {"freq_common": freq_common, "freq_rare": freq_rare})

        return build

    def _fwe(self, seed: int, length: int) -> Callable[[int], Built]:
        def build(units: int) -> Built:
            rng = random.Random(seed)
            vocab: dict[str, None] = {}
            while len(vocab) < 1000:
                vocab["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 6)))] = None
            vocab = list(vocab)
            weights = [1.0 / (r + 1) ** self.fwe_alpha for r in range(len(vocab))]
            words = rng.choices(vocab, weights=weights, k=max(units, 4))
            # Make the top three strictly more frequent than the fourth (ties would make the answer ambiguous).
            while True:
                top = Counter(words).most_common(4)
                if len(top) < 4 or top[2][1] > top[3][1]:
                    break
                words[words.index(top[3][0])] = top[0][0]
            answers = [w for w, _ in Counter(words).most_common(3)]
            user = (
                "Read the following coded text and track the frequency of each coded word. Find the three most "
                f"frequently appeared coded words. {' '.join(words)}\nQuestion: Do not provide any explanation. "
                "What are the three most frequently appeared words in the above coded text?"
            )
            prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
            return Built(user, prefix, answers, {})

        return build

    def build_sample(self, tokenizer: PreTrainedTokenizerBase, task: str, length: int, index: int) -> Sample:
        seed = sample_seed(self.seed, task, length, index)
        build = self.builder(task, seed, length)

        def ids_of(units: int) -> tuple[list[int], Built]:
            b = build(units)
            return render(tokenizer, b.user, b.answer_prefix if self.answer_prefix else ""), b

        if task == "cwe":  # a tokenizer with more tokens per entry: fewer repetitions of the common words
            fc = self.cwe_frequencies(length)[0]
            while True:
                try:
                    build = self._cwe(seed, length, fc)
                    units, ids, b = fit_units(ids_of, length)
                    break
                except ValueError:
                    if fc <= 2:
                        raise
                    fc = max(2, fc // 2)
        else:
            units, ids, b = fit_units(ids_of, length)
        family = "niah" if task.startswith("niah") else task
        max_new = self.max_new_override or MAX_NEW_TOKENS[family]
        meta = {"subtask": task, "seed": seed, "units": units, "max_new_tokens": max_new} | b.meta
        if family in ("niah", "vt"):  # where each answer is written once in the prompt (cwe/fwe: words repeat)
            meta["answer_span"] = answer_span(tokenizer, ids, b.answers)
        return Sample(f"{task}/{length}/{index}", length, ids, b.answers, meta)

    def samples(self, tokenizer: PreTrainedTokenizerBase) -> Iterator[Sample]:
        for n in self.lengths:  # length first: a run stopped early has every subtask at the lengths it reached
            for task in self.tasks:
                for i in range(self.n_samples):
                    yield self.build_sample(tokenizer, task, n, i)

    def score(self, sample: Sample, answer: str) -> float:
        return score_all(answer, sample.expected)


def fit_units(
    ids_of: Callable[[int], tuple[list[int], Any]], length: int, max_units: int = 10_000_000
) -> tuple[int, list[int], Any]:
    """The largest ``units`` >= 1 whose prompt has at most ``length`` tokens (interpolation + bisection search)."""
    cache: dict[int, tuple[list[int], Any]] = {}

    def measure(u: int) -> int:
        if u not in cache:
            cache[u] = ids_of(u)
        return len(cache[u][0])

    t1 = measure(1)
    if t1 > length:
        raise InputError(f"length {length} is too short for this task: its smallest prompt has {t1} tokens")
    lo, hi = 1, None  # lo fits; hi (when known) does not
    u = 16
    while hi is None:  # grow until a size does not fit, guided by the tokens per unit seen so far
        t = measure(u)
        if t <= length:
            lo = u
            per = max((t - t1) / max(u - 1, 1), 1e-3)
            u = min(max_units, max(u + 1, int(1 + (length - t1) / per * 1.05) + 1))
            if lo == max_units:
                return lo, *cache[lo]
        else:
            hi = u
    bisect = False
    while hi - lo > 1:
        if bisect:
            u = (lo + hi) // 2
        else:  # linear interpolation between the bracket's token counts
            tl, th = measure(lo), measure(hi)
            u = lo + int((length - tl) / max(th - tl, 1) * (hi - lo))
            u = min(max(u, lo + 1), hi - 1)
        old = hi - lo
        if measure(u) <= length:
            lo = u
        else:
            hi = u
        bisect = (hi - lo) > old // 2  # interpolation did not halve the bracket: bisect next
    return lo, *cache[lo]
