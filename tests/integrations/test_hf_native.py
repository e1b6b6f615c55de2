"""HF-native use: ``tokensieve.apply`` inside the user's own ``model.generate``, and ``tokensieve.pipeline``.

Every supported method's greedy ``model.generate`` inside ``apply`` must give ``tokensieve.generate``'s tokens
(same parameters), the user's generation settings must be honoured, and the model must come out as it went in.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import TinyTokenizer, random_ids, tiny_model
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

import tokensieve
from tokensieve.errors import InputError

N = 80
NEW = 10
# Parameters under which every method really compresses an 80-token prompt.
CASES = {
    "full": {},
    "snapkv": dict(budget=24, window_size=4),
    "h2o": dict(budget=24),
    "streamingllm": dict(budget=24, n_initial=2),
    "sepllm": dict(n_recent=8, separator_ids=(5, 7, 11)),
    "gemfilter": dict(topk=20, filter_layer=2),
}


def user_model(family: str = "llama", **kw) -> torch.nn.Module:
    """A model as a user's ``from_pretrained`` gives it: on ``sdpa``, not tokensieve's attention."""
    return tiny_model(family, attn="sdpa", **kw)


def reference(family: str, method: str, params: dict, ids: torch.Tensor, **kw) -> tokensieve.GenerationResult:
    ref = tiny_model(family)  # the same weights (same seed), switched by hand
    return tokensieve.generate(ref, TinyTokenizer(), ids, method=method, max_new_tokens=NEW, **kw, **params)


def new_tokens(out: torch.Tensor, ids: torch.Tensor) -> list[int]:
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])  # gemma3: sliding-window layers left whole
@pytest.mark.parametrize("method", list(CASES))
def test_greedy_generate_inside_apply_equals_tokensieve_generate(method, family):
    model, ids = user_model(family), random_ids(N)
    params = CASES[method]
    with warnings.catch_warnings():
        warnings.simplefilter("error", tokensieve.AttentionSwitchedWarning)  # the block's switch is undone: no warning
        with tokensieve.apply(model, method, **params) as applied:
            assert model.config._attn_implementation == "tokensieve"
            out = model.generate(ids, max_new_tokens=NEW, do_sample=False)
    ref = reference(family, method, params, ids)
    assert new_tokens(out, ids) == ref.token_ids
    assert torch.equal(out[:, :N], ids)  # the returned sequence starts with the whole prompt (GemFilter too)
    assert model.config._attn_implementation == "sdpa"  # restored
    if method != "full":
        assert applied.last_kv_entries == ref.kv_tokens_prefill  # what the method kept after the prompt
        assert max(applied.last_kv_entries) < N  # ... which is less than the prompt
    if method == "gemfilter":
        assert applied.last_selection == ref.kept_indices and len(applied.last_selection) == 20
    else:
        assert applied.last_selection is None


def test_compression_changes_the_answer_and_the_block_ends_it():
    """Inside the block SnapKV's tokens differ from plain generate's here; after it, plain generate is back."""
    model, ids = user_model(), random_ids(N)
    plain = model.generate(ids, max_new_tokens=NEW, do_sample=False)
    with tokensieve.apply(model, "snapkv", budget=8, window_size=2, dilation=1):
        squeezed = model.generate(ids, max_new_tokens=NEW, do_sample=False)
    after = model.generate(ids, max_new_tokens=NEW, do_sample=False)
    assert not torch.equal(plain, squeezed)
    assert torch.equal(plain, after)
    assert len(model._forward_pre_hooks) == len(model._forward_hooks) == 0


def test_budget_over_the_sequence_is_plain_generate_greedy_and_sampled():
    """Budgets >= n + new tokens never evict: exactly the model's own generate, greedy and sampled with a seed."""
    model, ids = user_model(), random_ids(N)
    settings = [dict(do_sample=False), dict(do_sample=True, temperature=0.9, top_k=20)]
    for kw in settings:
        torch.manual_seed(7)
        plain = model.generate(ids, max_new_tokens=NEW, **kw)
        for method in ("snapkv", "h2o", "streamingllm"):
            with tokensieve.apply(model, method, budget=N + NEW):
                torch.manual_seed(7)
                got = model.generate(ids, max_new_tokens=NEW, **kw)
            assert torch.equal(got, plain), (method, kw)


def test_sampling_with_a_seed_is_reproducible():
    model, ids = user_model(), random_ids(N)
    outs = []
    with tokensieve.apply(model, "h2o", budget=24):
        for seed in (3, 3, 4):
            torch.manual_seed(seed)
            outs.append(model.generate(ids, max_new_tokens=NEW, do_sample=True, temperature=1.5))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])  # the seed matters: the draw is really sampled


class Ban(LogitsProcessor):
    def __init__(self, token: int):
        self.token, self.calls = token, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        scores[:, self.token] = -float("inf")
        return scores


class StopAfter(StoppingCriteria):
    def __init__(self, n: int, start: int):
        self.n, self.start = n, start

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - self.start >= self.n, dtype=torch.bool)


class Collect(BaseStreamer):
    def __init__(self):
        self.puts: list[list[int]] = []

    def put(self, value):
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        self.puts.append([])


@pytest.mark.parametrize("method", ["snapkv", "gemfilter", "sepllm"])
def test_generation_config_processors_criteria_and_streamer_are_honoured(method):
    model, ids = user_model(), random_ids(N)
    params = CASES[method]
    ref = reference("llama", method, params, ids)
    with tokensieve.apply(model, method, **params):
        five = model.generate(ids, generation_config=GenerationConfig(max_new_tokens=5, do_sample=False))
        ban = Ban(ref.token_ids[0])
        banned = model.generate(ids, max_new_tokens=NEW, do_sample=False, logits_processor=LogitsProcessorList([ban]))
        stopped = model.generate(
            ids, max_new_tokens=NEW, do_sample=False, stopping_criteria=StoppingCriteriaList([StopAfter(3, N)])
        )
        streamer = Collect()
        streamed = model.generate(ids, max_new_tokens=NEW, do_sample=False, streamer=streamer)
    assert new_tokens(five, ids) == ref.token_ids[:5]
    assert ban.calls == NEW and ref.token_ids[0] not in new_tokens(banned, ids)
    assert new_tokens(banned, ids)[0] != ref.token_ids[0]
    assert new_tokens(stopped, ids) == ref.token_ids[:3]
    assert streamer.puts[0] == ids[0].tolist() and streamer.puts[-1] == []  # the prompt, then each token, then end
    assert sum(streamer.puts[1:-1], []) == new_tokens(streamed, ids) == ref.token_ids


def test_the_model_is_restored_after_an_exception():
    model, ids = user_model(), random_ids(N)
    plain = model.generate(ids, max_new_tokens=NEW, do_sample=False)

    class Boom(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with tokensieve.apply(model, "streamingllm", budget=16):
            model.generate(ids, max_new_tokens=NEW, stopping_criteria=StoppingCriteriaList([Boom()]))
    assert model.config._attn_implementation == "sdpa"
    assert len(model._forward_pre_hooks) == len(model._forward_hooks) == 0
    assert torch.equal(model.generate(ids, max_new_tokens=NEW, do_sample=False), plain)
    with tokensieve.apply(model, "h2o", budget=16) as applied:  # a new block may start again
        model.generate(ids, max_new_tokens=1)  # the prompt's forward only: what it kept is known
    assert applied.sequences == 1 and applied.last_kv_entries == [16] * 6


def test_a_model_already_on_tokensieve_attention_stays_on_it():
    model, ids = tiny_model("llama"), random_ids(N)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tokensieve.AttentionSwitchedWarning)
        with tokensieve.apply(model, "snapkv", budget=24, window_size=4):
            model.generate(ids, max_new_tokens=2, do_sample=False)
    assert model.config._attn_implementation == "tokensieve"


def test_nesting_is_refused_and_the_outer_block_still_restores():
    model = user_model()
    with tokensieve.apply(model, "snapkv", budget=24, window_size=4):
        with pytest.raises(InputError, match="nested"):
            with tokensieve.apply(model, "h2o", budget=24):
                pass
        assert model.config._attn_implementation == "tokensieve"
    assert model.config._attn_implementation == "sdpa"
    assert len(model._forward_pre_hooks) == len(model._forward_hooks) == 0


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "method, params, expected",
    [
        ("lazyllm", {}, "tokensieve.generate"),
        ("snapkv", {"budgte": 5}, "budgte"),
        ("nope", {}, "unknown method"),
        ("sepllm", {}, "tokenizer"),
        ("snapkv", {"budget": 0}, "budget"),
    ],
)
def test_unsupported_methods_and_parameters_are_refused_on_entry(method, params, expected):
    model = user_model()
    with pytest.raises(InputError) as exc:
        with tokensieve.apply(model, method, **params):
            pass
    assert expected in one_line(exc)
    assert model.config._attn_implementation == "sdpa"
    assert len(model._forward_pre_hooks) == len(model._forward_hooks) == 0


@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(num_beams=2), "batch"),
        (dict(num_return_sequences=2, do_sample=True), "batch"),
        (dict(use_cache=False), "use_cache"),
    ],
)
def test_unsupported_generate_settings_are_refused(kw, expected):
    model, ids = user_model(), random_ids(N)
    with tokensieve.apply(model, "snapkv", budget=24, window_size=4):
        with pytest.raises(InputError) as exc:
            model.generate(ids, max_new_tokens=3, **kw)
    assert expected in one_line(exc)
    assert model.config._attn_implementation == "sdpa"


def test_padding_and_batches_are_refused():
    model = user_model()
    ids = torch.cat([random_ids(N, seed=1), random_ids(N, seed=2)])
    mask = torch.ones_like(ids)
    with tokensieve.apply(model, "gemfilter", topk=20, filter_layer=2):
        with pytest.raises(InputError) as exc:
            model.generate(ids, attention_mask=mask, max_new_tokens=3)
        assert "batch of 2" in one_line(exc)
        padded = mask[:1].clone()
        padded[0, :3] = 0
        with pytest.raises(InputError) as exc:
            model.generate(ids[:1], attention_mask=padded, max_new_tokens=3)
        assert "padding" in one_line(exc)
        # an attention mask of ones is the plain prompt
        ones = model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=NEW, do_sample=False)
    ref = reference("llama", "gemfilter", CASES["gemfilter"], ids[:1])
    assert new_tokens(ones, ids[:1]) == ref.token_ids


def test_sepllm_takes_its_separators_from_the_tokenizer():
    """``tokenizer=`` derives the separators as ``tokensieve.generate`` does (a byte tokenizer: punctuation)."""
    model = user_model(vocab=257)
    tok = tokensieve.testing.byte_tokenizer()
    text = "one, two. three; four: five! six? " * 6
    ids = tok(text, return_tensors="pt")["input_ids"]
    with tokensieve.apply(model, "sepllm", tokenizer=tok, n_recent=8) as applied:
        # the config's pad id (0) is a byte of the text: the mask says there is no padding
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    ref = tokensieve.generate(tiny_model(vocab=257), tok, ids, method="sepllm", max_new_tokens=NEW, n_recent=8)
    assert new_tokens(out, ids) == ref.token_ids
    assert applied.last_kv_entries == ref.kv_tokens_prefill and max(ref.kv_tokens_prefill) < ids.shape[1]


# -- the pipeline

QUESTIONS = ["5 9 13", "40 41", "7 7 7 8"]


def document(n: int = 60) -> str:
    return " ".join(str(int(t)) for t in random_ids(n, seed=5)[0])


def count_long_forwards(model: torch.nn.Module, at_least: int) -> list[int]:
    """A list that grows by one for each forward of ``model`` fed ``at_least`` tokens or more."""
    seen: list[int] = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] >= at_least:
            seen.append(int(ids.shape[1]))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize(
    "method, params, reused",
    [
        ("full", {}, True),
        ("snapkv", dict(budget=24, window_size=4), True),
        ("gemfilter", dict(topk=20, filter_layer=2), True),
        ("h2o", dict(budget=24), False),
    ],
)
def test_pipeline_answers_as_generate_and_computes_the_document_once(method, params, reused):
    model, tok = tiny_model("llama"), TinyTokenizer()
    doc = document()
    pipe = tokensieve.pipeline(model, tok, method, **params)
    assert (pipe.reuse is None) == reused
    long_forwards = count_long_forwards(model, 60)
    answers = pipe(context=doc, questions=QUESTIONS, max_new_tokens=NEW)["answers"]
    computed = len(long_forwards)
    expected = [
        tokensieve.generate(model, tok, pipe.prompt(doc, q), method=method, max_new_tokens=NEW, **params).text
        for q in QUESTIONS
    ]
    assert answers == expected
    assert computed == (1 if reused else len(QUESTIONS))  # the document's tokens went through the model once
    if reused:
        cached = [r.details["prefix_cached_tokens"] for r in pipe.last_results]
        assert cached[0] == 0 and min(cached[1:]) >= 60 - 32  # later questions took the document from the store
        # (all but the scoring window's last tokens, which must be computed again: 4 for SnapKV, 32 for GemFilter)
    single = pipe(context=doc, question=QUESTIONS[1], max_new_tokens=NEW)
    assert single == {"answer": expected[1]}


def test_pipeline_refuses_bad_input_in_one_line():
    model, tok = tiny_model("llama"), TinyTokenizer()
    with pytest.raises(InputError) as exc:
        tokensieve.pipeline(model, tok, "snapkv", budgte=3)
    assert "budgte" in one_line(exc)
    pipe = tokensieve.pipeline(model, tok, "full")
    for kw, expected in [
        (dict(context="", question="1"), "context"),
        (dict(context="1 2"), "question"),
        (dict(context="1 2", questions=[]), "questions"),
        (dict(context="1 2", questions=["1", " "]), "questions"),
    ]:
        with pytest.raises(InputError) as exc:
            pipe(**kw)
        assert expected in one_line(exc)


def test_the_transformers_pipeline_task_answers_as_tokensieve_pipeline_and_keeps_the_document():
    import transformers

    tok = tokensieve.testing.byte_tokenizer()
    model = tiny_model(vocab=257)
    task = tokensieve.register_pipeline_task()
    assert task in transformers.pipelines.PIPELINE_REGISTRY.get_supported_tasks()
    pipe = transformers.pipeline(task, model=model, tokenizer=tok)
    doc = "The cat sat on the mat, the dog on the rug. " * 4
    questions = ["Who sat?", "Where was the dog?"]
    params = dict(budget=40, window_size=4)
    want = tokensieve.pipeline(model, tok, "snapkv", **params)(doc, questions=questions, max_new_tokens=6)
    long_forwards = count_long_forwards(model, len(doc))
    got = pipe(doc, questions=questions, method="snapkv", max_new_tokens=6, **params)
    assert got == want and len(long_forwards) == 1
    again = pipe(doc, question=questions[1], method="snapkv", max_new_tokens=6, **params)
    assert again == {"answer": want["answers"][1]} and len(long_forwards) == 1  # the document came from the store
    with pytest.raises(InputError) as exc:
        pipe(doc, question="Who?", method="snapkv", budgte=3)
    assert "budgte" in one_line(exc)
