"""GemFilter: invariants, a slow reference for the selection, and the cost of the filter pass."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_ids, tiny_model
from test_span_selection import slow_rank

import tokensieve
from tokensieve.methods.eviction import DEFAULT_DILATION
from tokensieve.methods.gemfilter import GemFilter, pool_and_select

FAMILIES = ["llama", "qwen2", "gemma3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_topk_at_least_n_reproduces_full_attention(family, tok):
    model = tiny_model(family)
    ids = random_ids(40)
    full = tokensieve.generate(model, tok, ids, method="full", max_new_tokens=8)
    for k in (40, 1000):
        gem = tokensieve.generate(model, tok, ids, method="gemfilter", topk=k, filter_layer=2, max_new_tokens=8)
        assert gem.token_ids == full.token_ids
        assert gem.kept_indices == list(range(40))
    # logits too, not just the argmax
    m = GemFilter(topk=64, filter_layer=1)
    with torch.inference_mode():
        a = tokensieve.methods.FullAttention().prefill(model, ids).logits
        b = m.prefill(model, ids).logits
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_topk_at_least_n_skips_the_filter_pass(family):
    """k >= n keeps everything: no filter pass runs (layer r runs once, in the one prefill), and the
    prefill is exactly full attention's."""
    model = tiny_model(family)
    ids = random_ids(40)
    r = 2
    calls = []
    handle = model.model.layers[r].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with torch.inference_mode():
            full = tokensieve.methods.FullAttention().prefill(model, ids)
            calls.clear()
            for k in (40, 41, 10_000):
                state = GemFilter(topk=k, filter_layer=r).prefill(model, ids)
                assert len(calls) == 1, f"topk={k}: layer {r} ran {len(calls)} times"
                calls.clear()
                assert torch.equal(state.logits, full.logits)
                assert state.kept_indices.tolist() == list(range(40)) and state.next_position == 40
                assert state.details["filter_skipped"] is True and state.details["filter_s"] == 0.0
            # the counter does see a filter pass when there is one: layer r starts twice
            state = GemFilter(topk=39, filter_layer=r).prefill(model, ids)
            assert len(calls) == 2 and state.details["filter_skipped"] is False and state.details["filter_s"] > 0
    finally:
        handle.remove()


def reference_scores(model, ids: torch.Tensor, layer: int, scoring: str, window: int = 16) -> torch.Tensor:
    """Slow, explicit GemFilter scores at ``layer`` from eager hidden states (Llama/Qwen2 style attention)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    with torch.no_grad():
        hs = model(ids, output_hidden_states=True, use_cache=False).hidden_states[layer]  # input of `layer`
        attn = model.model.layers[layer].self_attn
        x = model.model.layers[layer].input_layernorm(hs)
        n = ids.shape[1]
        hd = attn.head_dim
        q = attn.q_proj(x).view(1, n, -1, hd).transpose(1, 2)
        k = attn.k_proj(x).view(1, n, -1, hd).transpose(1, 2)
        cos, sin = model.model.rotary_emb(x, torch.arange(n)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        hq, hkv = q.shape[1], k.shape[1]
        scores = torch.zeros(n, dtype=torch.float64)
        for h in range(hq):
            kh = k[0, h // (hq // hkv)].double()  # the KV head this query head reads
            if scoring == "paper":
                scores += kh @ q[0, h, -1].double()
            else:
                for i in range(n - min(window, n), n):
                    logits = (kh[: i + 1] @ q[0, h, i].double()) / math.sqrt(hd)
                    scores[: i + 1] += torch.softmax(logits, dim=0)
    return scores


def reference_select(scores: torch.Tensor, k: int, kernel: int = 5, dilation: int = DEFAULT_DILATION) -> list[int]:
    """GemFilter's kept set written out: zero-padded average pool, the span rule (``slow_rank``), top-k, sorted."""
    return sorted(slow_rank(scores.tolist(), kernel, "avg", dilation)[: min(k, scores.shape[0])])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("scoring", ["paper", "window"])
def test_selection_matches_slow_reference(family, scoring):
    model = tiny_model(family, seed=3)
    ids = random_ids(60, seed=5)
    for layer in (0, 3):
        m = GemFilter(topk=17, filter_layer=layer, scoring=scoring, window_size=8)
        got = m.scores(model, ids)
        ref = reference_scores(model, ids, layer, scoring, window=8)
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
        assert m.select(model, ids).tolist() == reference_select(ref, 17)


def test_selected_indices_sorted_unique_and_sized():
    model = tiny_model("llama")
    for n, k in ((50, 10), (50, 49), (7, 3), (5, 100)):
        idx = GemFilter(topk=k, filter_layer=1).select(model, random_ids(n))
        assert idx.tolist() == sorted(set(idx.tolist()))
        assert len(idx) == min(k, n)
        assert 0 <= int(idx.min()) and int(idx.max()) < n


def test_pool_and_select_prefers_smoothed_peak():
    # a lone spike loses to a broad plateau after kernel-5 pooling
    s = torch.zeros(20)
    s[3] = 4.0
    s[10:15] = 1.5
    assert pool_and_select(s, 1).tolist() == [12]
    assert pool_and_select(s, 1, kernel=1).tolist() == [3]


def test_second_pass_uses_fresh_positions_and_equals_model_on_kept_ids(tok):
    model = tiny_model("llama")
    ids = random_ids(50)
    seen: list[torch.Tensor] = []
    handle = model.model.rotary_emb.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append(kwargs.get("position_ids", args[1] if len(args) > 1 else None)),
        with_kwargs=True,
    )
    try:
        m = GemFilter(topk=12, filter_layer=2)
        with torch.inference_mode():
            state = m.prefill(model, ids)
    finally:
        handle.remove()
    # calls: filter pass (positions 0..49), then second pass (positions 0..11)
    assert seen[0].tolist() == [list(range(50))]
    assert seen[-1].tolist() == [list(range(12))]
    with torch.inference_mode():
        direct = model(ids[:, state.kept_indices]).logits[:, -1]
    torch.testing.assert_close(state.logits, direct)
    assert state.next_position == 12


def test_filter_pass_stops_at_layer_r_attention():
    model = tiny_model("llama", layers=6)
    r = 2
    calls: list[str] = []
    hooks = [model.model.layers[i].register_forward_hook(lambda *a, i=i: calls.append(f"layer{i}")) for i in range(6)]
    hooks.append(model.model.layers[r].mlp.register_forward_hook(lambda *a: calls.append("mlp_r")))
    hooks.append(model.model.norm.register_forward_hook(lambda *a: calls.append("norm")))
    hooks.append(model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head")))
    try:
        GemFilter(topk=5, filter_layer=r).select(model, random_ids(30))
    finally:
        for h in hooks:
            h.remove()
    assert calls == ["layer0", "layer1"]  # layer 2 started (its attention) but never finished


def test_default_filter_layer_known_and_fallback():
    from tokensieve.methods.gemfilter import default_filter_layer

    model = tiny_model("llama", layers=10)
    assert default_filter_layer(model) == 4  # fallback int(0.45 * 10)
    assert GemFilter().resolved_layer(model) == 4


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(topk=0), "topk"),
        (dict(topk=-3), "topk"),
        (dict(filter_layer=6), r"filter_layer must be in \[0, 5\]"),
        (dict(filter_layer=-1), "filter_layer"),
        (dict(scoring="bogus"), "scoring"),
        (dict(kernel=4), "kernel"),
        (dict(window_size=0), "window_size"),
    ],
)
def test_bad_parameters_give_clear_errors(params, match, tok):
    model = tiny_model("llama", layers=6)
    with pytest.raises(ValueError, match=match):
        tokensieve.generate(model, tok, random_ids(20), method="gemfilter", **params)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("scoring", ["paper", "window"])
@pytest.mark.parametrize("attention", ["dense", "local"])  # local: the streamed pass (w >= n here, so dense too)
def test_chunked_filter_pass_equals_one_shot(family, scoring, attention):
    model = tiny_model(family, seed=7)
    ids = random_ids(103, seed=2)  # chunks of 16 leave a 7-token tail, merged into the previous chunk
    one = GemFilter(topk=20, filter_layer=3, scoring=scoring, window_size=8, filter_attention=attention)
    chunked = GemFilter(
        topk=20, filter_layer=3, scoring=scoring, window_size=8, chunk_size=16, filter_attention=attention
    )
    chunked.validate(model, 103)
    torch.testing.assert_close(chunked.scores(model, ids), one.scores(model, ids), rtol=1e-4, atol=1e-4)
    assert chunked.select(model, ids).tolist() == one.select(model, ids).tolist()


def test_chunked_filter_pass_rejects_sliding_window_models():
    with pytest.raises(ValueError, match="chunk_size"):
        GemFilter(chunk_size=64, filter_layer=1).validate(tiny_model("gemma3"), 100)
    with pytest.raises(ValueError, match="chunk_size must be >= window_size"):
        GemFilter(chunk_size=4, window_size=16, filter_layer=1).validate(tiny_model("llama"), 100)


@pytest.mark.parametrize("scoring", ["paper", "window"])
def test_token_scores_read_in_key_chunks_match_a_slow_reference(scoring):
    """The chunked scoring of long prompts (two-pass softmax) equals per-head attention done the slow way."""
    from tokensieve.methods.gemfilter import token_scores

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 6, 12, 8, generator=g), torch.randn(1, 2, 50, 8, generator=g)
    w, scale, n = 5, 8**-0.5, 50
    ref = torch.zeros(50)
    for h in range(6):
        kh = k[0, h // 3]  # GQA: 3 query heads per KV head
        if scoring == "paper":
            ref += kh @ q[0, h, -1]
            continue
        for j in range(w):
            pos = n - w + j
            ref[: pos + 1] += ((kh[: pos + 1] @ q[0, h, 12 - w + j]) * scale).softmax(-1)
    for chunk in (None, 7, 50, 64):
        got = token_scores(q, k, scale, scoring, window_size=w, key_chunk=chunk)[0]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
