"""The span-aware selection rule (scoring.span_rank / span_topk) against a slow reference, and through
GemFilter and SnapKV: dilation keeps whole spans, dilation 1 is the old rule, k >= n is still full attention."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from tokensieve.core.scoring import pool_scores, sorted_topk, span_rank, span_scores, span_topk
from tokensieve.engine.runner import generate
from tokensieve.errors import InputError
from tokensieve.methods.full import FullAttention
from tokensieve.methods.gemfilter import GemFilter, pool_and_select
from tokensieve.methods.snapkv import SnapKV


def slow_rank(scores: list[float], kernel: int, pooling: str, dilation: int) -> list[int]:
    """The rule written out: zero-padded pooling, a max filter over the pooled scores (its peak: the first
    position holding the maximum), then a sort by (dilated desc, distance to the peak, pooled desc, position)."""
    n, h, d = len(scores), kernel // 2, dilation // 2
    if pooling == "avg":
        pooled = [sum(scores[j] for j in range(i - h, i + h + 1) if 0 <= j < n) / kernel for i in range(n)]
    else:
        pooled = [max(scores[j] for j in range(i - h, i + h + 1) if 0 <= j < n) for i in range(n)]
    window = [[j for j in range(i - d, i + d + 1) if 0 <= j < n] for i in range(n)]
    dilated = [max(pooled[j] for j in w) for w in window]
    peak = [min((j for j in w if pooled[j] == dilated[i]), key=lambda j: j) for i, w in enumerate(window)]
    return sorted(range(n), key=lambda i: (-dilated[i], abs(peak[i] - i), -pooled[i], i))


@pytest.mark.parametrize(
    "kernel, pooling, dilation", [(1, "avg", 3), (5, "avg", 7), (3, "max", 5), (5, "avg", 31), (1, "max", 1)]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_span_rank_matches_slow_reference(kernel, pooling, dilation, seed):
    g = torch.Generator().manual_seed(seed)
    # small integers: many exact ties, so the tie rule is exercised (float64: pooled sums are exact)
    scores = torch.randint(0, 6, (40,), generator=g).double()
    got = span_rank(scores, kernel, pooling, dilation).tolist()
    ref = slow_rank(scores.tolist(), kernel, pooling, dilation)
    if dilation == 1:  # plain pooled ranking: ties among equal pooled scores are not ordered by the rule
        pooled = pool_scores(scores, kernel, pooling)
        assert [round(float(pooled[i]), 9) for i in got] == [round(float(pooled[i]), 9) for i in ref]
        return
    assert got == ref
    for k in (1, 7, 40, 100):
        assert span_topk(scores, k, kernel, pooling, dilation).tolist() == sorted(got[: min(k, 40)])


def test_span_scores_batched_rows_are_independent():
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(2, 3, 50, generator=g)
    batched = span_scores(scores, 5, "avg", 9)
    for b in range(2):
        for h in range(3):
            assert torch.equal(batched[b, h], span_scores(scores[b, h], 5, "avg", 9))
    # the ranks are a permutation of 1..n per row
    assert (batched.sort(dim=-1).values == torch.arange(1, 51).float()).all()


def test_dilation_one_is_the_pooled_rule():
    g = torch.Generator().manual_seed(4)
    scores = torch.rand(300, generator=g)
    for k in (10, 64):
        assert span_topk(scores, k, 5).tolist() == sorted_topk(pool_scores(scores, 5, "avg"), k).tolist()
        assert pool_and_select(scores, k).tolist() == sorted_topk(pool_scores(scores, 5, "avg"), k).tolist()


def test_dilation_keeps_the_span_after_a_peak():
    # A matched key scores high; the value after it scores little; elsewhere noise a little above the value.
    scores = torch.full((200,), 0.2)
    scores[100:104] = 5.0  # the key
    scores[104:112] = 0.05  # the value's tokens: low attention of their own
    scores[::7] = 0.6  # scattered noise
    kept_plain = set(pool_and_select(scores, 24, kernel=5).tolist())
    kept_span = set(pool_and_select(scores, 24, kernel=5, dilation=31).tolist())
    value = set(range(104, 112))
    assert not value <= kept_plain  # the isolated top-k cuts the value
    assert value <= kept_span and set(range(100, 104)) <= kept_span


def test_gemfilter_select_applies_the_span_rule():
    model = tiny_model("llama", seed=3)
    ids = torch.randint(3, 90, (1, 80), generator=torch.Generator().manual_seed(1))
    m = GemFilter(topk=20, filter_layer=2, dilation=9, kernel=3)
    scores = m.scores(model, ids)
    ref = slow_rank(scores.double().tolist(), 3, "avg", 9)[:20]
    assert m.select(model, ids).tolist() == sorted(ref)
    assert m.pick(scores).tolist() == sorted(ref)


@pytest.mark.parametrize(
    "method",
    [GemFilter(topk=64, dilation=31, pooling="max", kernel=15), SnapKV(budget=64, window_size=8, dilation=31)],
    ids=lambda m: m.name,
)
def test_span_rule_with_room_for_everything_is_full_attention(method, tok):
    model = tiny_model("llama", seed=2)
    ids = torch.randint(3, 90, (1, 50), generator=torch.Generator().manual_seed(7))
    ref = generate(model, tok, ids, method=FullAttention(), max_new_tokens=6)
    got = generate(model, tok, ids, method=method, max_new_tokens=6)
    assert got.token_ids == ref.token_ids


def test_snapkv_dilation_keeps_span_ranked_entries_per_head():
    model = tiny_model("llama", seed=5)
    ids = torch.randint(3, 90, (1, 60), generator=torch.Generator().manual_seed(2))
    budget, window = 24, 6
    m = SnapKV(budget=budget, window_size=window, dilation=7)
    seen = {}

    original = SnapKV.scores

    def spy(self, module, query, key):
        s = original(self, module, query, key)
        from tokensieve.core.scoring import attention_scores

        raw = attention_scores(query[:, :, -window:], key, module.scaling)[..., : key.shape[2] - window]
        seen.setdefault(module.layer_idx, raw)
        return s

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SnapKV, "scores", spy)
        with torch.no_grad():
            state = m.prefill(model, ids)
    for layer, raw in seen.items():
        kept = state.cache.kept_positions(layer)[0]  # [hkv, budget]
        for h in range(raw.shape[1]):
            ref = slow_rank(raw[0, h].double().tolist(), 5, "avg", 7)[: budget - window]
            assert kept[h].tolist() == sorted(ref) + list(range(60 - window, 60))


@pytest.mark.parametrize(
    "params, match",
    [
        ({"dilation": 4}, "dilation must be a positive odd"),
        ({"dilation": 0}, "dilation must be an integer >= 1"),
        ({"dilation": 1 << 62}, r"dilation must be an integer in \[1, 4095\]"),
        ({"kernel": 1 << 40}, r"kernel must be an integer in \[1, 4095\]"),
        ({"pooling": "median"}, "pooling must be one of"),
    ],
)
@pytest.mark.parametrize("cls", [GemFilter, SnapKV])
def test_bad_span_parameters_raise(cls, params, match):
    model = tiny_model("llama")
    with pytest.raises(InputError, match=match):
        cls(**params).validate(model, 100)
