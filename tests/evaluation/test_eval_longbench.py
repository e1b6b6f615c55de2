"""LongBench: metrics on hand-written answers, data reading, templates and truncation, and a run on a tiny model."""

from __future__ import annotations

import json

import pytest
from eval_support import byte_model, byte_tokenizer

from tokensieve.evaluation.harness import read_results, run_eval
from tokensieve.evaluation.longbench import (
    TEMPLATES,
    LongBenchTask,
    classification,
    code_sim,
    count,
    qa_f1,
    read_longbench,
    retrieval,
    rouge_l,
    score_longbench,
    truncate_middle,
)


def test_qa_f1():
    assert qa_f1("The Eiffel Tower.", "eiffel tower") == 1.0  # articles, case, punctuation ignored
    assert qa_f1("Big Ben", "eiffel tower") == 0.0
    # pred {paris, france}, truth {paris}: precision 1/2, recall 1 -> F1 2/3
    assert qa_f1("Paris, France", "Paris") == pytest.approx(2 / 3)
    # best over references
    assert score_longbench("hotpotqa", "Paris, France", ["London", "Paris"]) == pytest.approx(2 / 3)


def test_rouge_l_is_the_rouge_packages():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0, abs=1e-6)
    assert rouge_l("dogs bark loudly", "the cat sat") == 0.0
    # The package splits at "." and takes, per reference sentence, the union of its LCSs with the
    # answer's sentences, counting distinct words. Reference r1 = "The cat sat on the mat", r2 = "A dog ran";
    # answer c1 = "A dog ran", c2 = "The cat sat". r1: LCS with c2 = {The, cat, sat} -> 3; r2: with c1 -> 3.
    # Distinct words: reference 9 (The, cat, sat, on, the, mat, A, dog, ran), answer 6.
    # R = 6/9, P = 6/6, F = 2PR / (P + R) = 0.8. (LCS over the whole lower-cased texts would give 0.4.)
    pred, ref = "A dog ran. The cat sat.", "The cat sat on the mat. A dog ran."
    assert rouge_l(pred, ref) == pytest.approx(2 * (6 / 9) / (1 + 6 / 9), abs=1e-6)
    assert score_longbench("gov_report", pred, ["unrelated words", ref]) == pytest.approx(0.8, abs=1e-6)
    # case is kept, as LongBench passes the strings as they are: "Paris" and "paris" are different words
    assert rouge_l("Paris", "paris") == 0.0
    # where the package raises (nothing to score), 0 as in LongBench
    assert rouge_l("", "the cat") == 0.0 and rouge_l("...", "the cat") == 0.0 and rouge_l("the cat", "") == 0.0


def _indel_ratio_percent(a: str, b: str) -> float:
    """fuzzywuzzy's ratio / 100 from its definition: 2 * LCS(a, b) / (len(a) + len(b)), in whole percent."""
    if not a and not b:
        return 1.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return round(100 * 2 * prev[-1] / (len(a) + len(b))) / 100


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("return x + 2", "return x + 1"),  # 22/24 = 91.7% -> 0.92
        ("self.assertEqual(a, b)", "self.assertTrue(a == b)"),
        ("for i in range(n):", "for j in range(len(xs)):"),
        ("a" * 150 + "b" * 100, "b" * 100 + "a" * 150),  # difflib's junk heuristic would give 0
    ],
)
def test_code_sim_is_fuzzywuzzy_ratio(pred, ref):
    assert code_sim(pred, ref) == _indel_ratio_percent(pred, ref)


def test_metrics_without_their_packages_say_how_to_install(monkeypatch):
    import sys

    from tokensieve.errors import InputError
    from tokensieve.evaluation import longbench

    monkeypatch.setitem(sys.modules, "rouge", None)  # import fails
    monkeypatch.setitem(sys.modules, "rapidfuzz", None)
    monkeypatch.setattr(longbench, "_rouge_scorer", None)
    with pytest.raises(InputError, match=r"pip install 'tokensieve\[eval\]'"):
        rouge_l("a", "a")
    with pytest.raises(InputError, match=r"pip install 'tokensieve\[eval\]'"):
        code_sim("a", "a")


def test_classification_rule():
    classes = ["Location", "Other location", "Description"]
    assert classification("Type: Location", "Location", all_classes=classes) == 1.0
    assert classification("Description", "Location", all_classes=classes) == 0.0
    # two classes named, the truth among them: half credit
    assert classification("Location or Description", "Location", all_classes=classes) == 0.5
    # "Location" inside the truth "Other location"... is not counted; truth matched alone
    assert classification("Other location", "Other location", all_classes=["Other location", "location"]) == 1.0


def test_retrieval_and_count():
    assert retrieval("Paragraph 12", "Paragraph 12") == 1.0
    assert retrieval("Paragraph 3", "Paragraph 12") == 0.0
    assert retrieval("Paragraph 3 or Paragraph 12", "Paragraph 12") == 0.5
    assert count("There are 7 unique paragraphs", "7") == 1.0
    assert count("Maybe 6 or 7", "7") == 0.5
    assert count("no idea", "7") == 0.0


def test_code_sim_takes_first_code_line():
    assert code_sim("\n# comment\nreturn x + 1\nmore", "return x + 1") == 1.0
    assert code_sim("zzzz", "return x + 1") == 0.0
    assert code_sim("```python\n// c\nreturn x + 2", "return x + 1") == code_sim("return x + 2", "return x + 1")


def test_first_line_only_for_few_shot():
    assert score_longbench("triviaqa", "Paris\nThe answer is London", ["London"]) == 0.0
    assert score_longbench("hotpotqa", "Paris\nThe answer is London", ["London"]) > 0


def test_truncate_middle():
    ids = list(range(10))
    assert truncate_middle(ids, 4) == [0, 1, 8, 9]
    assert truncate_middle(ids, 5) == [0, 1, 7, 8, 9]
    assert truncate_middle(ids, 20) == ids


def write_data(path):
    rows = [
        {
            "input": "Who baked the bread?",
            "context": "Anna baked the bread. " * 40,
            "answers": ["Anna"],
            "dataset": "hotpotqa",
            "_id": "a",
        },
        {"input": "", "context": "Report text. " * 30, "answers": ["A summary."], "dataset": "gov_report", "_id": "b"},
        {
            "input": "What is x?",
            "context": "ctx",
            "answers": ["Location"],
            "all_classes": ["Location", "Human"],
            "dataset": "trec",
            "_id": "c",
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return rows


def test_read_and_prompts(tmp_path):
    f = tmp_path / "lb.jsonl"
    write_data(f)
    assert [r["dataset"] for r in read_longbench(f)] == ["hotpotqa", "gov_report", "trec"]
    tok = byte_tokenizer()
    task = LongBenchTask(f, lengths=[400])
    samples = list(task.samples(tok))
    assert [s.key for s in samples] == ["hotpotqa/400/a", "gov_report/400/b", "trec/400/c"]
    assert samples[0].meta["max_new_tokens"] == 32 and samples[1].meta["max_new_tokens"] == 512
    text = tok.decode(samples[2].input_ids)
    assert text == TEMPLATES["trec"].format(context="ctx", input="What is x?")  # short: not truncated
    long = tok.decode(samples[0].input_ids)
    full = TEMPLATES["hotpotqa"].format(context=write_data(f)[0]["context"], input="Who baked the bread?")
    assert len(samples[0].input_ids) <= 400 and long[:150] == full[:150] and long[-150:] == full[-150:]
    # dataset filter and per-dataset sample limit
    assert [s.key for s in LongBenchTask(f, [400], datasets=["trec"]).samples(tok)] == ["trec/400/c"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "x", "dataset": "hotpotqa"}\n')
    with pytest.raises(ValueError, match="answers"):
        read_longbench(bad)


def test_run_on_tiny_model(tmp_path):
    f = tmp_path / "lb.jsonl"
    write_data(f)
    task = LongBenchTask(f, lengths=[300], max_new_tokens=3)
    path = run_eval(byte_model(), byte_tokenizer(), task, ["full"], tmp_path / "out", "tiny", progress=False)
    rows = read_results(path)
    assert len(rows) == 3 and all(0.0 <= r["score"] <= 1.0 and not r.get("error") for r in rows)
    assert {r["meta"]["metric"] for r in rows} == {"qa_f1", "rouge", "classification"}
