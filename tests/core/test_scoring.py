"""tokensieve.core.scoring against slow references written with loops (one query head, one query row at a time)."""

from __future__ import annotations

import math

import pytest
import torch

from tokensieve.core.scoring import (
    attention_scores,
    head_sum,
    paper_scores,
    pool_scores,
    sorted_topk,
    topk_with_recent,
)
from tokensieve.methods.lazyllm import last_token_attention

torch.set_num_threads(1)


def qk(b: int = 2, hq: int = 6, hkv: int = 2, q_len: int = 9, kv_len: int = 23, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, hq, q_len, d, generator=g), torch.randn(b, hkv, kv_len, d, generator=g)


def slow_attention_scores(query, key, scaling, mask=None) -> torch.Tensor:
    """float64 [b, kv_heads, kv_len]: for every query head and query row, softmax over its visible keys."""
    b, hq, q_len, _ = query.shape
    hkv, kv_len = key.shape[1], key.shape[2]
    g = hq // hkv
    out = torch.zeros(b, hkv, kv_len, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            k = key[bi, h // g].double()  # the KV head this query head reads
            for i in range(q_len):
                pos = kv_len - q_len + i
                visible = [j for j in range(pos + 1) if mask is None or bool(mask[min(bi, mask.shape[0] - 1), 0, i, j])]
                logits = torch.stack([k[j] @ query[bi, h, i].double() * scaling for j in visible])
                out[bi, h // g, visible] += torch.softmax(logits, dim=0)
    return out


def random_mask(b: int, q_len: int, kv_len: int, seed: int = 1) -> torch.Tensor:
    """Bool [b, 1, q_len, kv_len], about half True, and every query sees itself (no empty rows)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, 1, q_len, kv_len, generator=g) < 0.5
    m[:, 0, torch.arange(q_len), kv_len - q_len + torch.arange(q_len)] = True
    return m


@pytest.mark.parametrize("hq, hkv", [(6, 2), (4, 4), (8, 1)])
@pytest.mark.parametrize("q_len", [1, 5, 23])
def test_attention_scores_match_slow_reference(hq, hkv, q_len):
    q, k = qk(hq=hq, hkv=hkv, q_len=q_len)
    got = attention_scores(q, k, 0.4)
    assert got.shape == (2, hkv, 23) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), slow_attention_scores(q, k, 0.4), rtol=1e-5, atol=1e-5)
    # every (query head, query) row is a distribution over keys
    torch.testing.assert_close(got.sum(dim=(1, 2)), torch.full((2,), float(hq * q_len)))
    # causal: keys after the last query are never seen (there are none), keys before the first query are
    if q_len < 23:
        assert bool((got[..., : 23 - q_len] > 0).all())


@pytest.mark.parametrize("query_chunk", [1, 2, 4, 9, 100])
@pytest.mark.parametrize("key_chunk", [None, 1, 5, 22, 23, 64])
def test_chunking_and_two_pass_softmax_change_nothing(query_chunk, key_chunk):
    q, k = qk()
    one = attention_scores(q, k, 0.4)
    got = attention_scores(q, k, 0.4, query_chunk=query_chunk, key_chunk=key_chunk)
    torch.testing.assert_close(got, one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_of_mask", [1, 2])
@pytest.mark.parametrize("key_chunk", [None, 4])
def test_masked_scores_match_slow_reference(batch_of_mask, key_chunk):
    q, k = qk(q_len=7)
    mask = random_mask(batch_of_mask, 7, 23)
    got = attention_scores(q, k, 0.4, attention_mask=mask, query_chunk=3, key_chunk=key_chunk)
    ref = slow_attention_scores(q, k, 0.4, mask)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    # the mask matters: without it the scores differ
    assert not torch.allclose(got, attention_scores(q, k, 0.4), atol=1e-3)
    # a masked key receives nothing from any query
    never = ~mask.expand(2, 1, 7, 23).any(dim=2)[:, 0]  # [b, kv_len]
    assert bool((got.sum(1)[never] == 0).all())


def test_a_mask_row_broadcast_over_queries():
    q, k = qk(q_len=1)
    row = random_mask(1, 1, 23)[0, 0, 0]  # [kv_len]
    got = attention_scores(q, k, 0.4, attention_mask=row)
    torch.testing.assert_close(
        got.double(), slow_attention_scores(q, k, 0.4, row.view(1, 1, 1, 23)), rtol=1e-5, atol=1e-5
    )


def test_score_dtype_follows_inputs():
    q, k = qk()
    assert attention_scores(q.double(), k.double(), 0.4).dtype == torch.float64
    assert attention_scores(q.bfloat16(), k.bfloat16(), 0.4).dtype == torch.float32
    torch.testing.assert_close(
        attention_scores(q.double(), k.double(), 0.4), slow_attention_scores(q, k, 0.4), rtol=1e-12, atol=1e-12
    )


def test_bad_inputs_raise():
    q, k = qk()
    with pytest.raises(ValueError, match="more queries"):
        attention_scores(*qk(q_len=30, kv_len=20), 0.4)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        attention_scores(q[:, :5], k, 0.4)
    with pytest.raises(TypeError, match="boolean"):
        attention_scores(q, k, 0.4, attention_mask=torch.zeros(1, 1, 9, 23))


@pytest.mark.parametrize("key_chunk", [None, 1, 6, 23, 50])
def test_paper_scores_match_slow_reference(key_chunk):
    q, k = qk()
    ref = torch.zeros(2, 2, 23, dtype=torch.float64)
    for bi in range(2):
        for h in range(6):
            for j in range(23):
                ref[bi, h // 3, j] += float(k[bi, h // 3, j].double() @ q[bi, h, -1].double())
    got = paper_scores(q, k, key_chunk=key_chunk)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head_sum(got), got[:, 0] + got[:, 1])


@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_pool_scores_match_a_loop(pooling, kernel):
    g = torch.Generator().manual_seed(2)
    s = torch.rand(2, 3, 11, generator=g)
    got = pool_scores(s, kernel, pooling)
    assert got.shape == s.shape
    half = kernel // 2
    for idx in [(0, 0), (1, 2)]:
        row = s[idx]
        for i in range(11):
            window = [float(row[j]) if 0 <= j < 11 else 0.0 for j in range(i - half, i + half + 1)]  # zero padding
            expect = (
                sum(window) / kernel
                if pooling == "avg"
                else max(x for j, x in zip(range(i - half, i + half + 1), window) if 0 <= j < 11)
            )
            assert float(got[idx][i]) == pytest.approx(expect, abs=1e-6)
    assert torch.equal(pool_scores(s[0, 0], kernel, pooling), got[0, 0])  # 1-D input, same rule
    with pytest.raises(ValueError, match="pooling"):
        pool_scores(s, 3, "median")


def test_sorted_topk():
    s = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.0, 0.5])
    assert sorted_topk(s, 3).tolist() == [1, 3, 5]
    assert sorted_topk(s, 100).tolist() == list(range(6))
    rows = torch.stack([s, s.flip(0)])
    assert sorted_topk(rows, 2).tolist() == [[1, 3], [2, 4]]


def test_topk_with_recent_matches_reference():
    g = torch.Generator().manual_seed(4)
    s = torch.rand(2, 3, 20, generator=g)
    s[..., -4:] = -1e9  # the recent entries are kept whatever their scores
    got = topk_with_recent(s, 9, 4)
    assert got.shape == (2, 3, 9)
    for b in range(2):
        for h in range(3):
            prefix = s[b, h, :16].tolist()
            best = sorted(sorted(range(16), key=lambda j: -prefix[j])[:5])
            assert got[b, h].tolist() == best + [16, 17, 18, 19]
    s[..., -4:] = 1e9  # ... and never take a place among the best earlier ones
    assert topk_with_recent(s, 9, 4).tolist() == got.tolist()
    assert topk_with_recent(s, 3, 0)[0, 0].tolist() == sorted(torch.topk(s[0, 0], 3).indices.tolist())
    with pytest.raises(ValueError, match="budget"):
        topk_with_recent(s, 20, 4)


def test_lazyllm_importance_is_mean_over_heads_of_last_row():
    q, k = qk(b=1, q_len=5)
    mask = random_mask(1, 5, 23)
    got = last_token_attention(q, k, mask, 0.4)
    ref = torch.zeros(23, dtype=torch.float64)
    for h in range(6):
        visible = mask[0, 0, -1]
        logits = (k[0, h // 3].double() @ q[0, h, -1].double()) * 0.4
        ref += torch.softmax(logits.masked_fill(~visible, -math.inf), dim=0)
    torch.testing.assert_close(got.double(), ref / 6, rtol=1e-5, atol=1e-6)
    assert float(got.sum()) == pytest.approx(1.0, abs=1e-5)
