"""RULER-style generators: deterministic for a seed, sized to the length, answers really in the prompt; RULER's scorer."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from eval_support import TEXT, byte_tokenizer

from tokensieve.evaluation.ruler import RULER_TASKS, RulerTask, fit_units, score_all

LENGTH = 1500


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def samples(tok):
    task = RulerTask([LENGTH], samples=2, seed=7, haystack=TEXT)
    return {s.key: s for s in task.samples(tok)}


def test_answer_span_is_where_the_answers_are_written(tok, samples):
    for s in samples.values():
        if s.meta["subtask"] in ("cwe", "fwe"):
            assert "answer_span" not in s.meta
            continue
        span = s.meta["answer_span"]
        text = "".join(tok.decode([s.input_ids[i]]) for i in span)
        assert span == sorted(set(span)) and all(a in text for a in s.expected)


def test_all_subtasks_and_keys(samples):
    assert sorted(samples) == sorted(f"{t}/{LENGTH}/{i}" for t in RULER_TASKS for i in range(2))


def test_deterministic_for_a_seed(tok, samples):
    again = {s.key: s for s in RulerTask([LENGTH], samples=2, seed=7, haystack=TEXT).samples(tok)}
    for k, s in samples.items():
        assert again[k].input_ids == s.input_ids and again[k].expected == s.expected
    other = {s.key: s for s in RulerTask([LENGTH], samples=2, seed=8, haystack=TEXT).samples(tok)}
    assert sum(other[k].expected != s.expected for k, s in samples.items()) >= len(samples) - 1
    # two samples of one subtask differ
    assert samples[f"niah_single/{LENGTH}/0"].expected != samples[f"niah_single/{LENGTH}/1"].expected


def test_prompts_fit_the_length(tok, samples):
    for s in samples.values():
        assert len(s.input_ids) <= LENGTH, s.key
        # the haystack is as large as fits: one more unit would not (sentence ~90 bytes, entry ~12, word ~6)
        assert len(s.input_ids) > LENGTH - 200, (s.key, len(s.input_ids))


def test_fit_units_finds_the_largest_size():
    def ids_of(u):
        return [0] * (50 + 7 * u), None

    units, ids, _ = fit_units(ids_of, 1000)
    assert units == (1000 - 50) // 7 and len(ids) <= 1000
    with pytest.raises(ValueError, match="too short"):
        fit_units(ids_of, 40)


def _prompt(tok, s):
    return tok.decode(s.input_ids)


def test_niah_answers_in_prompt(tok, samples):
    for t in ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"):
        s = samples[f"{t}/{LENGTH}/0"]
        text = _prompt(tok, s)
        for key in s.meta["keys"]:
            assert key in text.split("What are all")[1]  # asked in the question
        for v in s.expected:
            needle = re.search(rf"One of the special magic numbers for ([\w-]+) is: {v}\.", text)
            assert needle and needle.group(1) in s.meta["keys"], (t, v)
    s = samples[f"niah_multikey/{LENGTH}/0"]
    assert len(s.expected) == 1 and _prompt(tok, s).count("One of the special magic numbers") == 4
    assert len(samples[f"niah_multivalue/{LENGTH}/0"].expected) == 4
    assert len(samples[f"niah_multiquery/{LENGTH}/0"].expected) == 4


def test_key_types(tok):
    task = RulerTask([LENGTH], samples=1, tasks=["niah_single"], key_type="uuid", value_type="uuid", haystack=TEXT)
    s = next(task.samples(tok))
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", s.expected[0])
    assert s.expected[0] in _prompt(tok, s)
    task = RulerTask(
        [LENGTH], samples=1, tasks=["niah_single"], key_type="number", value_type="word", haystack_kind="noise"
    )
    s = next(task.samples(tok))
    assert re.fullmatch(r"[a-z]+-[a-z]+", s.expected[0]) and s.expected[0] in _prompt(tok, s)
    assert "The grass is green." in _prompt(tok, s)


def test_vt_chain_resolves_to_the_answer(tok, samples):
    text = _prompt(tok, samples[f"vt/{LENGTH}/0"])
    value = samples[f"vt/{LENGTH}/0"].meta["value"]
    assign = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", text))

    def resolve(v):
        while assign[v].startswith("VAR "):
            v = assign[v][4:]
        return assign[v]

    holders = sorted(v for v in assign if resolve(v) == value)
    assert holders == sorted(samples[f"vt/{LENGTH}/0"].expected) and len(holders) == 5


def test_cwe_common_words_are_the_most_common(tok, samples):
    s = samples[f"cwe/{LENGTH}/0"]
    body = _prompt(tok, s).split("Question:")[0]
    counts = Counter(re.findall(r"^\d+\. (\w+)$", body, flags=re.M))
    common = {w for w, _ in counts.most_common(10)}
    assert common == set(s.expected)
    assert min(counts[w] for w in common) > max((c for w, c in counts.items() if w not in common), default=0)


def test_fwe_top_three(tok, samples):
    s = samples[f"fwe/{LENGTH}/0"]
    body = _prompt(tok, s).split("coded words. ")[1].split("\nQuestion:")[0]
    counts = Counter(body.split()).most_common(4)
    assert [w for w, _ in counts[:3]] == s.expected and counts[2][1] > counts[3][1]


def test_score_all_right_wrong_partial():
    exp = ["4105176", "998877"]
    assert score_all("The numbers are 4105176 and 998877.", exp) == 1.0
    assert score_all("I do not know.", exp) == 0.0
    assert score_all("It is 4105176.", exp) == 0.5
    assert score_all("CQFPH, idpxa", ["CQFPH", "IDPXA", "OOPPM", "TTRPO"]) == 0.5  # case-insensitive
    with pytest.raises(ValueError):
        score_all("x", [])


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown RULER task"):
        RulerTask([1024], tasks=["nope"], haystack=TEXT)
    with pytest.raises(ValueError, match="key type"):
        RulerTask([1024], key_type="emoji", haystack=TEXT)


@pytest.mark.real_model
def test_real_tokenizer_sizes():
    from transformers import AutoTokenizer

    from tokensieve.core.models import cache_dir, load_model

    folder = cache_dir() / "smollm2"
    tok = (
        AutoTokenizer.from_pretrained(str(folder))
        if (folder / "tokenizer_config.json").exists()
        else load_model("smollm2")[1]
    )
    for s in RulerTask([1024], samples=1, seed=0, haystack=TEXT).samples(tok):
        assert 1024 - 100 < len(s.input_ids) <= 1024, (s.key, len(s.input_ids))
        text = tok.decode(s.input_ids)
        assert all(e in text for e in s.expected), s.key
        assert "<|im_start|>assistant" in text  # the chat template is applied
        assert text.rstrip().rstrip(":").endswith(" are")  # ... and the answer starts with RULER's prefix
