"""The contract every method keeps, checked for every registered method x model family x entry point.

The cases come from the one registry (``tests/cases.py``): a method's no-op settings (which must reproduce full
attention exactly) and its lossy settings (which must keep at most their budget). A new method joins the matrix
with one ``Case`` there; ``test_every_method_has_a_case`` fails until it does.

Entry points: ``generate`` (greedy answers), ``score_continuation`` (teacher forcing, the perplexity
task) and the benchmark's ``bench_method``; all three go through the runner's one driver.
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import CASES, FAMILIES
from conftest import TinyTokenizer, random_ids, tiny_model

from tokensieve.bench.timing import bench_method
from tokensieve.engine.runner import generate, score_continuation
from tokensieve.methods import METHODS, make_method

N, NEW = 80, 8  # SnapKV's default observation window (32) fits in the cases' budget (40)


def within(model, kv_per_layer: list[int], bound: int) -> bool:
    """Every full-attention layer holds at most ``bound`` entries (sliding-window layers hold at most their window)."""
    cfg = model.config.get_text_config()
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * len(kv_per_layer)
    return all(kv <= (cfg.sliding_window if t == "sliding_attention" else bound) for kv, t in zip(kv_per_layer, types))


def test_every_method_has_a_case():
    assert sorted(c.method for c in CASES) == sorted(METHODS)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param)


def full_reference(model, ids):
    tok = TinyTokenizer()
    ref = generate(model, tok, ids, "full", max_new_tokens=NEW)
    cont = ids[0, -NEW:]
    score = score_continuation(model, tok, ids[:, :-NEW], cont, "full")
    return ref, score


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.method)
def test_noop_settings_equal_full_attention(model, case):
    ids = random_ids(N, seed=7)
    ref, ref_score = full_reference(model, ids)
    tok = TinyTokenizer()
    params = case.noop | case.extra
    res = generate(model, tok, ids, case.method, max_new_tokens=NEW, **params)
    assert res.token_ids == ref.token_ids
    assert res.kept_tokens == N
    score = score_continuation(model, tok, ids[:, :-NEW], ids[0, -NEW:], case.method, **params)
    torch.testing.assert_close(torch.tensor(score.nll), torch.tensor(ref_score.nll), rtol=1e-5, atol=1e-5)
    row = bench_method(model, make_method(case.method, **params), N, repeats=1, decode_tokens=2)
    assert row.status == "ok" and row.kept_tokens == N
    assert row.kv_tokens_prefill == res.kv_tokens_prefill[0]  # the benchmark and generate agree
    assert max(res.kv_tokens_prefill) == max(ref.kv_tokens_prefill) == N  # nothing evicted from full-attention layers


@pytest.mark.parametrize("case", [c for c in CASES if c.lossy is not None], ids=lambda c: c.method)
def test_lossy_settings_keep_at_most_their_budget(model, case):
    ids = random_ids(N, seed=8)
    tok = TinyTokenizer()
    params = case.lossy | case.extra
    res = generate(model, tok, ids, case.method, max_new_tokens=NEW, **params)
    assert len(res.token_ids) == NEW
    score = score_continuation(model, tok, ids[:, :-NEW], ids[0, -NEW:], case.method, **params)
    assert len(score.nll) == NEW and all(math.isfinite(x) for x in score.nll)
    row = bench_method(model, make_method(case.method, **params), N, repeats=1, decode_tokens=2)
    assert row.status == "ok", row.status
    if case.max_kv is not None:
        bound = case.max_kv(ids)
        assert within(model, res.kv_tokens_prefill, bound), (res.kv_tokens_prefill, bound)
        assert within(model, score.kv_tokens_prefill, case.max_kv(ids[:, :-NEW]))
        if not case.kv_depends_on_content:  # a count that depends on the prompt's length only
            assert row.kv_tokens_prefill == res.kv_tokens_prefill[0]  # the benchmark holds what generate holds
    if case.max_kept is not None:
        assert res.kept_tokens <= case.max_kept(N) and score.kept_tokens <= case.max_kept(N - NEW)


# -- a user's own model: loaded with another attention (``from_pretrained`` gives "sdpa")


def switch_warnings(record) -> list[str]:
    from tokensieve.core.attention import AttentionSwitchedWarning

    return [str(w.message) for w in record if issubclass(w.category, AttentionSwitchedWarning)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.method)
def test_sdpa_loaded_model_is_switched_and_answers_as_switched_by_hand(request, model, case):
    """Every method on a model built with attn_implementation="sdpa" gives the tokens, NLLs and KV counts of the same
    weights switched by hand, through generate, score_continuation and the benchmark; the switch is said once."""
    import warnings

    family = request.node.callspec.params["model"]
    user = tiny_model(family, attn="sdpa")  # the fixture's weights (same seed), never switched
    assert user.config._attn_implementation == "sdpa"
    ids = random_ids(N, seed=9)
    tok = TinyTokenizer()
    params = (case.lossy or case.noop) | case.extra
    ref = generate(model, tok, ids, case.method, max_new_tokens=NEW, **params)
    ref_score = score_continuation(model, tok, ids[:, :-NEW], ids[0, -NEW:], case.method, **params)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        res = generate(user, tok, ids, case.method, max_new_tokens=NEW, **params)
        score = score_continuation(user, tok, ids[:, :-NEW], ids[0, -NEW:], case.method, **params)
        row = bench_method(user, make_method(case.method, **params), N, repeats=1, decode_tokens=2)
    said = switch_warnings(record)
    assert len(said) == 1, said
    assert type(user).__name__ in said[0] and "'sdpa'" in said[0]
    assert user.config._attn_implementation == "tokensieve"
    assert res.token_ids == ref.token_ids
    assert res.kv_tokens_prefill == ref.kv_tokens_prefill and res.kept_tokens == ref.kept_tokens
    torch.testing.assert_close(torch.tensor(score.nll), torch.tensor(ref_score.nll), rtol=1e-5, atol=1e-5)
    assert row.status == "ok", row.status
