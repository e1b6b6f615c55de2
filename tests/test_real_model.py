"""A few checks on the real embedded SmolLM2-135M-Instruct (CPU, a few seconds each)."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model

import tokensieve
from tokensieve import cli
from tokensieve.data import read_text
from tokensieve.evaluation.needle import build_needle_prompt, score_answer

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def haystack():
    try:
        return read_text(min_chars=40_000)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def test_gemfilter_finds_the_needle(smollm2, haystack):
    """~2.5k-token PG-19 haystack, the paper's needle at three depths, k = 1024 (default layer 18)."""
    model, tok = smollm2
    scores = []
    for depth in (0.2, 0.5, 0.8):
        p = build_needle_prompt(tok, haystack, 2500, depth)
        res = tokensieve.generate(model, tok, p.messages, method="gemfilter", topk=1024, max_new_tokens=24)
        assert res.prompt_tokens == p.length and res.kept_tokens == 1024
        recall = len(set(p.needle_span) & set(res.kept_indices)) / len(p.needle_span)
        assert recall >= 0.9, (depth, recall)  # the selection holds (nearly) the whole needle
        assert "sandwich" in res.text.lower(), res.text
        scores.append(score_answer(res.text))
    assert sum(s == 1.0 for s in scores) >= 2, scores  # fully right ("sandwich" and "Dolores Park") at >= 2 depths


def test_chat_template_and_answer(smollm2):
    model, tok = smollm2
    res = tokensieve.generate(model, tok, "What is the capital of France?", max_new_tokens=12)
    assert "Paris" in res.text


def test_load_from_local_folder(smollm2, tmp_path, tok=None):
    model, tok = smollm2
    tiny = tiny_model("llama")
    tiny.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, ltok = tokensieve.load_model(str(tmp_path), device="cpu")
    assert loaded.config._attn_implementation == "tokensieve"
    assert loaded.config.num_hidden_layers == tiny.config.num_hidden_layers


def test_cli_ask_json(smollm2, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("The secret code of the vault is 4812. The weather was fine all week.")
    rc = cli.main(
        [
            "ask",
            "--file",
            str(doc),
            "--question",
            "What is the secret code of the vault?",
            "--method",
            "gemfilter",
            "--topk",
            "16",
            "--json",
            "--show-selection",
            "--max-new-tokens",
            "16",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for key in (
        "answer",
        "method",
        "model",
        "prompt_tokens",
        "kept_tokens",
        "ttft_s",
        "peak_memory_bytes",
        "kept_text",
    ):
        assert key in out
    assert out["kept_tokens"] == 16 and out["method"] == "gemfilter"
    assert "[...]" in out["kept_text"]
