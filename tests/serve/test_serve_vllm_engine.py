"""``--engine vllm``'s plumbing through the real app, with a stand-in for vLLM's async engine (no vLLM needed):
the engine composes the shared request preparation (one per request), hands vLLM the kept ids with the
tenant's salt as vLLM's own ``cache_salt``, and answers with the same events as the transformers engine."""

from __future__ import annotations

import asyncio
import sys
import types

import httpx2
import pytest
from eval_support import byte_model, byte_tokenizer
from test_serve import CHAT, COMP, MSG, client, serving, stream_text
from test_serve_engine import spy_preparations

from tokensieve.integrations.vllm_adapter import select_tokens
from tokensieve.serve.app import app_for_engine
from tokensieve.serve.requests import prefix_salt

ANSWER_LEN = 5


class _FakeAsyncLLM:
    """Answers each request with the first ``ANSWER_LEN`` ids of its token prompt, one output per token."""

    def __init__(self) -> None:
        self.inputs: list[dict] = []
        self.params: list[dict] = []
        self.errored = False
        self.model_config = object()
        self.renderer = types.SimpleNamespace(render_cmpl_async=self._render)

    @classmethod
    def from_vllm_config(cls, config, **kw):
        llm = cls()
        config.built.append(llm)
        return llm

    async def _render(self, prompts):
        return list(prompts)

    def get_num_unfinished_requests(self) -> int:
        return 0

    def shutdown(self) -> None:
        pass

    async def generate(self, engine_input, params, request_id):
        self.inputs.append(dict(engine_input))
        self.params.append(params)
        ids = engine_input["prompt_token_ids"][: min(ANSWER_LEN, params["max_tokens"])]
        for k, t in enumerate(ids):
            await asyncio.sleep(0)
            last = k == len(ids) - 1
            yield types.SimpleNamespace(
                outputs=[types.SimpleNamespace(token_ids=[t], finish_reason="length" if last else None)]
            )


@pytest.fixture
def fake_vllm(monkeypatch):
    built: list[_FakeAsyncLLM] = []

    class AsyncEngineArgs:
        def __init__(self, **kw):
            self.kw, self.disable_log_stats, self.enable_log_requests = kw, True, False

        def create_engine_config(self):
            return types.SimpleNamespace(
                model_config=types.SimpleNamespace(max_model_len=self.kw.get("max_model_len", 256)),
                scheduler_config=types.SimpleNamespace(max_num_seqs=2),
                built=built,
            )

    class VLLMClientError(ValueError):
        pass

    mods = {
        "vllm": types.SimpleNamespace(__version__="fake", SamplingParams=lambda **kw: kw),
        "vllm.engine": types.ModuleType("vllm.engine"),
        "vllm.engine.arg_utils": types.SimpleNamespace(AsyncEngineArgs=AsyncEngineArgs),
        "vllm.v1": types.ModuleType("vllm.v1"),
        "vllm.v1.engine": types.ModuleType("vllm.v1.engine"),
        "vllm.v1.engine.async_llm": types.SimpleNamespace(AsyncLLM=_FakeAsyncLLM),
        "vllm.exceptions": types.SimpleNamespace(VLLMClientError=VLLMClientError),
        "vllm.sampling_params": types.SimpleNamespace(RequestOutputKind=types.SimpleNamespace(DELTA="delta")),
        "vllm.inputs": types.SimpleNamespace(TokensPrompt=dict),
        "vllm.renderers": types.ModuleType("vllm.renderers"),
        "vllm.renderers.inputs": types.ModuleType("vllm.renderers.inputs"),
        "vllm.renderers.inputs.preprocess": types.SimpleNamespace(parse_model_prompt=lambda config, prompt: prompt),
    }
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return built


def test_vllm_engine_composes_preparation_salts_vllms_prefix_cache_and_streams(fake_vllm, monkeypatch):
    from tokensieve.serve.vllm_engine import VLLMEngine

    model, tok = byte_model(max_pos=256), byte_tokenizer()
    engine = VLLMEngine(
        model, tok, {"model": "stand-in"}, method="gemfilter", method_params={"topk": 8, "filter_layer": 1}
    )
    app = app_for_engine(engine, model_name="tiny", api_keys=["key-a"])
    prompt = "a prompt long enough for GemFilter to select eight of its tokens"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    kept = select_tokens(model, tok, ids, "gemfilter", topk=8, filter_layer=1).kept_ids  # what vLLM must get
    counts = spy_preparations(monkeypatch)
    from tokensieve.methods.gemfilter import GemFilter

    real_validate = GemFilter.validate

    def spy(self, *a, **kw):
        counts["validate"] += 1
        return real_validate(self, *a, **kw)

    monkeypatch.setattr(GemFilter, "validate", spy)
    with serving(app) as base:
        import openai

        c = openai.OpenAI(base_url=f"{base}/v1", api_key="key-a", max_retries=0, timeout=60)
        r = c.completions.create(
            model="m", prompt=prompt, max_tokens=4, temperature=0, extra_body={"cache_salt": "tenant-1"}
        )
        (llm,) = fake_vllm
        assert llm.inputs[-1]["prompt_token_ids"] == kept  # the filter pass's kept ids, from the prepared run
        assert llm.inputs[-1]["cache_salt"] == prefix_salt("key-a", "tenant-1")  # tenant and salt, as vLLM's cache_salt
        assert r.choices[0].text == tok.decode(kept[:4]) and r.choices[0].finish_reason == "length"
        ts = r.model_extra["tokensieve"]
        assert (
            ts["kept_tokens"] == 8 == ts["kv_kept"] == r.usage.model_extra["kv_kept"]
            and ts["prompt_tokens"] == ids.shape[1]
            and r.usage.completion_tokens == 4
        )
        c.completions.create(model="m", prompt=prompt, max_tokens=4, extra_body={"cache_salt": "tenant-2"})
        assert llm.inputs[-1]["cache_salt"] not in (None, llm.inputs[-2]["cache_salt"])
        text, final, _ = stream_text(
            c.chat.completions.create(
                model="m",
                messages=MSG,
                max_tokens=ANSWER_LEN,
                stream=True,
                extra_body={"tokensieve": {"method": "full"}},
            )
        )
        assert llm.inputs[-1]["cache_salt"] == prefix_salt("key-a", None)  # the API key alone salts it too
        assert text == tok.decode(llm.inputs[-1]["prompt_token_ids"][:ANSWER_LEN]) and final is not None
        assert counts["validate"] == 3  # one preparation per request (GemFilter twice, full once)
        assert [rec.outcome for rec in engine.records] == ["completed"] * 3
        r = httpx2.post(
            f"{base}{CHAT}",
            json={"messages": MSG, "tokensieve": {"method": "snapkv"}},
            headers={"authorization": "Bearer key-a"},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_method"
        assert counts["validate"] == 3 and len(llm.inputs) == 3  # refused before any preparation, never reached vLLM
        r = httpx2.post(
            f"{base}{COMP}",
            json={"prompt": "x" * 250, "max_tokens": 10, "tokensieve": {"method": "full"}},
            headers={"authorization": "Bearer key-a"},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        c.close()


def test_vllm_engine_without_a_salt_sends_none(fake_vllm):
    from tokensieve.serve.vllm_engine import VLLMEngine

    model, tok = byte_model(max_pos=256), byte_tokenizer()
    engine = VLLMEngine(model, tok, {"model": "stand-in"}, method="full")
    with serving(app_for_engine(engine, model_name="tiny")) as base:
        c = client(base)
        r = c.chat.completions.create(model="m", messages=MSG, max_tokens=3)
        assert r.usage.completion_tokens == 3
        assert "cache_salt" not in fake_vllm[0].inputs[-1]  # one shared prefix cache, as vLLM's default
        c.close()


def test_vllm_engine_answers_the_selection_page_with_gemfilters_kept_tokens(fake_vllm):
    from tokensieve.evaluation.needle import make_messages
    from tokensieve.serve.vllm_engine import VLLMEngine

    model, tok = byte_model(max_pos=256), byte_tokenizer()
    engine = VLLMEngine(model, tok, {"model": "stand-in"}, method="full")
    doc, question = "a document long enough for GemFilter to select some of its tokens", "what?"
    ids = tok(make_messages(doc, question)[0]["content"], return_tensors="pt")["input_ids"]
    kept = select_tokens(model, tok, ids, "gemfilter", topk=16, filter_layer=1)
    with serving(app_for_engine(engine, model_name="tiny")) as base:
        page = httpx2.get(base + "/").text
        assert '"name": "gemfilter"' in page and '"name": "snapkv"' not in page  # vLLM's methods only
        body = {"document": doc, "question": question, "methods": ["gemfilter", "full"], "max_tokens": 3}
        r = httpx2.post(
            f"{base}/v1/tokensieve/select", json={**body, "params": {"gemfilter": {"topk": 16, "filter_layer": 1}}}
        )
        assert r.status_code == 200, r.text
        gem, full = r.json()["results"]
        assert gem["kept_indices"] == kept.kept_indices and gem["selection"] == "tokens"
        assert gem["answer"] == tok.decode(kept.kept_ids[:3])  # the stand-in answers with its prompt's first ids
        assert full["kept_indices"] == list(range(ids.shape[1]))
        r = httpx2.post(f"{base}/v1/tokensieve/select", json={**body, "methods": ["snapkv"]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "methods"
