"""A model not on tokensieve attention (a user's own ``from_pretrained``: "sdpa") is switched by every entry point
that runs it, with one message, or refused with ``InputError`` where no switch is possible.

The method-by-method comparison against a model switched by hand is in ``test_contract.py``."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import TinyTokenizer, random_ids, tiny_model

from tokensieve.core.attention import AttentionSwitchedWarning, ensure_tokensieve_attention
from tokensieve.engine.prefix_cache import PrefixReuse, PrefixStore
from tokensieve.engine.runner import feed_stream, generate, generate_batch, open_stream
from tokensieve.engine.streaming import make_policy
from tokensieve.errors import InputError
from tokensieve.integrations.vllm_adapter import select_tokens
from tokensieve.methods import make_method


def said(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, AttentionSwitchedWarning)]


def run_switched(fn):
    """(fn(model on sdpa), fn(the same weights switched by hand), the switch messages fn's model gave)."""
    user, ref = tiny_model("llama", layers=4, attn="sdpa"), tiny_model("llama", layers=4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = fn(user)
        again = fn(user)  # a second call: already switched, nothing said
    assert user.config._attn_implementation == "tokensieve"
    assert got == again
    return got, fn(ref), said(record)


def test_generate_batch_switches_once():
    rows = [random_ids(30, seed=1)[0], random_ids(24, seed=2)[0]]
    got, ref, msgs = run_switched(
        lambda m: [
            r.token_ids
            for r in generate_batch(m, TinyTokenizer(), rows, "snapkv", max_new_tokens=5, budget=12, window_size=4)
        ]
    )
    assert got == ref and len(msgs) == 1 and "LlamaForCausalLM" in msgs[0]


def test_prefix_cache_warm_switches():
    ids = random_ids(40, seed=3)

    def warm_then_answer(m):
        store = PrefixStore(1 << 30)
        assert (
            PrefixReuse(make_method("snapkv", budget=16, window_size=4), store, 32).warm(m, ids) == 32
        )  # the first call in
        return generate(
            m,
            TinyTokenizer(),
            ids,
            PrefixReuse(make_method("snapkv", budget=16, window_size=4), store, 32),
            max_new_tokens=5,
        ).token_ids

    got, ref, msgs = run_switched(warm_then_answer)
    assert got == ref and len(msgs) == 1


def test_stream_switches():
    ids = random_ids(60, seed=4)[0]

    def stream(m):
        s = open_stream(m, make_policy("streamingllm", budget=24, n_initial=4), chunk_size=8)
        return [logits.argmax(-1).tolist() for _, logits in feed_stream(s, ids, 8)]

    got, ref, msgs = run_switched(stream)
    assert got == ref and len(msgs) == 1


def test_select_tokens_switches():
    ids = random_ids(64, seed=5)
    got, ref, msgs = run_switched(
        lambda m: select_tokens(m, TinyTokenizer(), ids, "gemfilter", topk=16, filter_layer=2).kept_indices
    )
    assert got == ref and len(msgs) == 1 and len(got) == 16


def test_eager_model_switched_too():
    user = tiny_model("qwen2", layers=2, attn="eager")
    with pytest.warns(AttentionSwitchedWarning, match="Qwen2ForCausalLM from 'eager'"):
        ensure_tokensieve_attention(user)
    assert user.config._attn_implementation == "tokensieve"


def test_no_switch_possible_is_an_input_error():
    with pytest.raises(InputError, match="transformers models.*got Linear"):
        ensure_tokensieve_attention(torch.nn.Linear(2, 2))
    user = tiny_model("llama", layers=2, attn="sdpa")

    def refuse(name):
        raise ValueError(f"{name} is not supported by this model")

    user.set_attn_implementation = refuse  # a class transformers cannot give another attention
    with pytest.raises(
        InputError, match="cannot switch LlamaForCausalLM to its attention: tokensieve is not supported"
    ):
        generate(user, TinyTokenizer(), random_ids(8), "full", max_new_tokens=1)


def test_gemfilter_select_switches_once():
    """GemFilter's selection called directly (the select-then-generate bridge) switches the model, as the runner does."""
    from tokensieve.methods.gemfilter import GemFilter

    ids = random_ids(60, seed=4)
    got, ref, messages = run_switched(lambda m: GemFilter(topk=12, filter_layer=2).select(m, ids).tolist())
    assert got == ref and len(messages) == 1
