"""Methods declare, engines ask: two methods declared in this one file join through the public registry
(``tokensieve.methods.register``) and run through generate, generate_batch, the evaluation harness, the
benchmarks, the server and the prefix cache wherever their ``capabilities`` say so, and are refused with a
clear error everywhere else; ``unregister`` removes them again. No other file names them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from eval_support import TEXT, byte_model, byte_tokenizer

import tokensieve
from tokensieve.errors import InputError, check_int
from tokensieve.methods import METHODS, capable, make_method, register, unregister
from tokensieve.methods.base import Capabilities, DecodeState, Method, batch_prefill, full_prefill, left_pad


@dataclass
class LastK(Method):
    """Keeps the last ``keep`` prompt tokens, renumbered 0..k-1 (a prompt selection with an obvious reference).

    Parameters:
        keep: prompt tokens kept (the last ones), an integer >= 1.
    """

    keep: int = 24
    name: ClassVar[str] = "lastk_test"
    capabilities: ClassVar[Capabilities] = Capabilities(
        batch=True, static_decode="grow", selects_prompt=True, prompt_only=True
    )

    def validate(self, model: Any, prompt_len: int) -> None:
        check_int("keep", self.keep, 1)

    def select(self, model: Any, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        return torch.arange(max(0, n - self.keep), n, device=input_ids.device)

    def prefill(self, model: Any, input_ids: torch.Tensor) -> DecodeState:
        idx = self.select(model, input_ids)
        state = full_prefill(model, input_ids[:, idx])
        state.kept_indices = idx
        return state

    def prefill_batch(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> DecodeState:
        mask = attention_mask.bool()
        real = [input_ids[b, mask[b]] for b in range(input_ids.shape[0])]
        rows = [self.select(model, r[None]) for r in real]
        state = batch_prefill(model, *left_pad([r[idx] for r, idx in zip(real, rows)]))
        state.kept_rows = rows
        return state


@dataclass
class PlainKV(Method):
    """Full attention, one prompt at a time, decoded on the eager path; its prefix may come from a prefix cache."""

    name: ClassVar[str] = "plainkv_test"
    capabilities: ClassVar[Capabilities] = Capabilities(prefix_reuse=True)

    def prefill(self, model: Any, input_ids: torch.Tensor) -> DecodeState:
        cache, kwargs = self.prefill_cache(model, input_ids)
        return full_prefill(model, input_ids, cache, **kwargs)


NEW = (LastK.name, PlainKV.name)
PROMPT = "a prompt long enough that keeping its last tokens drops most of it: " * 2


@pytest.fixture(scope="module", autouse=True)
def registered():
    for cls in (LastK, PlainKV):
        register(cls)
    yield
    for name in NEW:
        unregister(name)


@pytest.fixture(scope="module")
def tiny():
    return byte_model(max_pos=512), byte_tokenizer()


def ids_of(tok, text: str) -> torch.Tensor:
    return tok(text, return_tensors="pt").input_ids


def test_the_registry_lists_them_with_their_capabilities():
    assert list(METHODS)[-2:] == list(NEW) and METHODS["lastk_test"] is LastK
    assert "lastk_test" in capable(batch=True) and "plainkv_test" not in capable(batch=True)
    assert "plainkv_test" in capable(prefix_reuse=True) and "lastk_test" in capable(static_decode="grow")
    assert make_method("lastk_test", keep=5).keep == 5
    with pytest.raises(InputError, match="registered already"):
        register(LastK)
    with pytest.raises(InputError, match="'full' is not a registered method that can be removed"):
        unregister("full")
    with pytest.raises(InputError, match="no capability flies"):
        capable(flies=True)


def test_generate_asks_the_capabilities(tiny):
    model, tok = tiny
    ids = ids_of(tok, PROMPT)
    got = tokensieve.generate(model, tok, ids, method="lastk_test", keep=24, max_new_tokens=6)
    ref = tokensieve.generate(model, tok, ids[:, -24:], method="full", max_new_tokens=6)
    assert got.token_ids == ref.token_ids and got.kept_tokens == 24
    assert list(got.kept_indices) == list(range(ids.shape[1] - 24, ids.shape[1]))
    assert got.details["decode_path"] in ("static", "graph")  # static_decode="grow": the static decoder
    plain = tokensieve.generate(model, tok, ids, method="plainkv_test", max_new_tokens=6)
    full = tokensieve.generate(model, tok, ids, method="full", max_new_tokens=6, decode="eager")
    assert plain.token_ids == full.token_ids and plain.details["decode_path"] == "eager"  # static_decode=None
    with pytest.raises(InputError, match="static decoding is not available here: plainkv_test evicts or re-selects"):
        tokensieve.generate(model, tok, ids, method="plainkv_test", max_new_tokens=2, decode="static")
    with pytest.raises(InputError, match="keep must be an integer >= 1, got 0"):
        tokensieve.generate(model, tok, ids, method="lastk_test", keep=0, max_new_tokens=2)


def test_generate_batch_where_batch_is_declared(tiny):
    model, tok = tiny
    prompts = [PROMPT, "a shorter prompt, still longer than the kept tail"]
    rows = tokensieve.generate_batch(model, tok, prompts, method="lastk_test", keep=16, max_new_tokens=5)
    for prompt, row in zip(prompts, rows):
        alone = tokensieve.generate(model, tok, prompt, method="lastk_test", keep=16, max_new_tokens=5)
        assert row.token_ids == alone.token_ids and row.kept_tokens == 16
    with pytest.raises(InputError, match="plainkv_test runs one prompt at a time; batches: .*lastk_test"):
        tokensieve.generate_batch(model, tok, prompts, method="plainkv_test", max_new_tokens=2)


def test_the_evaluation_harness_runs_them(tiny, tmp_path):
    from tokensieve.evaluation.harness import read_results, run_eval
    from tokensieve.evaluation.ruler import RulerTask

    model, tok = tiny
    task = RulerTask([480], samples=1, seed=0, tasks=["niah_single"], haystack=TEXT, max_new_tokens=3)
    path = run_eval(
        model, tok, task, [make_method("lastk_test", keep=32), "plainkv_test"], tmp_path, "tiny", progress=False
    )
    rows = read_results(path)
    assert sorted(r["method"] for r in rows) == sorted(NEW)
    by = {r["method"]: r for r in rows}
    assert by["lastk_test"]["kept_tokens"] == 32 and by["lastk_test"]["params"] == {"keep": 32}
    assert by["plainkv_test"]["kept_tokens"] == by["plainkv_test"]["prompt_tokens"]


def test_the_benchmarks_run_them_and_record_the_refusal():
    from tokensieve.bench.timing import run_batch_bench, run_bench

    methods = {"last": {"method": "lastk_test", "keep": 16}, "plain": {"method": "plainkv_test"}}
    res = run_bench(
        "tiny",
        [64],
        methods,
        dtype=torch.float32,
        device="cpu",
        repeats=1,
        decode_tokens=2,
        warmup_length=16,
        progress=False,
    )
    rows = {r["label"]: r for r in res["rows"]}
    assert rows["last"]["status"] == rows["plain"]["status"] == "ok"
    assert rows["last"]["kept_tokens"] == 16 and rows["plain"]["kept_tokens"] == 64
    res = run_batch_bench(
        "tiny", [32], [2], methods, dtype=torch.float32, device="cpu", decode_tokens=2, warmup_length=16, progress=False
    )
    status = {r["label"]: r["status"] for r in res["rows"]}
    assert status["last"] == "ok" and "plainkv_test runs one prompt at a time" in status["plain"]


def test_the_server_runs_them_per_request(tiny):
    from test_serve import chat, client, serving

    from tokensieve.serve.app import create_app

    model, tok = tiny
    with serving(create_app(model, tok, model_name="tiny", max_batch=4)) as base:
        c = client(base)
        for name, params, kept in (("lastk_test", {"keep": 20}, 20), ("plainkv_test", {}, None)):
            r = chat(c, PROMPT, max_tokens=3, temperature=0, extra_body={"tokensieve": {"method": name, **params}})
            ts = r.model_extra["tokensieve"]
            assert ts["method"] == name and ts["kept_tokens"] == (kept or ts["prompt_tokens"])
        c.close()


def test_the_prefix_cache_where_prefix_reuse_is_declared(tiny):
    from tokensieve.engine.prefix_cache import PrefixReuse, PrefixStore, refusal, supported

    model, tok = tiny
    ids = ids_of(tok, PROMPT)
    store = PrefixStore(1 << 24)
    ref = tokensieve.generate(model, tok, ids, method="plainkv_test", max_new_tokens=4)
    answers = [
        tokensieve.generate(
            model, tok, ids, method=PrefixReuse(make_method("plainkv_test"), store, 40), max_new_tokens=4
        )
        for _ in range(2)
    ]
    assert [a.token_ids for a in answers] == [ref.token_ids] * 2
    assert answers[1].details["prefix_cached_tokens"] > 0 and store.stats.hits == 1
    assert "plainkv_test" in supported() and "lastk_test" not in supported()
    expected = f"the prefix cache supports methods {', '.join(supported())}; got 'lastk_test'"
    assert refusal(make_method("lastk_test")) == expected
    with pytest.raises(InputError, match="prefix cache supports methods .*got 'lastk_test'"):
        PrefixReuse(make_method("lastk_test"), store)


def test_vllm_asks_prompt_only():
    from tokensieve.serve.vllm_engine import vllm_methods

    assert "lastk_test" in vllm_methods() and "plainkv_test" not in vllm_methods()


def test_unregister_removes_them_everywhere():
    unregister("plainkv_test")
    try:
        assert "plainkv_test" not in METHODS and "plainkv_test" not in capable(prefix_reuse=True)
        with pytest.raises(InputError, match="unknown method 'plainkv_test'"):
            make_method("plainkv_test")
    finally:
        register(PlainKV)
