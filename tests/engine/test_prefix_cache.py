"""Prefix cache: answers with a cached prefix equal the answers without it; LRU by bytes; longest-prefix match."""

from __future__ import annotations

import pytest
import torch
from cases import STATIC_FAMILIES, case_params
from conftest import TinyTokenizer, random_ids, tiny_model

from tokensieve.engine.prefix_cache import PrefixReuse, PrefixState, PrefixStore, common_prefix, store_for_gib
from tokensieve.engine.runner import generate
from tokensieve.errors import InputError
from tokensieve.methods import make_method
from tokensieve.methods.registry import capable

PREFIX_CASES = case_params(lambda caps: caps.prefix_reuse)  # every typical setting of every method that reuses
METHODS = [tuple(p.values) for p in PREFIX_CASES]  # (name, params)
DOC = 200


def test_every_prefix_method_is_in_the_prefix_cases():
    assert {name for name, _ in METHODS} == set(capable(prefix_reuse=True)) and len(METHODS) >= 4


def ask(model, ids, name, params, store=None, store_tokens=DOC, decode="auto"):
    method = make_method(name, **params)
    if store is not None:
        method = PrefixReuse(method, store, store_tokens)
    return generate(model, TinyTokenizer(), ids, method=method, max_new_tokens=8, decode=decode)


@pytest.mark.parametrize("family", STATIC_FAMILIES)
@pytest.mark.parametrize("name,params", PREFIX_CASES)
def test_cached_answers_equal_uncached(family, name, params):
    model = tiny_model(family)
    doc = random_ids(DOC, seed=3)
    store = PrefixStore(1 << 30)
    # question lengths: longer than SnapKV's/GemFilter's window, and shorter (the tail is recomputed)
    for i, q_len in enumerate([20, 3, 5, 12]):
        ids = torch.cat([doc, random_ids(q_len, seed=10 + i)], dim=1)
        ref = ask(model, ids, name, params)
        got = ask(model, ids, name, params, store)
        assert got.token_ids == ref.token_ids
        assert got.kept_indices == ref.kept_indices
        assert got.kv_tokens_prefill == ref.kv_tokens_prefill
        assert got.details["decode_path"] == ref.details["decode_path"]
        # the first question computes and stores the document; the following ones take it from the store
        assert (got.details["prefix_cached_tokens"] > 0) == (i > 0)
        assert got.details["prefix_stored_tokens"] == (DOC if i == 0 else 0)
        assert got.method == ref.method == name and got.params == ref.params
    assert len(store) == 1 and store.stats.hits == 3 and store.stats.misses == 1


@pytest.mark.parametrize("name,params", PREFIX_CASES)
def test_prefill_logits_close(name, params):
    model = tiny_model("llama")
    ids = torch.cat([random_ids(DOC, seed=4), random_ids(16, seed=5)], dim=1)
    store = PrefixStore(1 << 30)
    ref = make_method(name, **params).prefill(model, ids)
    PrefixReuse(make_method(name, **params), store, DOC).prefill(model, ids)  # stores the prefix
    got = PrefixReuse(make_method(name, **params), store, DOC).prefill(model, ids)
    assert got.details["prefix_cached_tokens"] >= DOC - 16
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-4, rtol=1e-4)
    assert got.next_position == ref.next_position
    assert type(got.cache) is type(ref.cache)
    for a, b in zip(got.cache.layers, ref.cache.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-4, rtol=1e-4)


def test_eager_decode_equal():
    model = tiny_model("llama")
    ids = torch.cat([random_ids(DOC, seed=3), random_ids(12, seed=9)], dim=1)
    store = PrefixStore(1 << 30)
    for name, params in METHODS:
        assert (
            ask(model, ids, name, params, store, decode="eager").token_ids
            == ask(model, ids, name, params, decode="eager").token_ids
        )


def test_cached_prefix_is_never_mutated():
    model = tiny_model("llama")
    doc = random_ids(DOC, seed=3)
    store = PrefixStore(1 << 30)
    for name, params in METHODS:
        ask(model, torch.cat([doc, random_ids(10, seed=1)], 1), name, params, store)
    before = [(e.ids.clone(), [k.clone() for k in e.keys], [v.clone() for v in e.values]) for e in store.entries()]
    for name, params in METHODS:
        for seed in (2, 3):
            ids = torch.cat([doc, random_ids(10, seed=seed)], 1)
            assert (
                ask(model, ids, name, params, store, decode="eager").token_ids
                == ask(model, ids, name, params).token_ids
            )
    after = store.entries()
    assert len(after) == len(before)
    for (ids, ks, vs), e in zip(before, after):
        assert torch.equal(ids, e.ids)
        assert all(torch.equal(a, b) for a, b in zip(ks, e.keys)) and all(
            torch.equal(a, b) for a, b in zip(vs, e.values)
        )


def test_full_entry_serves_gemfilter_and_gemfilter_entry_is_smaller():
    model = tiny_model("llama")
    doc = random_ids(DOC, seed=3)
    ids = torch.cat([doc, random_ids(20, seed=4)], 1)
    store = PrefixStore(1 << 30)
    ask(model, ids, "full", {}, store)
    full_bytes = store.nbytes
    got = ask(model, ids, "gemfilter", {"topk": 48, "filter_layer": 2}, store, store_tokens=0)
    assert got.details["prefix_cached_tokens"] == DOC and len(store) == 1
    gem = PrefixStore(1 << 30)
    ask(model, ids, "gemfilter", {"topk": 48, "filter_layer": 2}, gem)
    e = gem.entries()[0]
    assert len(e.keys) == 3 and len(e.values) == 2 and gem.nbytes < full_bytes / 2
    # a GemFilter entry (3 layers) cannot serve full attention (6 layers): a miss, answer unchanged
    got = ask(model, ids, "full", {}, gem, store_tokens=0)
    assert got.details["prefix_cached_tokens"] == 0 and got.token_ids == ask(model, ids, "full", {}).token_ids


def _state(ids: list[int], nbytes_per_token: int = 0) -> PrefixState:
    t = torch.tensor(ids)
    k = torch.zeros(1, 1, len(ids), nbytes_per_token // 4 or 1)
    return PrefixState(t, [k], [k.clone()])


def test_longest_prefix_match():
    store = PrefixStore(1 << 20)
    store.put(_state([5, 6, 7]))
    store.put(_state([5, 6, 8, 9, 10]))
    store.put(_state([1, 2]))
    shared, e = store.match(torch.tensor([5, 6, 8, 9, 3, 3]), 1, 1)
    assert shared == 4 and e.ids.tolist() == [5, 6, 8, 9, 10]
    shared, e = store.match(torch.tensor([5, 6, 7, 1]), 1, 1)
    assert shared == 3 and e.ids.tolist() == [5, 6, 7]
    assert store.match(torch.tensor([9, 9]), 1, 1) == (0, None)
    assert store.match(torch.tensor([5, 6, 7]), 2, 1) == (0, None)  # needs two key layers
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([1], [1, 2]) == 1


def test_lru_eviction_by_bytes():
    one = _state([1] * 10, 64).nbytes
    store = PrefixStore(3 * one)
    a, b, c, d = (_state([i] * 10, 64) for i in (1, 2, 3, 4))
    for s in (a, b, c):
        assert store.put(s)
    assert store.nbytes == 3 * one and len(store) == 3
    store.match(torch.tensor([1] * 12), 1, 1)  # a is used: b is now the least recently used
    assert store.put(d)
    assert [e.ids[0].item() for e in store.entries()] == [3, 1, 4]
    assert store.nbytes == 3 * one and store.stats.evicted == 1
    assert not store.put(_state([7] * 40, 64))  # alone bigger than the store
    assert store.stats.too_large == 1 and len(store) == 3
    # a longer prefix replaces the one it extends (and, being bigger, pushes out the least recently used)
    store.put(_state([4] * 12, 64))
    assert [(e.ids[0].item(), e.tokens) for e in store.entries()] == [(1, 10), (4, 12)]
    assert store.nbytes == sum(e.nbytes for e in store.entries()) <= store.max_bytes


def test_store_bytes_match_tensors():
    model = tiny_model("llama")
    store = PrefixStore(1 << 30)
    ask(model, torch.cat([random_ids(DOC, seed=3), random_ids(10, seed=4)], 1), "full", {}, store)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    expected = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * DOC * head_dim * 4 + DOC * 8
    assert store.nbytes == expected == store.entries()[0].nbytes


def test_refusals():
    store = PrefixStore(1 << 20)
    with pytest.raises(InputError, match="supports methods full, snapkv, gemfilter; got 'h2o'"):
        PrefixReuse(make_method("h2o"), store)
    with pytest.raises(InputError, match="chunk_size=64"):
        PrefixReuse(make_method("gemfilter", chunk_size=64), store)
    with pytest.raises(InputError, match="max_bytes"):
        PrefixStore(-1)
    with pytest.raises(InputError, match="GiB"):
        store_for_gib(-0.5)
    assert store_for_gib(0) is None and store_for_gib(0.5).max_bytes == 1 << 29
    gemma = tiny_model("gemma3")
    with pytest.raises(InputError, match="sliding-window"):
        ask(gemma, random_ids(40), "full", {}, store, store_tokens=20)
    llama, other = tiny_model("llama"), tiny_model("llama", seed=1)
    ask(llama, random_ids(40), "full", {}, store, store_tokens=20)
    with pytest.raises(InputError, match="another model"):
        ask(other, random_ids(40), "full", {}, store, store_tokens=20)


def test_store_tokens_longer_than_prompt_and_zero():
    model = tiny_model("llama")
    ids = random_ids(60, seed=2)
    store = PrefixStore(1 << 30)
    got = ask(model, ids, "snapkv", {"budget": 32, "window_size": 8}, store, store_tokens=500)
    assert got.token_ids == ask(model, ids, "snapkv", {"budget": 32, "window_size": 8}).token_ids
    assert store.entries()[0].tokens == 60 and got.details["prefix_cached_tokens"] == 0
    again = ask(model, ids, "snapkv", {"budget": 32, "window_size": 8}, store, store_tokens=500)
    assert again.token_ids == got.token_ids and again.details["prefix_cached_tokens"] == 52  # the window is recomputed
    empty = PrefixStore(1 << 30)
    got = ask(model, ids, "full", {}, empty, store_tokens=0)
    assert len(empty) == 0 and got.details["prefix_cached_tokens"] == 0 and empty.stats.misses == 1


def test_smollm2_chat_questions_equal_uncached(smollm2):
    from tokensieve.engine.prefix_cache import chat_prefix_tokens
    from tokensieve.engine.runner import encode_prompt

    model, tok = smollm2
    doc = "The vault on Elm Street is guarded by Ada Lovelace. Its secret code is 4711. " * 8
    store = PrefixStore(1 << 30)
    for name, params in [("full", {}), ("snapkv", {"budget": 96, "window_size": 8}), ("gemfilter", {"topk": 64})]:
        for q in ["What is the secret code?", "Who guards the vault?"]:
            msgs = [{"role": "user", "content": f"{doc}\n\nAnswer the question from the text above.\nQuestion: {q}"}]
            ids = encode_prompt(tok, msgs)
            prefix = chat_prefix_tokens(tok, msgs, ids)
            assert 0 < prefix < ids.shape[1] - 5
            ref = generate(model, tok, ids, method=make_method(name, **params), max_new_tokens=12)
            got = generate(
                model, tok, ids, method=PrefixReuse(make_method(name, **params), store, prefix), max_new_tokens=12
            )
            assert got.token_ids == ref.token_ids and got.kept_indices == ref.kept_indices, (name, q)
    assert store.stats.hits == 5 and store.stats.misses == 1
