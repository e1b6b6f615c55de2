"""Batches: several prompts, left-padded, give per row what each prompt gives alone."""

from __future__ import annotations

import pytest
import torch
from cases import BUDGET, STATIC_FAMILIES, case_params, params_of
from conftest import TinyTokenizer, random_ids, tiny_model

from tokensieve.decode.static import StaticDecoder
from tokensieve.engine.runner import Sampling, generate, generate_batch
from tokensieve.errors import InputError
from tokensieve.methods import METHODS, make_method
from tokensieve.methods.base import BATCH_METHODS, left_pad

BATCH_CASES = case_params(lambda caps: caps.batch)  # every typical setting of every method that batches
LENGTHS = (50, 80, 65)  # every prompt longer than the budget: rows differ in length and in what they keep


def prompts(lengths: tuple[int, ...] = LENGTHS) -> list[torch.Tensor]:
    return [random_ids(n, seed=10 + i)[0] for i, n in enumerate(lengths)]  # 1-D ids


@pytest.fixture(scope="module", params=STATIC_FAMILIES)
def model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def decode_paths(method: str) -> list[str]:
    """A left-padded batch decodes on the static path when the method's cache only grows after the prefill; one
    that evicts while decoding (its sinks differ per row) decodes batches on the eager path."""
    return ["eager", "static"] if METHODS[method].capabilities.static_decode == "grow" else ["eager"]


def test_every_batch_method_is_in_the_batch_cases():
    assert {p.values[0] for p in BATCH_CASES} == set(BATCH_METHODS) and len(BATCH_METHODS) >= 4


@pytest.mark.parametrize("method,params", BATCH_CASES)
def test_each_row_gives_the_tokens_of_its_prompt_alone(model, method, params):
    tok, ps = TinyTokenizer(), prompts()
    alone = [generate(model, tok, p, method, max_new_tokens=12, decode="eager", **params) for p in ps]
    for decode in decode_paths(method):
        rows = generate_batch(model, tok, ps, method, max_new_tokens=12, decode=decode, **params)
        assert rows[0].details["decode_path"] == decode and rows[0].details["batch_size"] == 3
        for row, one, p in zip(rows, alone, ps):
            assert row.token_ids == one.token_ids, (decode, p.numel())
            assert row.prompt_tokens == p.numel() and row.kept_tokens == one.kept_tokens
            assert row.kv_tokens_prefill == one.kv_tokens_prefill and row.kv_tokens_final == one.kv_tokens_final
            assert row.kept_indices == one.kept_indices


@pytest.mark.parametrize("method,params", BATCH_CASES)
def test_batched_prefill_logits_match_each_prompt_alone(model, method, params):
    ps = prompts()
    ids, mask = left_pad(ps)
    m = make_method(method, **params)
    with torch.inference_mode():
        batch = m.prefill_batch(model, ids, mask)
        for b, p in enumerate(ps):
            one = make_method(method, **params).prefill(model, p[None])
            torch.testing.assert_close(batch.logits[b], one.logits[0], rtol=1e-4, atol=1e-4)
            assert batch.positions[b, 0].item() == one.next_position  # the next position the row has alone


@pytest.mark.parametrize("method", ["snapkv", "streamingllm"])
def test_eviction_rows_keep_their_budget_of_real_entries_and_never_a_pad(model, method):
    params = params_of(method)  # a budget of BUDGET entries
    ps = prompts((50, 80, 65, 30))  # the last row is shorter than the budget: it keeps all of its tokens
    ids, mask = left_pad(ps)
    with torch.inference_mode():
        cache = make_method(method, **params).prefill_batch(model, ids, mask).cache
        for layer in range(len(cache.layers)):
            pos = cache.kept_positions(layer)  # [batch, kv_heads, entries]; pads have negative positions
            assert pos.shape[-1] == BUDGET
            for b, p in enumerate(ps):
                real = pos[b][pos[b] >= 0].view(pos.shape[1], -1)  # [kv_heads, real entries]
                assert real.shape[-1] == min(BUDGET, p.numel())  # exactly the budget (or the whole prompt)
                one = make_method(method, **params).prefill(model, p[None]).cache
                assert torch.equal(real, one.kept_positions(layer)[0])  # the entries it keeps alone
            assert torch.equal(cache.valid_mask(layer), pos[:, 0] >= 0)


def test_gemfilter_rows_keep_the_single_prompt_selection(model):
    ps = prompts((50, 80, 65, 30))  # the last row needs no filter pass
    ids, mask = left_pad(ps)
    with torch.inference_mode():
        state = make_method("gemfilter", topk=BUDGET).prefill_batch(model, ids, mask)
        for b, p in enumerate(ps):
            alone = make_method("gemfilter", topk=BUDGET).prefill(model, p[None])
            assert torch.equal(state.kept_rows[b], alone.kept_indices)
    assert state.kv_mask.sum(-1).tolist() == [BUDGET, BUDGET, BUDGET, 30]
    assert state.details["filter_skipped"] is False


def test_each_row_stops_at_its_own_eos(llama):
    model = llama
    tok, ps = TinyTokenizer(), prompts()
    first = generate(model, tok, ps[0], "full", max_new_tokens=12).token_ids
    eos = first[4]  # row 0 stops at its 5th token (or earlier); the others at their own EOS or the limit
    tok.eos_token_id = eos
    alone = [generate(model, tok, p, "full", max_new_tokens=12) for p in ps]
    rows = generate_batch(model, tok, ps, "full", max_new_tokens=12)
    assert [r.token_ids for r in rows] == [a.token_ids for a in alone]
    assert rows[0].generated_tokens <= 5 and rows[0].token_ids[-1] == eos
    assert [r.generated_tokens for r in rows] == [len(a.token_ids) for a in alone]
    assert rows[0].details["batch_generated_tokens"] == sum(r.generated_tokens for r in rows)
    assert rows[0].details["batch_tokens_per_s"] > 0


def test_static_pad_slots_are_never_attended_to(llama):
    model = llama
    ps = prompts((30, 12))
    ids, mask = left_pad(ps)
    with torch.inference_mode():
        state = make_method("full").prefill_batch(model, ids, mask)
        dec = StaticDecoder(model, capacity=64, batch=2)
        dec.load(state.cache, state.positions, 4, state.kv_mask)
        token = state.logits.argmax(-1, keepdim=True)
        clean = dec.step(token).clone()
        dec.load(state.cache, state.positions, 4, state.kv_mask)
        for k, v in zip(dec.keys, dec.values):  # poison row 1's pad slots
            k[1, :, :18].fill_(1e4)
            v[1, :, :18].fill_(-1e4)
        torch.testing.assert_close(dec.step(token), clean)
        alone = make_method("full").prefill(model, ps[1][None])
        one = StaticDecoder(model, capacity=64)
        one.load(alone.cache, 12, 4)
        torch.testing.assert_close(clean[1], one.step(token[1:]).clone()[0], rtol=1e-4, atol=1e-4)


def test_seeded_sampling_is_reproducible_per_batch(llama):
    model = llama
    tok, ps = TinyTokenizer(), prompts()
    hot = Sampling(temperature=3.0, seed=7)
    a = generate_batch(model, tok, ps, "full", max_new_tokens=6, sampling=hot)
    b = generate_batch(model, tok, ps, "full", max_new_tokens=6, sampling=hot)
    c = generate_batch(model, tok, ps, "full", max_new_tokens=6, sampling=Sampling(temperature=3.0, seed=8))
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    # top_k=1 samples the argmax: the greedy rows, which are each prompt's own tokens
    top1 = generate_batch(model, tok, ps, "full", max_new_tokens=6, sampling=Sampling(temperature=1.0, top_k=1, seed=1))
    assert [r.token_ids for r in top1] == [generate(model, tok, p, "full", max_new_tokens=6).token_ids for p in ps]


def test_text_prompts_and_one_prompt(llama):
    model = llama
    tok = TinyTokenizer()
    texts = [" ".join(str(int(t)) for t in p) for p in prompts((20, 9))]
    rows = generate_batch(model, tok, texts, "full", max_new_tokens=4)
    assert [r.prompt_tokens for r in rows] == [20, 9]
    assert [r.token_ids for r in rows] == [generate(model, tok, t, "full", max_new_tokens=4).token_ids for t in texts]
    # one prompt runs any method, as generate does
    (one,) = generate_batch(model, tok, texts[:1], "h2o", max_new_tokens=4, budget=12)
    assert one.token_ids == generate(model, tok, texts[0], "h2o", max_new_tokens=4, budget=12).token_ids


def test_bad_batches_raise_input_errors():
    model, tok = tiny_model("llama", layers=2), TinyTokenizer()
    with pytest.raises(InputError, match="non-empty list of prompts"):
        generate_batch(model, tok, [], "full")
    with pytest.raises(InputError, match="non-empty list of prompts"):
        generate_batch(model, tok, "5 6 7", "full")
    with pytest.raises(InputError, match="one conversation"):
        generate_batch(model, tok, [{"role": "user", "content": "5 6"}], "full")
    with pytest.raises(InputError, match="prompt 1: the prompt is empty"):
        generate_batch(model, tok, ["5 6 7", "  "], "full")
    with pytest.raises(InputError, match="prompt 2: the prompt is empty"):
        generate_batch(model, tok, [random_ids(5)[0], random_ids(6)[0], torch.tensor([], dtype=torch.long)], "full")
    for method in ("h2o", "sepllm", "lazyllm"):
        with pytest.raises(
            InputError, match=f"{method} runs one prompt at a time; batches: full, gemfilter, snapkv, streamingllm"
        ):
            generate_batch(model, tok, ["5 6 7", "8 9"], method)
    with pytest.raises(InputError, match="max_new_tokens"):
        generate_batch(model, tok, ["5 6 7", "8 9"], "full", max_new_tokens=0)
    with pytest.raises(InputError, match="prompt 0: budget must be"):
        generate_batch(model, tok, ["5 6 7", "8 9"], "snapkv", budget=0)


@pytest.mark.parametrize("method,params", case_params(lambda caps: caps.batch, variants=False))
def test_per_row_callbacks_stream_each_row_and_a_stop_ends_that_row_only(llama, method, params):
    model, tok, ps = llama, TinyTokenizer(), prompts()
    limits = [12, 5, 9]  # per-row max_new_tokens, as a server's requests ask
    alone = [generate(model, tok, p, method, max_new_tokens=n, **params).token_ids for p, n in zip(ps, limits)]
    calls: list[tuple[int, int]] = []

    def record(row: int, token_id: int) -> None:
        calls.append((row, token_id))

    rows = generate_batch(model, tok, ps, method, max_new_tokens=limits, on_token=record, **params)
    assert [r.token_ids for r in rows] == alone
    assert [r.generated_tokens for r in rows] == limits  # the tiny tokenizer has no EOS: each row runs to its limit
    for b in range(3):  # each row's callback saw its tokens, in order, as generate's on_token does
        assert [t for row, t in calls if row == b] == alone[b]

    # row 1 says stop after 2 tokens: it ends there (as generate's on_token=False does), the others do not change
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def stop_row_1(row: int, token_id: int) -> bool:
        seen[row].append(token_id)
        return not (row == 1 and len(seen[1]) == 2)

    stopped = generate_batch(model, tok, ps, method, max_new_tokens=12, on_token=stop_row_1, **params)
    full_length = [generate(model, tok, p, method, max_new_tokens=12, **params).token_ids for p in ps]
    seen_alone: list[int] = []

    def stop_after_2(token_id: int) -> bool:
        seen_alone.append(token_id)
        return len(seen_alone) < 2

    one_stopped = generate(model, tok, ps[1], method, max_new_tokens=12, on_token=stop_after_2, **params)
    assert stopped[1].token_ids == one_stopped.token_ids == full_length[1][:2] and seen[1] == full_length[1][:2]
    assert stopped[0].token_ids == full_length[0] and stopped[2].token_ids == full_length[2]
    assert seen[0] == full_length[0] and seen[2] == full_length[2]


def test_callbacks_skip_the_eos_and_rows_stop_at_it(llama):
    model, tok, ps = llama, TinyTokenizer(), prompts()
    eos = generate(model, tok, ps[2], "full", max_new_tokens=12).token_ids[3]
    tok.eos_token_id = eos  # row 2 ends at its 4th token (or earlier)
    calls: dict[int, list[int]] = {0: [], 1: [], 2: []}
    rows = generate_batch(model, tok, ps, "full", max_new_tokens=12, on_token=lambda b, t: calls[b].append(t))
    for b, p in enumerate(ps):
        alone = generate(model, tok, p, "full", max_new_tokens=12).token_ids
        assert rows[b].token_ids == alone
        assert calls[b] == [t for t in alone if t != eos]  # the end-of-sequence token is not streamed
    assert rows[2].token_ids[-1] == eos and len(rows[2].token_ids) <= 4


def test_per_row_limits_are_checked():
    model, tok = tiny_model("llama", layers=2), TinyTokenizer()
    with pytest.raises(InputError, match="max_new_tokens has 3 values for 2 prompts"):
        generate_batch(model, tok, ["5 6 7", "8 9"], "full", max_new_tokens=[4, 4, 4])
    with pytest.raises(InputError, match="prompt 1: max_new_tokens must be an integer >= 1, got 0"):
        generate_batch(model, tok, ["5 6 7", "8 9"], "full", max_new_tokens=[4, 0])
    with pytest.raises(InputError, match="prompt 0: max_new_tokens must be an integer >= 1, got 2.5"):
        generate_batch(model, tok, ["5 6 7", "8 9"], "full", max_new_tokens=(2.5, 3))


def test_which_sampling_settings_may_share_a_batch():
    greedy, greedy_p = Sampling(), Sampling(temperature=0.0, top_p=0.5, seed=3)
    hot, hot_again = Sampling(temperature=0.7, top_p=0.9), Sampling(temperature=0.7, top_p=0.9)
    assert greedy.batches_with(greedy_p) and hot.batches_with(hot_again)
    assert not greedy.batches_with(hot) and not hot.batches_with(greedy)
    assert not hot.batches_with(Sampling(temperature=0.8, top_p=0.9))
    assert not hot.batches_with(Sampling(temperature=0.7, top_p=0.9, top_k=5))
    assert not Sampling(temperature=0.7, seed=1).batches_with(Sampling(temperature=0.7, seed=1))  # seeded: alone
