"""Perplexity: decode mode with full attention equals a plain forward; GemFilter keeping everything equals full."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from eval_support import TEXT, byte_model, byte_tokenizer

import tokensieve
from tokensieve.evaluation.harness import read_results, run_eval
from tokensieve.evaluation.ppl import PerplexityTask, decode_nll, sliding_nll


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def reference_nll(model, ids, scored):
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()  # [n, vocab]
    return F.cross_entropy(logits[-scored - 1 : -1], ids[0, -scored:], reduction="sum").item()


@pytest.mark.parametrize("family, layers", [("llama", 3), ("qwen2", 2)])
def test_decode_mode_matches_plain_forward(family, layers, tok):
    model = byte_model(family, layers=layers)
    ids = torch.tensor([tok(TEXT[:200])["input_ids"]])
    ref = reference_nll(model, ids, 20)
    full = decode_nll(model, None, ids, tokensieve.make_method("full"), 20)
    assert full["nll"] == pytest.approx(ref, rel=1e-4) and full["tokens"] == 20
    assert full["ppl"] == pytest.approx(math.exp(ref / 20), rel=1e-4)
    assert sliding_nll(model, ids, 20)["nll"] == pytest.approx(ref, rel=1e-4)
    # GemFilter with k >= n keeps every token: the same loss
    gem = decode_nll(model, None, ids, tokensieve.make_method("gemfilter", topk=10_000), 20)
    assert gem["nll"] == pytest.approx(ref, rel=1e-4)
    # ... and with k < n it keeps k tokens (a different loss)
    small = decode_nll(model, None, ids, tokensieve.make_method("gemfilter", topk=16), 20)
    assert small["kept_tokens"] == 16 and small["nll"] != pytest.approx(ref, rel=1e-4)


def test_windows_and_task_run(tok, tmp_path):
    model = byte_model()
    task = PerplexityTask(TEXT, [128], samples=3, score_tokens=16)
    samples = list(task.samples(tok))
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert [s.input_ids for s in samples] == [ids[0:128], ids[128:256], ids[256:384]]
    path = run_eval(model, tok, task, ["full", "gemfilter"], tmp_path, "tiny", progress=False)
    rows = read_results(path)
    assert len(rows) == 6 and all(r["tokens"] == 16 and r["ppl"] > 1 and r["score"] is None for r in rows)

    sliding = PerplexityTask(TEXT, [128], samples=3, mode="sliding", stride=64)
    ss = list(sliding.samples(tok))
    assert [s.meta["start"] for s in ss] == [0, 64, 128] and [s.meta["scored"] for s in ss] == [127, 64, 64]
    path = run_eval(model, tok, sliding, ["full", "gemfilter"], tmp_path / "s", "tiny", progress=False)
    rows = read_results(path)
    assert all(r.get("error") is None for r in rows if r["method"] == "full")
    assert all("full attention only" in r["error"] for r in rows if r["method"] == "gemfilter")
    with pytest.raises(ValueError, match="score-tokens"):
        PerplexityTask(TEXT, [16], score_tokens=16)


def test_every_method_scores_through_the_driver(tok, tmp_path):
    """Decode-mode perplexity runs each method through the runner (prepare included: SepLLM's separators)."""
    from tokensieve.methods import METHODS

    model = byte_model()
    task = PerplexityTask(TEXT, [128], samples=1, score_tokens=8)
    path = run_eval(model, tok, task, list(METHODS), tmp_path, "tiny", progress=False)
    rows = read_results(path)
    assert sorted(r["method"] for r in rows) == sorted(METHODS)
    assert all(r.get("error") is None and math.isfinite(r["ppl"]) and r["tokens"] == 8 for r in rows), rows
