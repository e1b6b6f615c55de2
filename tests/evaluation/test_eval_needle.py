"""Needle task: grid keys, the needle and question in the prompt, scoring, recall, and the eval/needle commands."""

from __future__ import annotations

import json

import pytest
import torch
from eval_support import TEXT, byte_model, byte_tokenizer, save_model_dir

import tokensieve
from tokensieve.cli import main
from tokensieve.evaluation.harness import read_results, run_eval
from tokensieve.evaluation.needle import DEFAULT_NEEDLE, NeedleTask, score_answer


def test_samples_and_recall(tmp_path):
    tok = byte_tokenizer()
    task = NeedleTask(TEXT, [600, 900], [0.0, 0.5, 1.0], max_new_tokens=2)
    samples = list(task.samples(tok))
    assert [s.key for s in samples] == [f"{n}/{d:g}" for n in (600, 900) for d in (0.0, 0.5, 1.0)]
    for s in samples:
        text = tok.decode(s.input_ids)
        span = tok.decode([s.input_ids[i] for i in s.meta["needle_span"]])
        assert DEFAULT_NEEDLE in text and DEFAULT_NEEDLE in span and text.endswith("San Francisco?")
        assert abs(len(s.input_ids) - s.length) < 30
    # the needle moves with the depth
    pos = [tok.decode(s.input_ids).index(DEFAULT_NEEDLE) for s in samples[3:]]
    assert pos[0] < pos[1] < pos[2]
    path = run_eval(
        byte_model(),
        tok,
        task,
        ["full", tokensieve.make_method("gemfilter", topk=64)],
        tmp_path,
        "tiny",
        progress=False,
    )
    rows = read_results(path)
    assert all(r["needle_recall"] is None for r in rows if r["method"] == "full")
    assert all(0 <= r["needle_recall"] <= 1 for r in rows if r["method"] == "gemfilter")
    # answer_recall: the share of the expected phrases' tokens among the kept ones, recomputed here
    for s in samples:
        answer = s.meta["answer_span"]
        assert "".join(tok.decode([s.input_ids[i]]) for i in answer).replace(" ", "") in (
            "sandwichDoloresPark",
            "DoloresParksandwich",
        )
        gem = tokensieve.make_method("gemfilter", topk=64)
        from tokensieve.engine.runner import generate

        kept = set(generate(byte_model(), tok, torch.tensor([s.input_ids]), method=gem, max_new_tokens=1).kept_indices)
        row = next(r for r in rows if r["method"] == "gemfilter" and r["key"] == s.key)
        assert row["answer_recall"] == pytest.approx(sum(i in kept for i in answer) / len(answer))
    assert all(r["answer_recall"] is None for r in rows if r["method"] == "full")
    assert len(task.plots(rows, tmp_path / "plots")) == 2


def test_score_answer():
    assert score_answer("Eat a sandwich and sit in Dolores Park.") == 1.0
    assert score_answer("Eat a sandwich.") == 0.5
    assert score_answer("Visit the Golden Gate bridge.") == 0.0
    assert score_answer("DOLORES   park", ["Dolores Park"]) == 1.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama and the byte tokenizer saved as a model folder, for the command line."""
    return save_model_dir(tmp_path_factory.mktemp("tiny-model"))


def test_needle_alias_and_eval_needle(model_dir, tmp_path, capsys):
    args = [
        "--model",
        str(model_dir),
        "--methods",
        "full",
        "--lengths",
        "600",
        "--depths",
        "0,1",
        "--haystack",
        str(model_dir / "hay.txt"),
        "--max-new-tokens",
        "2",
        "--quiet",
    ]
    assert main(["needle", *args, "--out", str(tmp_path / "a")]) == 0
    assert main(["eval", "needle", *args, "--out", str(tmp_path / "b")]) == 0
    a = [json.loads(x) for x in (tmp_path / "a" / "needle.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "needle.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in a] == [r["answer"] for r in b] and len(a) == 2
    assert (tmp_path / "a" / "plots").is_dir() and (tmp_path / "a" / "report.md").exists()
    assert "| needle | full | 600 | 2 |" in capsys.readouterr().out


def test_eval_ruler_and_ppl_commands(model_dir, tmp_path, capsys):
    common = [
        "--model",
        str(model_dir),
        "--methods",
        "full,gemfilter",
        "--topk",
        "64",
        "--quiet",
        "--out",
        str(tmp_path),
    ]
    assert (
        main(
            [
                "eval",
                "ruler",
                *common,
                "--lengths",
                "900",
                "--samples",
                "1",
                "--tasks",
                "niah_single,fwe",
                "--haystack",
                str(model_dir / "hay.txt"),
                "--max-new-tokens",
                "2",
            ]
        )
        == 0
    )
    rows = read_results(tmp_path / "ruler.jsonl")
    assert len(rows) == 4 and {r["params"].get("topk") for r in rows if r["method"] == "gemfilter"} == {64}
    assert rows[0]["command"].startswith("tokensieve eval ruler --model ")
    # a rerun with another seed into the same folder is refused (exit code 2, message names the seed)
    assert (
        main(
            [
                "eval",
                "ruler",
                *common,
                "--lengths",
                "900",
                "--samples",
                "1",
                "--tasks",
                "niah_single,fwe",
                "--haystack",
                str(model_dir / "hay.txt"),
                "--max-new-tokens",
                "2",
                "--seed",
                "5",
            ]
        )
        == 2
    )
    assert "seed=0 (now 5)" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "ppl",
                *common,
                "--lengths",
                "200",
                "--samples",
                "2",
                "--score-tokens",
                "8",
                "--file",
                str(model_dir / "hay.txt"),
            ]
        )
        == 0
    )
    assert len(read_results(tmp_path / "ppl.jsonl")) == 4
    report = (tmp_path / "report.md").read_text()
    assert "ppl" in report and "ruler" in report and "fwe" in report
